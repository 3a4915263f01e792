"""Optional accelerated dependencies, probed in one place and logged once.

Transformer Engine, flash-attn and apex cannot be built on a CPU-only machine; r1mega runs without
them on megatron-core's local (torch) modules. Everything that wants to know asks here.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch

log = logging.getLogger(__name__)


@functools.cache
def have_transformer_engine() -> bool:
    """TE is usable only with CUDA and its torch extension importable."""
    if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
        log.info("Transformer Engine unavailable: using megatron-core local (torch) layers.")
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # a broken TE install must not look like a working one
        log.warning("Transformer Engine is installed but failed to import (%s): using local layers.", e)
        return False
    log.info("Transformer Engine available: using TE layers (FP8-capable).")
    return True


@functools.cache
def have_fp8_gpu() -> bool:
    """FP8 tensor cores: Hopper (sm90) or newer."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
