"""Rank program for the R3 acceptance test (run through ``spawn_ranks``; EP2 = 2 gloo ranks).

    python tests/routing_replay_worker.py <json spec>

Both ranks build a tiny Qwen3-MoE in ``layout`` and write it as an HF directory; rank 0 starts a
vLLM-CPU engine on it (child process, ``return_routed_experts``, engine dtype ``engine_dtype``) and
samples a probe batch; the rollouts (tokens, sampling log-probs, routed experts) go to every rank and
become a ``LearnerBatch`` through the GRPO loop's ``build_batch``. Then the old-logprob pass runs
twice: without replay and with R3. Router forward hooks record the experts every forward actually
used. Rank 0 writes ``report`` (json): routing disagreement before replay, experts used under R3 vs
the engine's, and |learner - engine| log-prob mismatch on the response tokens without and with replay.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main(spec: dict) -> None:
    import torch
    import torch.distributed as dist
    from rollout_common import learner_with_hf_start

    tm, model_cfg, parallel, rank, root = learner_with_hf_start(spec, spec["micro_batch_size"], timeout_minutes=4)

    from r1mega.platform.distributed import broadcast_from_rank0
    from r1mega.rl.advantages import compute_advantages
    from r1mega.rl.learner import LearnerSettings, score_with_routing
    from r1mega.rl.mismatch import mismatch_metrics
    from r1mega.rl.routing import routing_mismatch_metrics
    from r1mega.rollout import SamplingSpec
    from r1mega.train.grpo import build_batch

    from megatron.core.transformer.moe.router import TopKRouter

    rollout = None
    if rank == 0:
        from r1mega.rollout.vllm_engine import EngineProcess

        engine = EngineProcess(root / "w0", seed=0, dtype=spec["engine_dtype"], return_routed_experts=True,
                               env={"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"})
        gen = torch.Generator().manual_seed(5)
        prompts = [torch.randint(3, model_cfg.vocab_size, (n,), generator=gen).tolist() for n in spec["prompt_lengths"]]
        sampling = SamplingSpec(max_new_tokens=spec["max_new_tokens"], seed=11, ignore_eos=True)
        rollout = [g for row in engine.generate(prompts, spec["n"], sampling) for g in row]
        engine.close()
    gens = broadcast_from_rank0(rollout)
    batch = build_batch(gens, 0)
    batch.advantages = compute_advantages("grpo", torch.tensor([float(i % 2) for i in range(len(gens))]),
                                          torch.arange(len(gens)) // spec["n"])
    settings = LearnerSettings(micro_batch_size=spec["micro_batch_size"], valid_vocab=model_cfg.vocab_size)
    mask = batch.loss_mask

    used: list = []  # (layer number, routing map) of every router forward on this rank, in call order

    def hook(mod, args, out):
        used.append((mod.layer_number, out[1].detach().clone()))

    handles = [m.register_forward_hook(hook) for m in tm.module.modules() if isinstance(m, TopKRouter)]
    report = {"layout": spec["layout"], "engine_dtype": spec["engine_dtype"], "samples": len(gens),
              "response_tokens": int(mask.sum())}
    for name, replay in (("none", None), ("r3", batch.rollout_experts)):
        batch.replay_experts = replay
        used.clear()
        logp, record = score_with_routing(tm.ddp, tm.module, batch, settings, compare_to=batch.rollout_experts)
        mm = mismatch_metrics(logp, batch.rollout_logp, mask)
        report[name] = {"logp_abs_mean": float(mm["mismatch_abs_mean"]), "logp_abs_max": float(mm["mismatch_abs_max"]),
                        **routing_mismatch_metrics(record.differs, mask, record.num_layers),
                        "used_vs_engine": _used_vs_engine(used, batch, settings, tm.config)}
    for h in handles:
        h.remove()
    if rank == 0:
        Path(spec["report"]).write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def _used_vs_engine(used, batch, settings, config) -> dict:
    """Positions x layers where the experts a forward dispatched to differ from the engine's (all ranks)."""
    import torch
    import torch.distributed as dist

    from r1mega.models.routing_replay import moe_layer_numbers
    from r1mega.rl.learner import _dp_slice

    rows = _dp_slice(batch.size)
    mbs, k = settings.micro_batch_size, config.moe_router_topk
    column = {n: i for i, n in enumerate(moe_layer_numbers(config))}
    per_layer: dict[int, list] = {}
    for number, rmap in used:
        per_layer.setdefault(number, []).append(rmap)
    differ = total = 0
    for number, maps in per_layer.items():
        for mb, rmap in enumerate(maps):  # one router call per micro-batch, in order
            start = rows.start + mb * mbs
            want = batch.rollout_experts[start: start + mbs, :, column[number]].long()  # [b, s, k]
            got = torch.stack([r.nonzero()[:, 0] for r in rmap]).reshape(want.size(1), want.size(0), k)
            response = batch.loss_mask[start: start + mbs] > 0
            differ += int(((got.transpose(0, 1).sort(-1).values != want.sort(-1).values).any(-1) & response).sum())
            total += int(response.sum())
    t = torch.tensor([differ, total], dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return {"differing": int(t[0]), "checked": int(t[1])}


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
