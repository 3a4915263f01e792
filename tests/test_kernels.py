"""Compiled ops from csrc/ (C++ on CPU, CUDA on GPUs) against their pure-torch references."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from r1mega.kernels import extension
from r1mega.kernels.fp8_blockwise import (
    FP8,
    dequantize_blockwise,
    dequantize_blockwise_torch,
    quantize_blockwise,
    quantize_blockwise_torch,
)
from r1mega.platform.spawn import spawn_ranks
from r1mega.rl.vocab_parallel import VocabShard, logprob_and_entropy

gpu = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def built_ops():
    state = extension.load_ops()
    assert state["available"], f"the C++ ops must build on this machine: {state['error']}"
    return state


def _case(T, H, V, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen, dtype=torch.float64).to(device, dtype)
    weight = (torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.5).to(device, dtype)
    target = torch.randint(0, V, (T,), generator=gen).to(device)
    g = torch.randn(2, T, generator=gen, dtype=torch.float64).to(device)
    return hidden, weight, target, g


def _run(impl, hidden, weight, target, g, shard, temperature, chunk, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    if impl == "naive":  # full [T, V] logits in the inputs' dtype
        logits = (h @ w.t()) / temperature
        logp_all = torch.log_softmax(logits[:, : shard.valid_vocab], dim=-1)
        lp, ent = logp_all.gather(1, target[:, None]).squeeze(1), -(logp_all.exp() * logp_all).sum(-1)
    else:
        lp, ent = logprob_and_entropy(h, w, target, shard, temperature, chunk, impl=impl, **kw)
    (lp * g[0].to(lp.dtype) + ent * g[1].to(ent.dtype)).sum().backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


@pytest.mark.parametrize("valid_vocab", [None, 90])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_cpu_op_matches_full_logits_float64(valid_vocab, chunk, temperature):
    hidden, weight, target, g = _case(37, 16, 100, torch.float64)
    target = target % 90
    shard = VocabShard(0, 100, None, valid_vocab)
    ext = _run("ext", hidden, weight, target, g, shard, temperature, chunk)
    ref = _run("naive", hidden, weight, target, g, shard, temperature, chunk)
    for a, b in zip(ext, ref):
        torch.testing.assert_close(a, b.to(a.dtype), atol=1e-10, rtol=1e-10)
    if valid_vocab is not None:
        assert ext[3][valid_vocab:].abs().max() == 0  # padded rows get no gradient


def test_cpu_op_tiles_the_vocabulary():
    """A vocab chunk smaller than the vocabulary exercises the online-softmax merge across tiles."""
    from r1mega.kernels.fused_logprob import fused_logprob_and_entropy

    hidden, weight, target, g = _case(19, 8, 53, torch.float64)
    shard = VocabShard(0, 53)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = fused_logprob_and_entropy(h, w, target, shard, 53, 0.9, token_chunk=4, vocab_chunk=5)
    (lp * g[0] + ent * g[1]).sum().backward()
    ref = _run("naive", hidden, weight, target, g, shard, 0.9, 4)
    for a, b in zip((lp.detach(), ent.detach(), h.grad, w.grad), ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_a_single_block_kept_for_backward_gives_the_recomputed_values_bit_for_bit(dtype, temperature):
    """One block (tokens <= token_chunk, vocabulary <= vocab_chunk: the demo's 512): the forward keeps its
    logits and the backward turns them into the gradient, one GEMM fewer. The forward equals the op's without
    a gradient, and the gradients equal a second backward's, which recomputes the block, bit for bit."""
    from torch.profiler import ProfilerActivity, profile

    from r1mega.kernels.fused_logprob import fused_logprob_and_entropy

    hidden, weight, target, g = _case(37, 16, 100, dtype)
    target = target % 90
    shard = VocabShard(0, 100, None, 90)  # padded vocabulary rows too
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        lp, ent = fused_logprob_and_entropy(h, w, target, shard, 90, temperature)
        loss = (lp * g[0].to(lp.dtype) + ent * g[1].to(ent.dtype)).sum()
        kept = torch.autograd.grad(loss, (h, w), retain_graph=True)
    ops = {e.name for e in prof.events()}
    assert {"r1mega::fused_logprob_block_forward", "r1mega::fused_logprob_block_backward"} <= ops
    assert not {"r1mega::fused_logprob_forward", "r1mega::fused_logprob_backward"} & ops
    recomputed = torch.autograd.grad(loss, (h, w))
    for a, b in zip(kept, recomputed):
        assert torch.equal(a, b)
    assert kept[1][90:].abs().max() == 0
    with torch.no_grad():
        lp0, ent0 = fused_logprob_and_entropy(hidden, weight, target, shard, 90, temperature)
    assert torch.equal(lp.detach(), lp0) and torch.equal(ent.detach(), ent0)
    with pytest.raises(RuntimeError, match="expected the forward's contiguous"):
        torch.ops.r1mega.fused_logprob_block_backward(torch.zeros(100, 37, dtype=dtype).t(), hidden, weight, target, 0,
                                                     *(torch.zeros(37, dtype=dtype),) * 4, 1.0)


def test_cpu_op_float32_and_bfloat16_agree_with_torch_fallback():
    hidden, weight, target, g = _case(64, 32, 500, torch.float32)
    shard = VocabShard(0, 500)
    ext = _run("ext", hidden, weight, target, g, shard, 1.0, 16)
    fallback = _run("torch", hidden, weight, target, g, shard, 1.0, 16)
    for a, b in zip(ext, fallback):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    ext_bf16 = _run("ext", hb, wb, target, g, shard, 1.0, 16)
    fallback_bf16 = _run("torch", hb, wb, target, g, shard, 1.0, 16)
    assert ext_bf16[2].dtype == torch.bfloat16 and ext_bf16[0].dtype == torch.float32
    for a, b in zip(ext_bf16, fallback_bf16):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_cpu_op_rejects_bad_shapes():
    with pytest.raises(RuntimeError, match="hidden size 4 != weight's 5"):
        torch.ops.r1mega.fused_logprob_forward(torch.zeros(2, 4), torch.zeros(3, 5), torch.zeros(2, dtype=torch.long),
                                               0, 1.0, 8, 8)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("impl", ["ext", "torch"])
def test_tp2_matches_single_process(tmp_path, impl):
    out = tmp_path / "err"
    spawn_ranks([str(Path(__file__).with_name("vocab_parallel_worker.py")), str(out), impl], world_size=2,
                timeout_s=150, name=f"vocab-parallel-{impl}")
    for rank in range(2):
        err = json.loads(Path(f"{out}.{rank}").read_text())
        assert max(err.values()) < 1e-5, err  # the reference computes in float32


@pytest.mark.parametrize("shape", [(256, 384), (130, 257), (1, 1), (0, 5)])
def test_fp8_cpu_op_is_bit_identical_to_torch(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 3
    if w.numel():
        w[: min(128, shape[0]), : min(128, shape[1])] = 0.0  # an all-zero block: scale stays finite
    q, s = quantize_blockwise(w)
    q_ref, s_ref = quantize_blockwise_torch(w)
    assert q.dtype == FP8 and q.shape == w.shape
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    back = dequantize_blockwise(q, s, dtype=torch.bfloat16)
    assert back.dtype == torch.bfloat16
    assert torch.equal(back, dequantize_blockwise_torch(q_ref, s_ref, dtype=torch.bfloat16))
    if w.numel() and w.abs().max() > 0:
        err = (dequantize_blockwise(q, s) - w).abs().max() / w.abs().max()
        assert err < 0.07  # e4m3 keeps 3 mantissa bits


def test_fp8_errors_name_the_problem():
    with pytest.raises(ValueError, match="2-D"):
        quantize_blockwise(torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        dequantize_blockwise(torch.zeros(2, 2), torch.ones(1, 1))


def test_mode_torch_forces_the_fallback_and_logs_it(monkeypatch, caplog):
    monkeypatch.setenv("R1MEGA_KERNELS", "torch")
    monkeypatch.setattr(extension, "_state", {})
    monkeypatch.setattr(extension, "_logged", set())
    with caplog.at_level(logging.INFO, logger="r1mega.kernels.extension"):
        assert extension.ops_for(torch.device("cpu")) is False
        extension.ops_for(torch.device("cpu"))
    lines = [r.getMessage() for r in caplog.records if "pure-torch fallback" in r.getMessage()]
    assert len(lines) == 1 and "R1MEGA_KERNELS=torch" in lines[0]


def test_mode_ext_without_sources_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("R1MEGA_KERNELS", "ext")
    monkeypatch.setattr(extension, "_state", {})
    monkeypatch.setattr(extension, "CSRC", tmp_path / "nowhere")
    with pytest.raises(extension.KernelBuildError, match="did not build.*nowhere"):
        extension.load_ops()


def test_a_lock_left_by_a_killed_build_is_cleared(tmp_path, caplog):
    """torch waits forever on a ``lock`` file; one left by a killed build must not hang later builds."""
    (tmp_path / "lock").touch()
    with caplog.at_level(logging.WARNING, logger="r1mega.kernels.extension"):
        with extension.exclusive_build(tmp_path):
            assert not (tmp_path / "lock").exists()
    assert "did not finish" in caplog.text


def test_a_live_build_is_waited_for_not_cleared(tmp_path, caplog):
    """While another process holds the build, its ``lock`` file is its own: wait, never delete it."""
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, pathlib, time
d = pathlib.Path({str(tmp_path)!r})
with open(d / "r1mega-build.flock", "w") as h:
    fcntl.flock(h, fcntl.LOCK_EX)
    (d / "lock").touch(); (d / "ready").touch()
    time.sleep(1.5)
    (d / "lock").unlink()
"""])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ready").exists():
            assert holder.poll() is None and time.monotonic() < deadline, "the holder process did not start"
            time.sleep(0.02)
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="r1mega.kernels.extension"):
            with extension.exclusive_build(tmp_path):
                waited = time.monotonic() - t0
        assert waited > 1.0, f"entered the build after {waited:.2f}s, while another process held it"
        assert "did not finish" not in caplog.text
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_load_ops_does_not_hang_on_a_stale_lock(built_ops):
    """End to end: a fresh process loads the cached ops although a killed build left its lock file."""
    name = "r1mega_ops_cuda" if built_ops["cuda"] else "r1mega_ops_cpu"
    name += "_avx2" if extension._cpu_vector_flags() else ""
    (extension.build_directory(name) / "lock").touch()
    out = subprocess.run([sys.executable, "-m", "r1mega.kernels.build"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not (extension.build_directory(name) / "lock").exists()


def test_bad_mode_is_rejected(monkeypatch):
    monkeypatch.setenv("R1MEGA_KERNELS", "fast")
    with pytest.raises(ValueError, match="R1MEGA_KERNELS='fast'"):
        extension.mode()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_op_matches_torch(built_ops, dtype):
    assert built_ops["cuda"], "CUDA is available but the CUDA ops did not build"
    hidden, weight, target, g = _case(300, 64, 40000, dtype, device="cuda")
    shard = VocabShard(0, 40000, None, 39990)
    target = target % 39990
    ext = _run("ext", hidden, weight, target, g, shard, 0.8, 128)
    ref = _run("torch", hidden, weight, target, g, shard, 0.8, 128)
    tol = 1e-3 if dtype == torch.float32 else 3e-2  # fp32: summation order over 40k columns
    for a, b in zip(ext, ref):
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)
    assert ext[3][39990:].abs().max() == 0


@gpu
@needs_cuda
def test_cuda_fp8_matches_torch(built_ops):
    w = torch.randn(1000, 777, device="cuda") * 2
    q, s = quantize_blockwise(w)
    q_ref, s_ref = quantize_blockwise_torch(w)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    assert torch.equal(dequantize_blockwise(q, s), dequantize_blockwise_torch(q, s))
