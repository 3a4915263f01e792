"""The architecture preset registry: family -> size -> field values of ``ModelConfig``.

Each model family keeps its presets next to its code, as data: ``r1mega/models/<family>/presets.yaml``
(``kind: moe`` or ``dense``, and ``sizes``; top-level keys starting with ``_`` hold YAML anchors). This
module reads those files without importing the families, so config stays free of torch and megatron
and below ``models`` (``tests/test_layering.py``). ``tiny`` sizes are for tests and the CPU demo; the
larger sizes follow the published configs of each family and are what cluster recipes use.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import yaml

from r1mega.config.schema import ModelConfig

FAMILIES_DIR = Path(__file__).resolve().parent.parent / "models"

# YaRN constants an MLA model is built with unless its config sets its own (``model.yarn_*``): DeepSeek-V3's
# published values (megatron's MLATransformerConfig default mscale_all_dim=0 would scale only the rope part
# of q.k, unlike DeepSeek-V3).
YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}

_KINDS = ("moe", "dense")


def _load_family(path: Path) -> tuple[str, dict[str, dict]]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    known = {f.name for f in fields(ModelConfig)}
    if data.get("kind") not in _KINDS or not isinstance(data.get("sizes"), dict):
        raise ValueError(f"{path}: a presets file needs kind ({' or '.join(_KINDS)}) and sizes")
    for size, values in data["sizes"].items():
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: size {size!r} sets {unknown}, which are not ModelConfig fields")
    return data["kind"], {str(size): dict(values) for size, values in data["sizes"].items()}


def _load_all() -> tuple[dict[str, dict[str, dict]], dict[str, dict[str, dict]]]:
    by_kind: dict[str, dict[str, dict[str, dict]]] = {kind: {} for kind in _KINDS}
    for path in sorted(FAMILIES_DIR.glob("*/presets.yaml")):
        kind, sizes = _load_family(path)
        by_kind[kind][path.parent.name] = sizes
    return by_kind["moe"], by_kind["dense"]


MOE_PRESETS, DENSE_PRESETS = _load_all()
PRESETS: dict[str, dict[str, dict]] = {**MOE_PRESETS, **DENSE_PRESETS}


def is_dense_preset(preset: str) -> bool:
    return preset in DENSE_PRESETS


def resolve_model(model: ModelConfig) -> ModelConfig:
    """Fill every ``None`` architecture field from the preset; explicit values win."""
    if model.preset not in PRESETS:
        raise ValueError(
            f"model.preset={model.preset!r} is unknown; choose one of {sorted(PRESETS)}."
        )
    sizes = PRESETS[model.preset]
    if model.size not in sizes:
        raise ValueError(
            f"model.size={model.size!r} is not a size of preset {model.preset!r}; "
            f"choose one of {sorted(sizes)}."
        )
    preset = sizes[model.size]
    updates = {
        f.name: preset[f.name]
        for f in fields(ModelConfig)
        if getattr(model, f.name) is None and f.name in preset
    }
    resolved = replace(model, **updates)
    if resolved.moe_ffn_hidden_size is None and resolved.num_experts:
        resolved = replace(resolved, moe_ffn_hidden_size=resolved.ffn_hidden_size)
    return resolved
