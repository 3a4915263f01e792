"""Llama 3.x config.json <-> ``ModelConfig``."""

from __future__ import annotations

from r1mega.config.schema import ModelConfig
from r1mega.models.family import Family
from r1mega.models.hf_common import check_dense, dense_from_hf, dense_to_hf
from r1mega.models.llama3.rules import ARCHITECTURE


def to_hf(model: ModelConfig) -> dict:
    check_dense(model, "llama3", qkv_bias=False, qk_norm=False)
    return dict(dense_to_hf(model), mlp_bias=False)


def from_hf(hf: dict) -> dict:
    return dense_from_hf(hf, "llama3", add_qkv_bias=False, qk_layernorm=False)


FAMILY = Family(ARCHITECTURE, to_hf, from_hf)
