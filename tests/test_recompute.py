"""Activation recompute (``parallel.recompute_*``, megatron's TransformerConfig): same loss, gradients and
update as without, the recompute really runs, and megatron's rules are checked before start."""

from __future__ import annotations

import pytest
import torch

from r1mega.config.schema import ModelConfig, OptimizerConfig, ParallelConfig, RLConfig

MODES = [("selective", None, None), ("full", "uniform", 1), ("full", "block", 1)]


def _train_once(model, parallel: ParallelConfig, batch, settings, rl):
    """One GRPO step; returns (loss, gradients before the optimizer step, parameters after it, how often the
    first layer and the first core attention ran forward)."""
    from r1mega.rl.learner import learner_step
    from r1mega.train.model_setup import build_training_model

    tm = build_training_model(model, parallel, OptimizerConfig(lr=1e-3), total_steps=2)
    layer = tm.module.decoder.layers[0]
    calls = {"layer": 0, "core_attention": 0}
    layer.register_forward_hook(lambda *a: calls.__setitem__("layer", calls["layer"] + 1))
    layer.self_attention.core_attention.register_forward_hook(
        lambda *a: calls.__setitem__("core_attention", calls["core_attention"] + 1))
    grads = {}
    step = tm.optimizer.step

    def capture():
        grads.update({n: p.main_grad.detach().clone() for n, p in tm.module.named_parameters()})
        return step()

    tm.optimizer.step = capture
    m = learner_step(tm, batch, settings, rl)
    return m.values["loss"], grads, {n: p.detach().clone() for n, p in tm.module.named_parameters()}, calls


@pytest.mark.timeout(300)
@pytest.mark.parametrize("preset", ["qwen3_moe", "deepseek_v3"])
def test_recompute_gives_the_same_step(single_process_megatron, preset):
    from r1mega.config.presets import resolve_model
    from r1mega.rl.learner import LearnerBatch, LearnerSettings

    model = resolve_model(ModelConfig(preset=preset))
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, model.vocab_size, (4, 17), generator=gen)
    mask = (torch.rand(4, 16, generator=gen) > 0.3).float()
    batch = LearnerBatch(tokens, mask, advantages=torch.randn(4, generator=gen))
    settings = LearnerSettings(micro_batch_size=2, valid_vocab=model.vocab_size)
    rl = RLConfig(tis_cap=None, entropy_coef=0.01)
    loss, grads, params, calls = _train_once(model, ParallelConfig(), batch, settings, rl)
    assert calls == {"layer": 2, "core_attention": 2}  # two micro-batches, no recompute
    for gran, method, n in MODES:
        parallel = ParallelConfig(recompute_granularity=gran, recompute_method=method, recompute_num_layers=n)
        r_loss, r_grads, r_params, r_calls = _train_once(model, parallel, batch, settings, rl)
        # the recomputed forward runs again in the backward pass: the whole layer (full) or its core attention
        assert r_calls["core_attention"] == 4 and r_calls["layer"] == (4 if gran == "full" else 2), (gran, r_calls)
        assert r_loss == pytest.approx(loss, rel=1e-6), gran
        for name, g in grads.items():
            assert torch.allclose(r_grads[name], g, rtol=1e-5, atol=1e-7), (gran, method, name)
            assert torch.allclose(r_params[name], params[name], rtol=1e-5, atol=1e-7), (gran, method, name)


@pytest.mark.parametrize("overrides,phrase", [
    (["parallel.recompute_granularity=partial"], "parallel.recompute_granularity='partial' is not supported"),
    (["parallel.recompute_granularity=full", "parallel.recompute_num_layers=1"],
     "recompute_granularity=full needs parallel.recompute_method"),
    (["parallel.recompute_granularity=full", "parallel.recompute_method=uniform"],
     "needs parallel.recompute_num_layers >= 1"),
    (["parallel.recompute_granularity=selective", "parallel.recompute_num_layers=1"],
     "parallel.recompute_num_layers=1 only applies to parallel.recompute_granularity=full"),
    (["parallel.recompute_method=block"], "parallel.recompute_method='block' only applies to"),
    (["parallel.recompute_granularity=full", "parallel.recompute_method=block", "parallel.recompute_num_layers=3"],
     "parallel.recompute_num_layers=3 exceeds the 2 layers of a pipeline stage"),
    (["model.num_layers=3", "parallel.recompute_granularity=full", "parallel.recompute_method=uniform",
      "parallel.recompute_num_layers=2"], "must divide the layers of every pipeline stage"),
    (["parallel.recompute_granularity=selective", "rl.routing_replay=r2"], "with rl.routing_replay='r2'"),
])
def test_bad_recompute_config_is_refused(overrides, phrase):
    from r1mega.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)
