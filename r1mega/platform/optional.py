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


# What each megatron ``fp8_recipe`` needs: (min compute capability, min TE version, what it is).
FP8_RECIPES = {
    "delayed": ((8, 9), (1, 0), "per-tensor scales from an amax history (TE's DelayedScaling)"),
    "tensorwise": ((8, 9), (2, 2), "per-tensor current scaling (Float8CurrentScaling)"),
    "blockwise": ((9, 0), (2, 3), "1x128 / 128x128 block scales as in DeepSeek-V3 (Float8BlockScaling)"),
    "mxfp8": ((10, 0), (2, 1), "MXFP8 32-element block scales (Blackwell)"),
}


def transformer_engine_version() -> tuple[int, ...] | None:
    from importlib import metadata

    for dist in ("transformer-engine", "transformer_engine"):
        try:
            raw = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        return tuple(int(p) for p in raw.split("+")[0].split(".")[:3] if p.isdigit())
    return None


def fp8_support_problem(recipe: str, te_version: tuple[int, ...] | None,
                        capability: tuple[int, int] | None) -> str | None:
    """Why ``model.precision=fp8`` with ``recipe`` cannot run here, or None. Pure, so it is testable anywhere."""
    if recipe not in FP8_RECIPES:
        return f"model.fp8_recipe={recipe!r} is not one of {sorted(FP8_RECIPES)}"
    need_cc, need_te, what = FP8_RECIPES[recipe]
    if te_version is None:
        return ("model.precision=fp8 needs Transformer Engine on an FP8-capable GPU: install the `gpu` extra "
                "(`pip install -e .[gpu]`) or set model.precision=bf16")
    if capability is None:
        return "model.precision=fp8 needs a CUDA GPU (none is visible): set model.precision=bf16 or fp32"
    if capability < need_cc:
        return (f"model.fp8_recipe={recipe} ({what}) needs compute capability >= {need_cc[0]}.{need_cc[1]}; "
                f"this GPU is {capability[0]}.{capability[1]}: pick another recipe or set model.precision=bf16")
    if te_version < need_te:
        return (f"model.fp8_recipe={recipe} needs Transformer Engine >= {'.'.join(map(str, need_te))}; "
                f"installed {'.'.join(map(str, te_version))}: upgrade it or use fp8_recipe=delayed")
    return None


def check_fp8_support(recipe: str) -> None:
    """Raise with the reason when FP8 training with ``recipe`` is not possible on this machine."""
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    te = transformer_engine_version() if have_transformer_engine() else None
    problem = fp8_support_problem(recipe, te, capability)
    if problem:
        raise RuntimeError(problem)
    log.info("FP8 training: Transformer Engine %s, recipe %s (%s)", ".".join(map(str, te)), recipe,
             FP8_RECIPES[recipe][2])
