"""vLLM-CPU routed-experts capture vs transformers' routing (run as a subprocess by test_routing_replay.py).

    python tests/routing_capture_check.py <json spec>

A tiny random Qwen3-MoE; the engine (return_routed_experts, prefix caching requested *on*) samples
prompts of different lengths, n=3 each, with EOS as a stop token so samples finish at different steps
(prefill and decode rows of different requests share engine steps). For every sample the captured
experts of each fed token are compared with transformers' top-k on the same tokens; then again after
an in-place weight push (the capture must follow the new weights). Writes ``report`` (json).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def hf_routing(hf_dir: Path, seqs: list[list[int]]) -> list:
    """transformers' top-k expert ids per fed token: list of [len, L, k] tensors."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    k = model.config.num_experts_per_tok
    out = []
    with torch.no_grad():
        for seq in seqs:
            res = model(torch.tensor([seq]), output_router_logits=True)
            layers = [lg.reshape(len(seq), -1).topk(k, dim=-1).indices for lg in res.router_logits]
            out.append(torch.stack(layers, dim=1))
    return out


def compare(gens, ref) -> dict:
    from r1mega.rl.routing import differing_layers

    tokens = differs = 0
    shapes_ok = True
    for g, r in zip(gens, ref):
        shapes_ok &= tuple(g.routed_experts.shape) == tuple(r.shape)
        if not shapes_ok:
            continue
        d = differing_layers(g.routed_experts, r)
        tokens += d.shape[0]
        differs += int(d.any(-1).sum())
    return {"tokens": tokens, "differing_tokens": differs, "shapes_ok": bool(shapes_ok)}


def main(spec: dict) -> None:
    root = Path(spec["root"])
    from rollout_common import as_buckets, checkpoint_tensors, tiny_hf_dir

    from r1mega.rollout import SamplingSpec
    from r1mega.rollout.vllm_engine import VLLMEngine

    a, b = tiny_hf_dir(root / "a", seed=1), tiny_hf_dir(root / "b", seed=2)
    engine = VLLMEngine(a, seed=0, return_routed_experts=True, enable_prefix_caching=True)
    prompts = [[5, 6, 7, 8], list(range(20, 47)), [9, 10], list(range(100, 111))]
    sp = SamplingSpec(max_new_tokens=10, seed=3, temperature=1.0, stop_token_ids=[2, 3, 4, 5, 6, 7, 8, 9])
    rep = {"moe_layer_ids": engine.moe_layer_ids}
    gens = [g for row in engine.generate(prompts, 3, sp) for g in row]
    fed = [g.prompt_token_ids + g.token_ids[:-1] for g in gens]
    rep["response_lengths"] = sorted({len(g.token_ids) for g in gens})
    rep["fresh"] = compare(gens, hf_routing(a, fed))
    engine.update_weights(as_buckets(checkpoint_tensors(b), 10**9))
    gens_b = [g for row in engine.generate(prompts, 3, sp) for g in row]
    fed_b = [g.prompt_token_ids + g.token_ids[:-1] for g in gens_b]
    rep["after_push_vs_b"] = compare(gens_b, hf_routing(b, fed_b))
    rep["after_push_vs_a"] = compare(gens_b, hf_routing(a, fed_b))
    plain = engine.generate(prompts[:1], 1, sp)[0][0]
    rep["dtype"] = str(plain.routed_experts.dtype)
    Path(spec["report"]).write_text(json.dumps(rep, indent=1))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
