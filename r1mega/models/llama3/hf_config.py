"""Llama 3.x config.json <-> ``ModelConfig``."""

from r1mega.models.hf_common import dense_family
from r1mega.models.llama3.rules import ARCHITECTURE

FAMILY = dense_family(ARCHITECTURE, qkv_bias=False, qk_norm=False, mlp_bias=False)
