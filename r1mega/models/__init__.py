"""Policy models on megatron-core, one folder per model family (``registry``). Importing this package readies
megatron for this machine and applies r1mega's fixes for megatron model bugs (``deepseek_v3.mla_fix``,
``deepseek_v3.moe_fix``: MLA and expert-bias routing, which other families use too), so every model built
through it has them."""

import logging
import os

from r1mega.platform.megatron_compat import ensure_megatron

ensure_megatron()

from r1mega.models.deepseek_v3 import mla_fix, moe_fix  # noqa: E402  (need megatron ready)

moe_fix.install()

if os.environ.get("R1MEGA_SKIP_MLA_FIX"):  # only to demonstrate the bug in tests
    logging.getLogger(__name__).warning("R1MEGA_SKIP_MLA_FIX is set: megatron's MLA rope-key gradient bug is "
                                        "NOT fixed (TP > 1 gradients of DeepSeek-V3 models are wrong)")
else:
    mla_fix.install()
