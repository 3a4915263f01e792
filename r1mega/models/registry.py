"""The model families r1mega maps to Hugging Face, found by preset name or by HF ``model_type``.

One folder per family (``r1mega/models/<family>/``); adding a family is a folder plus one line here.
Its presets (``presets.yaml``) are read by ``r1mega.config.presets``, which needs no import of it.
"""

from __future__ import annotations

from r1mega.bridge.rules import Architecture, BridgeError
from r1mega.models.deepseek_v2.hf_config import FAMILY as DEEPSEEK_V2
from r1mega.models.deepseek_v3.hf_config import FAMILY as DEEPSEEK_V3
from r1mega.models.family import Family
from r1mega.models.glm4_moe.hf_config import FAMILY as GLM4_MOE
from r1mega.models.gpt_oss.hf_config import FAMILY as GPT_OSS
from r1mega.models.llama3.hf_config import FAMILY as LLAMA3
from r1mega.models.mixtral.hf_config import FAMILY as MIXTRAL
from r1mega.models.qwen2.hf_config import FAMILY as QWEN2
from r1mega.models.qwen3.hf_config import FAMILY as QWEN3
from r1mega.models.qwen3_moe.hf_config import FAMILY as QWEN3_MOE

FAMILIES: dict[str, Family] = {f.name: f for f in (QWEN3_MOE, DEEPSEEK_V3, DEEPSEEK_V2, GLM4_MOE, GPT_OSS, MIXTRAL,
                                                       QWEN2, QWEN3, LLAMA3)}


def family(preset: str) -> Family:
    if preset not in FAMILIES:
        raise BridgeError(f"no HF bridge for preset {preset!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[preset]


def family_for_model_type(model_type: str) -> Family:
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    supported = sorted(t for fam in FAMILIES.values() for t in fam.model_types)
    raise BridgeError(f"HF model_type {model_type!r} is not supported by the bridge; supported: {supported}")


def architecture(preset: str) -> Architecture:
    return family(preset).architecture


def architecture_for_model_type(model_type: str) -> Architecture:
    return family_for_model_type(model_type).architecture
