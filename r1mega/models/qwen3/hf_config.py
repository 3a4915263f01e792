"""Qwen3 (dense) config.json <-> ``ModelConfig``."""

from __future__ import annotations

from r1mega.config.schema import ModelConfig
from r1mega.models.family import Family
from r1mega.models.hf_common import check_dense, dense_from_hf, dense_to_hf
from r1mega.models.qwen3.rules import ARCHITECTURE


def to_hf(model: ModelConfig) -> dict:
    check_dense(model, "qwen3", qkv_bias=False, qk_norm=True)
    return dict(dense_to_hf(model), use_sliding_window=False)


def from_hf(hf: dict) -> dict:
    return dense_from_hf(hf, "qwen3", add_qkv_bias=False, qk_layernorm=True)


FAMILY = Family(ARCHITECTURE, to_hf, from_hf)
