"""Resume state that is not model or optimizer tensors: RNG streams and checkpoint metadata.

Everything here is made of plain Python values and CPU tensors, so it reloads with
``torch.load(weights_only=True)`` (numpy's RNG state is converted; no pickled arrays).
"""

from __future__ import annotations

import datetime
import logging
import random
import time
import tomllib
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT = "r1mega-dist-ckpt"
FORMAT_VERSION = 1

# TransformerConfig fields that define parameter shapes / routing: a mismatch means the checkpoint
# belongs to another model. (Precision is recorded but not compared: fp32 <-> bf16 loads are fine.)
ARCH_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "normalization", "gated_linear_unit", "add_bias_linear", "qk_layernorm",
    "num_moe_experts", "moe_ffn_hidden_size", "moe_router_topk", "moe_shared_expert_intermediate_size",
    "moe_layer_freq", "moe_router_enable_expert_bias", "multi_latent_attention", "q_lora_rank",
    "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "mtp_num_layers",
)


# ----------------------------------------------------------------------------- RNG


def capture_rng() -> dict:
    """This rank's RNG streams: python, numpy, torch CPU, CUDA (real GPUs only), megatron's tracker."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch_cpu": torch.get_rng_state(),
        "cuda": None,
        "tracker": {},
    }
    from r1mega.platform import cpu_emulation

    if torch.cuda.is_available() and not cpu_emulation.is_installed():
        state["cuda"] = torch.cuda.get_rng_state().cpu()
    from megatron.core import tensor_parallel

    for name, value in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        if torch.is_tensor(value):
            state["tracker"][name] = value.detach().cpu().clone()
        else:  # graph-safe generator objects (CUDA graphs): not serialisable, re-seeded on load
            log.warning("RNG tracker state %r is a %s, not a tensor: not saved", name, type(value).__name__)
    return state


def restore_rng(state: dict, include_device: bool = True) -> None:
    """Inverse of :func:`capture_rng`. ``include_device=False`` keeps CUDA and tracker streams as they are."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch_cpu"])
    if not include_device:
        return
    from r1mega.platform import cpu_emulation

    if state.get("cuda") is not None and torch.cuda.is_available() and not cpu_emulation.is_installed():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("tracker"):
        from megatron.core import tensor_parallel

        tracker = tensor_parallel.get_cuda_rng_tracker()
        states = dict(tracker.get_states())
        states.update(state["tracker"])
        tracker.set_states(states)


# ----------------------------------------------------------------------------- metadata


def r1mega_version() -> str:
    import r1mega

    try:
        return metadata.version("r1mega")
    except metadata.PackageNotFoundError:
        pass
    pyproject = Path(r1mega.__file__).resolve().parents[1] / "pyproject.toml"
    try:
        return str(tomllib.loads(pyproject.read_text())["project"]["version"]) + "+src"
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def _plain(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return str(value)


def architecture(config) -> dict:
    """Shape-defining fields of a megatron TransformerConfig, as JSON values."""
    return {name: _plain(getattr(config, name, None)) for name in ARCH_FIELDS}


def make_meta(step: int, layout: dict, arch: dict, param_shapes: dict[str, list[int]],
              model_names: dict, optimizer_info: dict | None, extra: dict | None, contents: str) -> dict:
    now = time.time()
    import megatron.core

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "r1mega_version": r1mega_version(),
        "megatron_core_version": getattr(megatron.core, "__version__", "unknown"),
        "torch_version": torch.__version__,
        "step": int(step),
        "contents": contents,
        "time": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(timespec="seconds"),
        "unix_time": now,
        "layout": layout,
        "model": {**model_names, "architecture": arch, "param_shapes": param_shapes},
        "optimizer": optimizer_info,
        "extra": _plain_tree(extra or {}),
    }


def _plain_tree(value):
    """JSON-able copy of ``extra`` for meta.json (the exact values live in the checkpoint)."""
    if isinstance(value, dict):
        return {str(k): _plain_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_tree(v) for v in value]
    if torch.is_tensor(value):
        return value.tolist() if value.numel() <= 64 else f"<tensor {tuple(value.shape)} {value.dtype}>"
    return _plain(value)


def check_loadable(extra: dict) -> None:
    """Fail at save time, not at resume, if ``extra`` holds values ``weights_only`` loading rejects."""
    import io

    buf = io.BytesIO()
    torch.save(extra, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the fix
        raise ValueError(f"checkpoint extra {sorted(extra)} holds a value that torch.load(weights_only=True) "
                         f"cannot read back ({type(e).__name__}); keep extra to numbers (Python, not numpy), "
                         "strings, bools, None, lists/tuples/dicts of them and tensors") from None
