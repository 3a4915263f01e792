"""What a model family provides: its bridge rules and its HF config.json <-> ``ModelConfig`` mapping.

A family lives in ``r1mega/models/<family>/`` (``presets.yaml``, ``rules.py``, ``hf_config.py`` and
any megatron fixes it needs) and is listed in ``r1mega.models.registry``. Torch-only: no megatron.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from r1mega.bridge.rules import Architecture
from r1mega.config.schema import ModelConfig


@dataclass(frozen=True)
class Family:
    architecture: Architecture  # preset family name, HF model_type and class, tensor rules
    to_hf: Callable[[ModelConfig], dict]  # config.json body (without architectures / model_type)
    from_hf: Callable[[dict], dict]  # ModelConfig fields from a config.json
    # further HF model_type values whose config.json this family reads (written back as model_type)
    reads_model_types: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.architecture.preset

    @property
    def model_types(self) -> tuple[str, ...]:
        return (self.architecture.model_type, *self.reads_model_types)
