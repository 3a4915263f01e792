"""Qwen3 (dense) config.json <-> ``ModelConfig``."""

from r1mega.models.hf_common import dense_family
from r1mega.models.qwen3.rules import ARCHITECTURE

FAMILY = dense_family(ARCHITECTURE, qkv_bias=False, qk_norm=True, use_sliding_window=False)
