"""DeepSeek-V2 config.json <-> ``ModelConfig``.

HF's router: softmax over all experts, top-k, weights times ``routed_scaling_factor`` and never
renormalised (transformers ignores ``norm_topk_prob``; the published configs say false) = megatron's
``score_function=softmax`` with ``pre_softmax=True``. ``topk_method=group_limited_greedy`` (DeepSeek-V2)
scores a group by its largest expert score; megatron scores it by the sum of its top
``topk // topk_group`` scores, so that is refused unless the two agree (``topk // topk_group == 1``).
"""

from __future__ import annotations

from r1mega.bridge.rules import BridgeError
from r1mega.config.schema import ModelConfig
from r1mega.models.deepseek_v2.rules import ARCHITECTURE
from r1mega.models.deepseek_v3.hf_config import mla_from_hf, mla_to_hf
from r1mega.models.family import Family


def to_hf(model: ModelConfig) -> dict:
    if model.moe_router_score_function != "softmax" or not model.moe_router_pre_softmax:
        raise BridgeError("deepseek_v2 routes with a softmax over all experts before top-k: set "
                          "moe_router_score_function=softmax, moe_router_pre_softmax=true")
    if model.moe_router_enable_expert_bias:
        raise BridgeError("deepseek_v2 has no expert bias: set moe_router_enable_expert_bias=false")
    if (model.moe_router_num_groups or 1) > 1 and model.moe_router_topk // model.moe_router_group_topk != 1:
        raise BridgeError("deepseek_v2's group-limited routing scores a group by its largest expert, megatron's "
                          "by the sum of its top topk // group_topk: keep moe_router_topk // "
                          "moe_router_group_topk == 1")
    return dict(mla_to_hf(model, "deepseek_v2"), norm_topk_prob=False, scoring_func="softmax",
                topk_method="group_limited_greedy" if (model.moe_router_num_groups or 1) > 1 else "greedy")


def from_hf(hf: dict) -> dict:
    if hf.get("scoring_func", "softmax") != "softmax":
        raise BridgeError(f"deepseek_v2 with scoring_func={hf.get('scoring_func')!r} is not supported (softmax)")
    method = hf.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise BridgeError(f"deepseek_v2 with topk_method={method!r} is not supported (greedy)")
    fields_ = mla_from_hf(hf)
    if method == "greedy":
        fields_.update(moe_router_num_groups=1, moe_router_group_topk=1)  # greedy ignores groups
    elif (hf.get("n_group") or 1) > 1 and hf["num_experts_per_tok"] // hf["topk_group"] != 1:
        raise BridgeError(f"deepseek_v2 with topk_method=group_limited_greedy (n_group={hf.get('n_group')}, "
                          f"topk_group={hf.get('topk_group')}, num_experts_per_tok={hf['num_experts_per_tok']}) "
                          "is not supported: HF scores a group by its largest expert, megatron by the sum of "
                          "its top num_experts_per_tok/topk_group experts (DeepSeek-V2 236B; V2-Lite is greedy)")
    return dict(fields_, moe_router_score_function="softmax", moe_router_pre_softmax=True,
                moe_router_enable_expert_bias=False, mtp_num_layers=0)


FAMILY = Family(ARCHITECTURE, to_hf, from_hf)
