"""Single-process vLLM-CPU engine check (run as a subprocess by test_rollout_vllm.py: a clean process
with no megatron emulation and no process group; the engine runs in-process).

    python tests/rollout_engine_check.py <json spec>

Writes ``report`` (json): engine vs transformers |dlogp| for the fresh engine, before and after an
in-place push of other weights (bridge-like buckets that split layers), an A->B->A->B cycle, the
log-probs of generated tokens (the decode path) after the push, and (``spec["sampling"]``, default on)
repeatability of seeded generation, stop strings and max lengths. ``spec["preset"]``: the tiny model
(``rollout_common.PRESETS``); for DeepSeek-V3 also a push that changes only the router's
score-correction biases.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main(spec: dict) -> None:
    root = Path(spec["root"])
    from rollout_common import VOCAB, as_buckets, checkpoint_tensors, hf_logprobs, tiny_hf_dir

    from r1mega.rollout import compare, probe_batch
    from r1mega.rollout.vllm_engine import VLLMEngine

    preset = spec.get("preset", "qwen3_moe")
    a, b = tiny_hf_dir(root / "a", seed=1, preset=preset), tiny_hf_dir(root / "b", seed=2, preset=preset)
    probe = probe_batch(VOCAB, batch=4, length=32, seed=0, low=3)
    la, lb = hf_logprobs(a, probe), hf_logprobs(b, probe)
    engine = VLLMEngine(a, seed=0, logprobs_mode="processed")
    rep = {"startup_s": engine.startup_s}
    rep["fresh_vs_a"] = vars(compare(engine.prompt_logprobs(probe), la))
    rep["fresh_vs_b"] = vars(compare(engine.prompt_logprobs(probe), lb))
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    stats = engine.update_weights(as_buckets(tb, spec["bucket_bytes"]))
    rep["push"] = {"seconds": stats.seconds, "engine_calls": stats.buckets, "bytes": stats.bytes,
                   "input_buckets": len(as_buckets(tb, spec["bucket_bytes"]))}
    rep["after_push_vs_b"] = vars(compare(engine.prompt_logprobs(probe), lb))
    rep["after_push_vs_a"] = vars(compare(engine.prompt_logprobs(probe), la))
    rep["decode_after_push_vs_b"] = decode_parity(engine, [p[:8] for p in probe], b)
    cycle = []
    for tensors, ref in ((ta, la), (tb, lb), (ta, la)):
        engine.update_weights(as_buckets(tensors, spec["bucket_bytes"]))
        cycle.append(compare(engine.prompt_logprobs(probe), ref).max_abs)
    rep["cycle_max_abs"] = cycle
    if preset in ("deepseek_v3", "glm4_moe"):  # A with other router biases: only the expert choice changes
        a2 = tiny_hf_dir(root / "a_bias", seed=1, preset=preset, bias_seed=3)
        la2 = hf_logprobs(a2, probe)
        rep["bias_only_hf_a2_vs_a"] = vars(compare(la2.tolist(), la))
        engine.update_weights(as_buckets(checkpoint_tensors(a2), spec["bucket_bytes"]))
        rep["bias_push_vs_a2"] = vars(compare(engine.prompt_logprobs(probe), la2))
    if spec.get("sampling", True):
        rep.update(sampling_checks(engine))
    Path(spec["report"]).write_text(json.dumps(rep, indent=1))


def decode_parity(engine, prompts: list[list[int]], hf_dir: Path) -> dict:
    """Log-probs of sampled tokens (decode steps; temperature 1: processed == raw) vs transformers on the
    same sequences. ``prompts`` of one length."""
    from rollout_common import hf_logprobs

    from r1mega.rollout import SamplingSpec, compare

    gens = engine.generate(prompts, 1, SamplingSpec(max_new_tokens=16, seed=5, ignore_eos=True))
    ref = hf_logprobs(hf_dir, [g[0].prompt_token_ids + g[0].token_ids for g in gens])
    return vars(compare([g[0].logprobs for g in gens], ref[:, len(prompts[0]) - 1:]))


def sampling_checks(engine) -> dict:
    from dataclasses import replace

    from r1mega.rollout import SamplingSpec

    rep = {}
    sp = SamplingSpec(max_new_tokens=12, seed=7, temperature=0.8, top_p=0.9)
    prompts = ["hello world", [5, 6, 7, 8]]
    g1, g2 = engine.generate(prompts, 3, sp), engine.generate(prompts, 3, sp)
    ids = lambda g: [[s.token_ids for s in row] for row in g]  # noqa: E731
    rep["repeatable"] = ids(g1) == ids(g2)
    rep["samples_differ"] = len({tuple(t) for t in ids(g1)[0]}) > 1
    rep["other_seed_differs"] = ids(engine.generate(prompts, 3, SamplingSpec(max_new_tokens=12, seed=8,
                                                                             temperature=0.8, top_p=0.9))) != ids(g1)
    rep["shapes_ok"] = all(len(s.token_ids) == len(s.logprobs) <= 12 for row in g1 for s in row)
    rep["logprobs_finite_negative"] = all(lp <= 0.0 for row in g1 for s in row for lp in s.logprobs)
    # stop token: stop at the first sampled token of g1[1][0]
    first = g1[1][0].token_ids[0]
    # (prompt i of a call is sampled with seed + i: prompt 1 above used seed 8)
    g3 = engine.generate([prompts[1]], 3, SamplingSpec(max_new_tokens=12, seed=8, temperature=0.8, top_p=0.9,
                                                        stop_token_ids=[first]))
    rep["stop_token_ok"] = g3[0][0].token_ids == [first] and g3[0][0].finish_reason == "stop"
    g4 = engine.generate(["hello"], 1, SamplingSpec(max_new_tokens=5, seed=1, ignore_eos=True))
    rep["max_len_ok"] = len(g4[0][0].token_ids) == 5 and g4[0][0].finish_reason == "length"
    # top-k log-probs per generated token (distillation targets): k entries in rank order, the sampled
    # token's entry equal to its own log-prob when it is among them (temperature 1: processed == raw)
    g5 = engine.generate([prompts[1]], 2, SamplingSpec(max_new_tokens=6, seed=3, top_logprobs=4))
    rep["top_k_ok"] = all(
        len(s.top_ids) == len(s.top_logprobs) == len(s.token_ids)
        and all(len(ids) == 4 == len(set(ids)) and lps == sorted(lps, reverse=True) and lps[0] >= lp - 1e-6
                and (t not in ids or abs(lps[ids.index(t)] - lp) < 1e-5)
                for ids, lps, t, lp in zip(s.top_ids, s.top_logprobs, s.token_ids, s.logprobs))
        for s in g5[0])
    rep["top_k_off_by_default"] = g1[0][0].top_ids is None
    # text only on request (vLLM's detokenizer off otherwise), and it does not change what is sampled; vLLM's
    # incremental detokenizer holds back a trailing partial UTF-8 character, so the text starts the full decode
    gt = engine.generate(prompts, 3, replace(sp, return_text=True))
    decoded = lambda s: engine.tokenizer.decode(s.token_ids, skip_special_tokens=True)  # noqa: E731
    rep["text_only_on_request"] = (all(s.text == "" for row in g1 for s in row) and ids(gt) == ids(g1)
                                   and all(s.text and decoded(s).startswith(s.text) for row in gt for s in row))
    engine.sleep()
    engine.wake()
    return rep


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
