"""Rollout pieces that need no vLLM: layer-complete re-chunking, parity metrics and threshold, sampling spec."""

from __future__ import annotations

import pytest
import torch

from r1mega.config.schema import RolloutConfig
from r1mega.rollout import ParityChecker, ParityError, SamplingSpec, compare, layer_complete_batches, probe_batch
from r1mega.rollout.refit import layer_of


def _names(batches):
    return [[n for n, _ in b] for b in batches]


def test_layer_of():
    assert layer_of("model.layers.12.mlp.experts.3.up_proj.weight") == 12
    assert layer_of("model.embed_tokens.weight") is None and layer_of("lm_head.weight") is None


def test_layer_complete_batches_never_split_a_layer():
    t = torch.zeros(1)
    names = (["model.embed_tokens.weight"]
             + [f"model.layers.0.mlp.experts.{e}.{p}.weight" for e in range(4) for p in ("gate_proj", "up_proj")]
             + [f"model.layers.1.self_attn.{p}.weight" for p in "qkv"] + ["model.norm.weight", "lm_head.weight"])
    buckets = [[(n, t) for n in names[i:i + 3]] for i in range(0, len(names), 3)]
    out = _names(layer_complete_batches(buckets))
    assert sum(out, []) == names  # same order, nothing lost or duplicated
    for batch in out:
        for layer in {layer_of(n) for n in batch} - {None}:
            # every tensor of this layer is in this batch
            assert [n for n in names if layer_of(n) == layer] == [n for n in batch if layer_of(n) == layer]


def test_layer_complete_batches_refuses_unordered_stream():
    t = torch.zeros(1)
    buckets = [[("model.layers.0.a", t), ("model.layers.1.a", t)], [("model.norm.weight", t)],
               [("model.layers.0.b", t)]]
    with pytest.raises(ValueError, match="not ordered by layer"):
        list(layer_complete_batches(buckets))


def test_compare_and_checker_threshold():
    trainer = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-0.5, -0.5, 0.0, 0.0]])
    engine = [[-1.0, -2.1, -3.0], [-0.5, -0.4]]
    r = compare(engine, trainer)
    assert r.tokens == 5 and r.max_abs == pytest.approx(0.1) and r.mean_abs == pytest.approx(0.04)
    assert set(r.metrics()) == {"rollout/parity_mean_abs_logp", "rollout/parity_max_abs_logp",
                                "rollout/parity_tokens"}

    class Fake:
        def __init__(self, rows):
            self.rows = rows

        def prompt_logprobs(self, seqs):
            return self.rows

    probe = [[1, 2, 3, 4], [5, 6, 7]]
    checker = ParityChecker(probe, interval=2, max_abs_logp=0.05)
    assert not checker.note_refit() and checker.note_refit()  # every 2nd refit
    assert checker.check(Fake([[-1.0, -2.0, -3.0], [-0.5, -0.5]]), lambda s: trainer).max_abs == 0.0
    with pytest.raises(ParityError, match="mismatch after refit 2"):
        checker.check(Fake(engine), lambda s: trainer)
    with pytest.raises(ParityError):  # NaN is a failure, not a pass
        checker.check(Fake([[float("nan")] * 3, [-0.5, -0.5]]), lambda s: trainer)
    assert checker.check(None, lambda s: trainer) is None  # ranks without an engine
    assert ParityChecker(probe, interval=0).note_refit() is False


def test_probe_batch_is_fixed():
    assert probe_batch(100, 2, 8, seed=1) == probe_batch(100, 2, 8, seed=1) != probe_batch(100, 2, 8, seed=2)


def test_sampling_spec_from_config():
    cfg = RolloutConfig(max_new_tokens=7, temperature=0.7, stop=["</answer>"], stop_token_ids=[9], seed=3)
    s = SamplingSpec.from_config(cfg, top_k=5)
    assert (s.max_new_tokens, s.temperature, s.stop, s.stop_token_ids, s.seed, s.top_k) == (
        7, 0.7, ["</answer>"], [9], 3, 5)
    with pytest.raises(ValueError, match="logprobs_mode"):
        SamplingSpec(logprobs_mode="weird")
