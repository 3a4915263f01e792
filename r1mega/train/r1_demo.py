"""The R1 CPU demo (``r1mega demo``): tiny MoE policy -> eval -> cold-start SFT -> eval -> GRPO -> eval.

Task: synthetic multi-digit addition in the R1 chat format. A byte-level BPE tokenizer (digits kept
apart, R1 tags as single tokens) is trained offline on the demonstrations. The rollout engine is a
vLLM(-CPU) child process on rank 0, started from the bridge's HF export of the initial weights and
refit after every optimizer step. ``eval/pass@1`` = mean accuracy over ``k`` temperature samples
per held-out prompt (``r1mega.train.evaluate``, which also gives cons@k).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch.distributed as dist

from r1mega.config.schema import R1Config
from r1mega.data.tasks import task_splits

log = logging.getLogger(__name__)

R1_MARKERS = ("<｜User｜>", "<｜Assistant｜>")


def build_tokenizer(out_dir: Path, examples, vocab_size: int) -> Path:
    """Train a byte-level BPE (individual digits; specials, R1 tags and chat markers atomic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from r1mega.data.tokenizer_training import SPECIALS, TAGS
    from r1mega.train.sft import r1_completion, render

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*SPECIALS, *TAGS, *R1_MARKERS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([render(e.prompt) + r1_completion(e.prompt, e.answer) for e in examples], trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=1))
    return out_dir


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def make_prompts(examples, tokenizer):
    from r1mega.train.grpo import Prompt
    from r1mega.train.sft import render

    return [Prompt.of(e, render(e.prompt), tokenizer.encode(render(e.prompt), add_bos=True)) for e in examples]


def eval_problems(examples, tokenizer):
    """Held-out problems rendered as the demo trains on them (R1 chat prompt, ``<think>`` prefilled)."""
    from r1mega.train.evaluate import EvalProblem
    from r1mega.train.sft import render

    return [EvalProblem(e, render(e.prompt), tokenizer.encode(render(e.prompt), add_bos=True)) for e in examples]


def set_lr(tm, lr: float) -> None:
    """Switch the (constant-after-warmup) learning rate between stages."""
    sched = tm.scheduler
    sched.max_lr = sched.min_lr = lr
    for group in tm.optimizer.param_groups:
        for key in ("max_lr", "min_lr"):
            if key in group:
                group[key] = lr
    sched.step(increment=0)


def run_r1_demo(cfg: R1Config, sft_steps: int = 150, sft_lr: float = 2e-3, eval_prompts: int = 64,
                eval_k: int = 4, digits: int = 2) -> dict:
    """Every rank calls this; returns the summary (written to ``<output_dir>/summary.json`` by rank 0).

    GRPO runs ``trainer.steps`` steps of ``trainer.global_batch_size`` responses
    (``global_batch_size / rollout.n`` prompts) at ``optimizer.lr``; cold-start SFT runs ``sft_steps``
    steps of the same batch size at ``sft_lr``. Checkpoints (``checkpoint.*``) cover both stages; a
    run that finds one in its checkpoint directory continues from it (``checkpoint.resume=auto``), and
    SIGTERM/SIGUSR1 end it after the current step with a checkpoint (``TrainingPreempted``).
    """
    if cfg.rollout.mode != "colocated":
        raise ValueError(f"the demo runs colocated rollouts; rollout.mode={cfg.rollout.mode!r} is not wired into it: "
                         "drop the override (one_step_off: see r1mega.train.offpolicy)")
    from r1mega.models.policy import padded_vocab_size  # noqa: F401  (readies megatron)
    from r1mega.platform.distributed import init_model_parallel, init_process_group, shutdown
    from r1mega.train.resilience import StopSignal, TrainingPreempted

    with StopSignal() as stop:  # installed first: engine start-up and SFT take a while
        env = init_process_group(timeout_minutes=cfg.parallel.timeout_minutes)
        init_model_parallel(cfg.parallel, seed=cfg.model.seed)
        try:
            summary = _run_stages(cfg, env, stop, sft_steps, sft_lr, eval_prompts, eval_k, digits)
        except TrainingPreempted:
            shutdown()
            raise
    shutdown()
    return summary


