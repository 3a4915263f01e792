"""``rollout.engine=megatron``: megatron-core inference over the learner's own model.

- the sampling arithmetic (filtering, inverse-CDF picks, per-sample seeds) against independent references;
- the left-padded batch: masks, per-row positions and rotary tables, finished rows dropped from the KV cache;
- world 1: the engine's samples scored by the learner (training-forward log-probs, its own routing, the
  filtered distribution of a full forward), EOS / length stops, a prompt alone = the same prompt padded;
- world 2 (EP2, TP2), qwen3_moe and deepseek_v3 (MLA): the same token ids, log-probs within 1e-5 and the
  same routing as world 1 (``slow``);
- config validation (one_step_off, rollout.tp, stop strings).

The acceptance runs through ``r1mega train`` are in ``test_megatron_rollout_train.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from r1mega.config import ConfigError, load_config
from r1mega.platform.spawn import spawn_ranks
from r1mega.rollout.megatron_engine import _check_core_attention, filtered_logits, pick, sample_seed
from r1mega.rollout.padded_batch import PaddedBatch

WORKER = Path(__file__).resolve().parent / "megatron_engine_worker.py"
STOP_IDS = set(range(3, 60))


def test_filtering_keeps_the_top_k_and_the_top_p_nucleus():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    assert torch.isfinite(filtered_logits(logits, 1.0, 3, 1.0)).tolist() == [[True] * 3 + [False] * 3]
    probs = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...: 0.8 needs the first two, 0.9 the first three
    for top_p, kept in ((0.5, 1), (0.8, 2), (0.9, 3), (1.0, 6)):
        got = torch.isfinite(filtered_logits(logits, 1.0, -1, top_p))[0]
        assert got.sum() == kept and probs[:kept].sum() >= top_p - 1e-6
    # temperature divides before filtering; top-k then top-p (vLLM's order)
    x = filtered_logits(logits, 0.5, 4, 0.99)
    ref = logits[0, :4] / 0.5
    keep = int((ref.softmax(-1).cumsum(-1) - ref.softmax(-1) < 0.99).sum())
    assert torch.equal(x[0, :keep], ref[:keep]) and torch.isinf(x[0, keep:]).all()


def test_inverse_cdf_picks_follow_the_distribution_and_skip_zero_probability_tokens():
    logits = torch.tensor([[0.0, float("-inf"), 1.0, 2.0]]).repeat(20000, 1)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    picks = pick(logits, u)
    assert not (picks == 1).any()
    freq = torch.bincount(picks, minlength=4).double() / len(picks)
    assert torch.allclose(freq, logits[0].softmax(-1).double(), atol=0.01)
    assert pick(logits[:1], torch.tensor([1 - 1e-12], dtype=torch.float64)).item() == 3


def test_sample_seeds_are_distinct_per_prompt_and_sample():
    seeds = {sample_seed(s, j) for s in range(50) for j in range(16)}
    assert len(seeds) == 50 * 16


def test_padded_batch_masks_pad_slots_and_keeps_each_rows_positions():
    batch = PaddedBatch([[5, 6, 7], [8]], 2)
    assert (batch.prompt_end, batch.slots, batch.pad.tolist()) == (3, 5, [0, 2])
    assert batch.tokens[1].tolist() == [0, 0, 8, 0, 0] and batch.positions[1].tolist() == [0, 0, 0, 1, 2]
    sees = ~batch.window(0, 3, "cpu")["attention_mask"][:, 0]  # [b, query, key]: True = attended
    assert sees[0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]  # causal
    assert sees[1].tolist() == [[True, False, False], [False, True, False], [False, False, True]]  # pads: self only
    step = batch.window(3, 4, "cpu")
    assert step["tokens"].shape == (2, 1) and step["position_ids"].tolist() == [[3], [1]]
    assert (~step["attention_mask"][:, 0, 0]).tolist() == [[True] * 4, [False, False, True, True]]


def test_padded_batch_drops_finished_rows_from_the_kv_cache_once_they_are_an_eighth():
    class Context:  # a StaticInferenceContext's cache: per layer (key, value) [slots, batch, heads, dim]
        max_batch_size = 9
        key_value_memory_dict = {1: (torch.arange(9.0).view(1, 9, 1, 1).repeat(4, 1, 1, 2),
                                     -torch.arange(9.0).view(1, 9, 1, 1).repeat(4, 1, 1, 2))}

    batch = PaddedBatch([[1] * (k + 1) for k in range(9)], 1)
    assert not batch.drop(torch.arange(9) == 4, Context)  # 1 of 9 finished: not yet worth a copy
    finished = torch.isin(torch.arange(9), torch.tensor([0, 4]))
    assert batch.drop(finished, Context)
    kept = [1, 2, 3, 5, 6, 7, 8]
    k, v = Context.key_value_memory_dict[1]
    assert k[0, :, 0, 0].tolist() == kept and v[0, :, 0, 0].tolist() == [-x for x in kept]
    assert batch.rows.tolist() == kept and batch.pad.tolist() == [8 - x for x in kept] and len(batch) == 7
    assert Context.max_batch_size == 7


def test_rotary_tables_are_gathered_at_each_rows_positions_while_the_hook_is_on():
    from r1mega.platform.megatron_compat import ensure_megatron

    ensure_megatron()  # megatron on CPU
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0)
    base = rope(5)  # [slots, 1, 1, d]
    batch = PaddedBatch([[1, 2, 3], [4]], 2)  # row 1: pad 2, positions 0 0 0 1 2
    with batch.rope(rope):
        got = rope(5)
        batch.window(0, 3, "cpu", slice(1, 2))  # a prefill group of row 1 only: the tables follow its rows
        alone = rope(5)
    assert got.shape == (5, 2, 1, 8)
    assert torch.equal(got[:, 0], base[:, 0]) and torch.equal(got[:, 1], base[[0, 0, 0, 1, 2], 0])
    assert alone.shape == (5, 1, 1, 8) and torch.equal(alone[:, 0], got[:, 1])
    assert rope(5).shape == (5, 1, 1, 8)  # the hook is gone


def test_the_engine_refuses_a_core_attention_that_ignores_the_padding_mask():
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.core_attention = torch.nn.Identity()  # e.g. Transformer Engine's

    with pytest.raises(ValueError, match="Identity .*use rollout.engine=vllm"):
        _check_core_attention(torch.nn.Sequential(Layer()))


def _run(tmp_path, layout: str, world: int, preset: str = "qwen3_moe", check: bool = False) -> dict:
    out = tmp_path / f"{preset}_{layout}.json"
    spec = {"layout": layout, "preset": preset, "out": str(out), "prompts": 6, "max_new_tokens": 10, "check": check}
    spawn_ranks([str(WORKER), json.dumps(spec)], world, timeout_s=400, name=f"megatron-engine-{layout}",
                env={"OMP_NUM_THREADS": "1"})
    return json.loads(out.read_text())


@pytest.mark.timeout(450)
def test_world1_samples_score_the_same_in_the_learner(tmp_path):
    r = _run(tmp_path, "tp1", 1, check=True)
    c = r["check"]
    assert c["learner_logp_max_abs"] <= 1e-5, c  # the KV-cache forwards vs the learner's training forward
    assert c["routing_positions_differing"] == 0 and c["routing_positions"] > 0, c  # R3: the router's own choices
    assert c["filtered_logp_max_abs"] <= 1e-5 and c["sampled_outside_filter"] == 0, c  # processed log-probs
    # a prompt generates the same alone and left-padded beside a longer prompt (rows stopping around it)
    assert c["padding_same_tokens"] and c["padding_same_routes"] and c["padding_logp_max_abs"] <= 1e-6, c
    assert len(set(c["padding_lengths"])) > 1, c  # its samples stop at different steps
    plain, filtered = r["plain"], r["filtered"]
    assert plain["prompts"] == [i for i in range(6) for _ in range(3)]
    stopped = 0
    for ids, lps, finish in zip(plain["tokens"], plain["logprobs"], plain["finish"]):
        assert len(ids) == len(lps) and 1 <= len(ids) <= 10
        if finish == "stop":  # ends on a stop id, none before it
            stopped += 1
            assert ids[-1] in STOP_IDS and not STOP_IDS & set(ids[:-1])
        else:
            assert finish == "length" and len(ids) == 10 and not STOP_IDS & set(ids)
    assert 0 < stopped < 18  # both kinds of ending are covered
    assert all(len(ids) == 10 and f == "length" for ids, f in zip(filtered["tokens"], filtered["finish"]))
    samples = [tuple(ids) for ids in filtered["tokens"]]
    assert len(set(samples)) == len(samples)  # every sample draws from its own generator


def _same(ref: dict, got: dict) -> None:
    for mode in ("plain", "filtered", "single", "staggered"):
        assert got[mode]["tokens"] == ref[mode]["tokens"] and got[mode]["finish"] == ref[mode]["finish"]
        worst = max(abs(a - b) for x, y in zip(ref[mode]["logprobs"], got[mode]["logprobs"]) for a, b in zip(x, y))
        assert worst <= 1e-5
    assert got["plain"]["routes"] == ref["plain"]["routes"]


@pytest.mark.timeout(1500)
# CI: qwen3_moe (the engine's multi-process path: EP lock step, one group idle, TP); MLA's is `slow`
@pytest.mark.parametrize("preset", ["qwen3_moe", pytest.param("deepseek_v3", marks=pytest.mark.slow)])
def test_ep2_and_tp2_generate_what_world1_generates(tmp_path, preset):
    ref = _run(tmp_path, "tp1", 1, preset)
    for layout in ("ep2", "tp2"):
        _same(ref, _run(tmp_path, layout, 2, preset))


@pytest.mark.parametrize("overrides,phrase", [
    (["rollout.mode=one_step_off", "rollout.engine_ranks=1"], "cannot sample a step ahead"),
    (["rollout.tp=2"], "rollout.engine=megatron generates in the learner's own layout"),
    (["rollout.stop=[</answer>]"], "stops on token ids only"),
    (["rollout.engine=sglang"], "rollout.engine='sglang' is not supported"),
    (["stages=[{name: d, kind: distill, steps: 2}]", "distill.teacher_hf=/nonexistent"],
     r"\['d'\] \(distill\) sample a teacher given as an HF model"),
])
def test_config_refuses_what_the_megatron_engine_cannot_do(overrides, phrase):
    engine = [] if any(o.startswith("rollout.engine=") for o in overrides) else ["rollout.engine=megatron"]
    with pytest.raises(ConfigError, match=phrase):
        load_config("configs/demo_cpu.yaml", [*engine, *overrides, "data.eval_path=null"], world_size=2)


def test_the_megatron_engine_cannot_serve_an_hf_directory():
    from r1mega.rollout import build_engine

    cfg = load_config("configs/demo_cpu.yaml", ["rollout.engine=megatron"], world_size=1)
    with pytest.raises(ValueError, match="serve it with rollout.engine=vllm"):
        build_engine(Path("/nonexistent"), cfg.rollout)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
