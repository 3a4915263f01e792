"""Qwen2 config.json <-> ``ModelConfig``."""

from r1mega.models.hf_common import dense_family
from r1mega.models.qwen2.rules import ARCHITECTURE

FAMILY = dense_family(ARCHITECTURE, qkv_bias=True, qk_norm=False, use_sliding_window=False)
