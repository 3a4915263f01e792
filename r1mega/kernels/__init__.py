"""Python entry points of the compiled ops in ``csrc/`` (C++ CPU + CUDA) with pure-torch fallbacks.

``extension`` builds/loads the ops and decides per device which path runs (logged once);
``fused_logprob`` and ``fp8_blockwise`` wrap them with the same contracts as their torch versions.
"""

from r1mega.kernels.extension import KernelBuildError, load_ops, ops_for
from r1mega.kernels.fp8_blockwise import dequantize_blockwise, quantize_blockwise
from r1mega.kernels.fused_logprob import fused_logprob_and_entropy

__all__ = ["KernelBuildError", "dequantize_blockwise", "fused_logprob_and_entropy", "load_ops", "ops_for",
           "quantize_blockwise"]