def _run_stages(cfg: R1Config, env, stop, sft_steps: int, sft_lr: float, eval_prompts: int, eval_k: int,
                digits: int) -> dict:
    from r1mega.bridge.hf_dir import save_hf
    from r1mega.data.tokenizer import HFTokenizer
    from r1mega.rewards import RewardComputer
    from r1mega.train.evaluate import eval_sampling, evaluate_collective, judge_config
    from r1mega.train.grpo import refit, run_grpo
    from r1mega.train.metrics import MetricsLogger, run_summary
    from r1mega.train.model_setup import build_training_model
    from r1mega.train.resilience import Checkpointer
    from r1mega.train.rewarders import TrainingRewarder
    from r1mega.train.sft import build_rows, eval_loss, run_sft

    t_start = time.monotonic()
    out = Path(cfg.trainer.output_dir)
    metrics_path = out / "metrics.jsonl"
    steps = dict(sft=sft_steps, grpo=cfg.trainer.steps)
    train, held_out = task_splits("addition", 4000, seed=cfg.data.seed, eval_fraction=0.1, digits=digits)
    tok_dir = out / "tokenizer"
    tm = build_training_model(cfg.model, cfg.parallel, cfg.optimizer,
                              total_steps=steps["sft"] + steps["grpo"])
    ckpt = Checkpointer(cfg, tm, metrics_path, stop)
    resume_path = ckpt.resume_path()
    if env.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if resume_path is None or not (tok_dir / "tokenizer.json").is_file():
            if resume_path is not None:
                log.warning("resuming, but %s has no tokenizer.json: training a new one", tok_dir)
            build_tokenizer(tok_dir, train, cfg.model.vocab_size)
    dist.barrier()
    tokenizer = HFTokenizer(tok_dir)
    save_hf(tm.module, tm.config, cfg.model, out / "hf_init", tokenizer_dir=tok_dir)
    # loading truncates metrics.jsonl to the checkpoint's lines; the logger then appends after them
    resume = ckpt.load(resume_path) if resume_path is not None else None
    stage = resume["stage"] if resume is not None else None
    rs = ckpt.run_state  # results of finished stages; saved in every checkpoint
    bucket_bytes = int(cfg.rollout.refit_bucket_mb * 2**20)
    metrics = MetricsLogger(out, cfg.logging, rank=env.rank, log_interval=cfg.trainer.log_interval,
                            run_config={"sft_steps": sft_steps, "sft_lr": sft_lr, "eval_k": eval_k},
                            append=resume is not None)

    engine, rewarder, judge = None, None, None
    if env.rank == 0:
        from r1mega.rollout import build_engine

        engine = build_engine(out / "hf_init", cfg.rollout, in_process=False,
                              env={"VLLM_CACHE_ROOT": str(out / "vllm-cache"), "OMP_NUM_THREADS": "1"})
        rewarder = TrainingRewarder(cfg.reward, cfg.rollout.max_new_tokens)
        judge = RewardComputer(judge_config(cfg.reward, ["arithmetic"]))

    eval_set = eval_problems(held_out[:eval_prompts], tokenizer)
    k = eval_k
    sampling = eval_sampling(cfg, tokenizer, seed=12345)

    def evaluate(tag: str, step: int = 0) -> dict:
        r = evaluate_collective(engine, judge, eval_set, k, sampling, tokenizer, cfg.reward.math_timeout_s)
        # an eval inside GRPO step `step` runs after that step's update: same global step as its record
        metrics.log({"stage": "eval", "step": step, "when": tag, **r,
                     "global_step": metrics.global_step + (tag == "grpo")})
        if env.rank == 0:
            log.info("eval (%s): pass@1 %.3f format %.3f", tag, r["eval/pass@1"], r["eval/format"])
        return r

    summary: dict = {"world_size": env.world_size}
    try:
        if resume is not None:  # the engine started from the initial weights: give it the checkpoint's
            refit(engine, tm, cfg.model, bucket_bytes, "refit after resume")
        rows = build_rows(train, tokenizer, cfg.model.seq_length, multiple=cfg.parallel.tp)
        eval_rows = build_rows(held_out[:64], tokenizer, cfg.model.seq_length, multiple=cfg.parallel.tp)
        mbs = cfg.parallel.micro_batch_size
        if stage is None:
            metrics.start_stage("cold_start_sft", steps["sft"])
            rs["before_sft"] = evaluate("before_sft")
            rs["sft_loss_before"] = eval_loss(tm, eval_rows, mbs, cfg.model.vocab_size)
            set_lr(tm, sft_lr)
        if stage in (None, "sft"):
            if stage == "sft":
                metrics.start_stage("cold_start_sft", steps["sft"] - resume["stage_step"])
            t0 = time.monotonic()
            run_sft(tm, rows, steps=steps["sft"], global_batch_size=cfg.trainer.global_batch_size,
                    micro_batch_size=mbs, valid_vocab=cfg.model.vocab_size, seed=cfg.data.seed, on_step=metrics.log,
                    ckpt=ckpt, resume=resume if stage == "sft" else None,
                    skip_nonfinite=cfg.trainer.skip_nonfinite_loss)
            rs["sft_loss_after"] = eval_loss(tm, eval_rows, mbs, cfg.model.vocab_size)
            refit(engine, tm, cfg.model, bucket_bytes, "refit after SFT")
            rs["time_sft"] = time.monotonic() - t0
            rs["after_sft"] = evaluate("after_sft", 0)
            set_lr(tm, cfg.optimizer.lr)
        done_grpo = resume["stage_step"] if stage == "grpo" else 0
        metrics.start_stage("grpo", steps["grpo"] - done_grpo)
        t0 = time.monotonic()
        prompts_per_step = max(1, cfg.trainer.global_batch_size // cfg.rollout.n)
        run_grpo(cfg, tm, engine, tokenizer, make_prompts(train, tokenizer), steps=steps["grpo"],
                 prompts_per_step=prompts_per_step, out_dir=out, rewarder=rewarder,
                 evaluate=lambda step: evaluate("grpo", step), ckpt=ckpt,
                 resume=resume if stage == "grpo" else None, metrics=metrics)
        t_grpo = time.monotonic() - t0
        after_grpo = evaluate("after_grpo", steps["grpo"])
        # metrics.records holds the earlier runs' lines too when resumed (read back from metrics.jsonl)
        summary.update(run_summary(metrics.records, time.monotonic() - t_start))
        before, after_sft = rs["before_sft"], rs["after_sft"]
        summary.update({
            "eval/pass@1_before_sft": before["eval/pass@1"], "eval/pass@1_after_sft": after_sft["eval/pass@1"],
            "eval/pass@1_after_grpo": after_grpo["eval/pass@1"],
            "eval/format_after_sft": after_sft["eval/format"], "eval/format_after_grpo": after_grpo["eval/format"],
            "sft/eval_loss_before": rs["sft_loss_before"], "sft/eval_loss_after": rs["sft_loss_after"],
            "sft_steps": steps["sft"], "grpo_steps": steps["grpo"], "eval_k": k, "eval_prompts": len(eval_set),
            "time/sft": rs["time_sft"], "time/grpo": t_grpo, "seconds": time.monotonic() - t_start,
            "resumed_from": str(resume_path) if resume_path is not None else None,
        })
        summary.setdefault("grpo/reward_first_20pct", 0.0)
        summary.setdefault("grpo/reward_last_20pct", 0.0)
        summary = metrics.finish(summary)
    finally:
        metrics.close()
        if engine is not None:
            engine.close()
        if rewarder is not None:
            rewarder.close()
        if judge is not None:
            judge.close()
    return summary
