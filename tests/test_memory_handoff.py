"""Learner memory handoff (train.memory): on GPU, offload frees the grad buffers and the optimizer state
and training after an offload/onload cycle is bit-identical to training without one; on CPU both are
logged no-ops. The GPU tests need megatron-core and CUDA, not vLLM (tools/gpu_check.sh runs them)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

# deterministic cuBLAS for the bit-identity check; must be set before the first cuBLAS call
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def on_gpu_in_both_precisions(test):
    for mark in (pytest.mark.parametrize("precision", ["bf16", "fp32"]), pytest.mark.timeout(300), pytest.mark.gpu,
                 pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")):
        test = mark(test)
    return test


def _build(precision: str = "fp32"):
    from r1mega.config.presets import resolve_model
    from r1mega.config.schema import ModelConfig, OptimizerConfig, ParallelConfig
    from r1mega.train.model_setup import build_training_model

    model = resolve_model(ModelConfig(preset="qwen3_moe", precision=precision))
    tm = build_training_model(model, ParallelConfig(micro_batch_size=2), OptimizerConfig(lr=1e-2), total_steps=8)
    return tm, model


def _tokens(model, step: int) -> torch.Tensor:
    return torch.randint(0, model.vocab_size, (4, 33), generator=torch.Generator().manual_seed(step))


def _optimizers(tm) -> list:
    return getattr(tm.optimizer, "chained_optimizers", [tm.optimizer])


def _adam_state(tm) -> list[torch.Tensor]:
    return [v for o in _optimizers(tm) for per_param in o.optimizer.state.values()
            for k, v in per_param.items() if k in ("exp_avg", "exp_avg_sq")]


def _grad_buffers(tm) -> list[torch.Tensor]:
    return [b.grad_data for b in tm.ddp.buffers + tm.ddp.expert_parallel_buffers]


@pytest.mark.timeout(120)
def test_cpu_offload_and_onload_are_logged_no_ops(single_process_megatron, caplog):
    from r1mega.train.lm_step import lm_train_step
    from r1mega.train.memory import handoff_bytes, is_offloaded, offload, onload

    tm, model = _build()
    lm_train_step(tm, _tokens(model, 0), 2)
    state = [t.clone() for t in _adam_state(tm)]
    grads = [g.clone() for g in _grad_buffers(tm)]
    assert state and grads
    with caplog.at_level(logging.INFO, logger="r1mega.train.memory"):
        for _ in range(2):
            offload(tm)
            assert not is_offloaded(tm)
            onload(tm)
    assert [r.getMessage() for r in caplog.records if r.name == "r1mega.train.memory"] == [
        "learner memory handoff: CPU run, offload/onload keep megatron's buffers in place (no-op)"]
    assert all(torch.equal(a, b) for a, b in zip(state, _adam_state(tm)))
    assert all(torch.equal(a, b) for a, b in zip(grads, _grad_buffers(tm)))
    assert handoff_bytes(tm).total == 0
    assert lm_train_step(tm, _tokens(model, 1), 2).grad_norm > 0


@on_gpu_in_both_precisions
def test_offload_frees_the_grad_buffers_and_optimizer_state(single_process_megatron, precision):
    from r1mega.train.lm_step import lm_train_step
    from r1mega.train.memory import handoff_bytes, is_offloaded, offload, onload

    tm, model = _build(precision)
    assert lm_train_step(tm, _tokens(model, 0), 2).grad_norm > 0  # Adam's moments exist after a step
    grads = sum(g.nbytes for g in _grad_buffers(tm))
    adam = sum(t.nbytes for t in _adam_state(tm))
    mains = sum(p.nbytes for o in _optimizers(tm) for g in getattr(o, "shard_fp32_from_float16_groups", [])
                for p in g if p is not None)
    assert grads > 0 and adam > 0 and (mains > 0) == (precision == "bf16")
    expected = grads + adam + mains
    assert expected <= handoff_bytes(tm).total <= expected + 4096  # (+ a CUDA step counter, if any)
    weights = {n: p.detach().clone() for n, p in tm.module.named_parameters()}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    offload(tm)
    offloaded = torch.cuda.memory_allocated()
    assert is_offloaded(tm)
    freed = before - offloaded
    print(f"{precision}: offload freed {freed} of {expected} bytes (grads {grads}, adam {adam}, main params {mains})")
    assert freed >= 0.9 * expected, (freed, expected)
    assert all(g.untyped_storage().nbytes() == 0 for g in _grad_buffers(tm))
    # the weights stay on the device (the weight sync reads them next)
    for name, p in tm.module.named_parameters():
        assert p.is_cuda and p.untyped_storage().nbytes() > 0 and torch.equal(p.detach(), weights[name]), name
    onload(tm)
    assert not is_offloaded(tm) and torch.cuda.memory_allocated() - offloaded >= 0.9 * expected
    assert all(torch.count_nonzero(g) == 0 for g in _grad_buffers(tm))
    assert lm_train_step(tm, _tokens(model, 1), 2).grad_norm > 0


@on_gpu_in_both_precisions
def test_training_after_an_offload_cycle_is_bit_identical(single_process_megatron, precision):
    from r1mega.train.lm_step import lm_train_step
    from r1mega.train.memory import offload, onload, optimizer_tensors

    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        cycled, model = _build(precision)
        plain, _ = _build(precision)
        for step in range(4):
            a = lm_train_step(cycled, _tokens(model, step), 2)
            b = lm_train_step(plain, _tokens(model, step), 2)
            assert (a.loss, a.grad_norm) == (b.loss, b.grad_norm), (step, a, b)
            moved = [(t.shape, t.dtype) for t in optimizer_tensors(cycled)]
            assert moved
            offload(cycled)
            # what an engine does with the memory: overwrite it. Blocks of these sizes are what onload's
            # allocations reuse next, so a state tensor that is not copied back reads NaN.
            junk = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for shape, dtype in moved]
            del junk
            onload(cycled)
        for (name, p), q in zip(cycled.module.named_parameters(), plain.module.parameters()):
            assert torch.equal(p, q), name
        for x, y in zip(_adam_state(cycled), _adam_state(plain)):
            assert torch.equal(x, y)
    finally:
        torch.use_deterministic_algorithms(False)
