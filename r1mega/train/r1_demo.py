"""The R1 CPU demo (``r1mega demo``): tiny MoE policy -> eval -> cold-start SFT -> eval -> GRPO -> eval.

Task: synthetic multi-digit addition in the R1 chat format. A byte-level BPE tokenizer (digits kept
apart, R1 tags as single tokens) is trained offline on the demonstrations. The rollout engine is a
vLLM(-CPU) child process on rank 0, started from the bridge's HF export of the initial weights and
refit after every optimizer step. ``eval/pass@1`` = mean accuracy over ``k`` temperature samples
per held-out prompt.
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

    return [Prompt(tokenizer.encode(render(e.prompt), add_bos=True), render(e.prompt), e.answer, e.data_source)
            for e in examples]


def pass_at_1(engine, rewarder, prompts, k: int, cfg: R1Config, tokenizer, seed: int) -> dict:
    """Collective: rank 0 samples ``k`` responses per prompt; accuracy / format means on every rank."""
    from r1mega.platform.distributed import broadcast_from_rank0
    from r1mega.rollout import SamplingSpec

    out = None
    if engine is not None:
        from r1mega.rewards import RewardInput

        sampling = SamplingSpec.from_config(cfg.rollout, seed=seed, stop_token_ids=[tokenizer.eos_id])
        gens = [g for row in engine.generate([p.ids for p in prompts], k, sampling) for g in row]
        samples = [RewardInput(tokenizer.decode([t for t in g.token_ids if t != tokenizer.eos_id]),
                               prompts[g.prompt_index].answer, prompts[g.prompt_index].data_source,
                               prompts[g.prompt_index].text) for g in gens]
        results = rewarder.compute(samples)
        acc = [r.terms.get("accuracy", 0.0) for r in results]
        fmt = [r.terms.get("format", 0.0) for r in results]
        out = {"eval/pass@1": sum(acc) / len(acc), "eval/format": sum(fmt) / len(fmt),
               "eval/response_len": sum(len(g.token_ids) for g in gens) / len(gens)}
    return broadcast_from_rank0(out)


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
    steps of the same batch size at ``sft_lr``.
    """
    if cfg.rollout.mode != "colocated":
        raise ValueError(f"the demo runs colocated rollouts; rollout.mode={cfg.rollout.mode!r} is not wired into it: "
                         "drop the override (one_step_off: see r1mega.train.offpolicy)")
    from r1mega.models.policy import padded_vocab_size  # noqa: F401  (readies megatron)
    from r1mega.platform.distributed import init_model_parallel, init_process_group, shutdown

    env = init_process_group(timeout_minutes=cfg.parallel.timeout_minutes)
    init_model_parallel(cfg.parallel, seed=cfg.model.seed)

    from r1mega.bridge.hf_dir import save_hf
    from r1mega.data.tokenizer import HFTokenizer
    from r1mega.rewards import RewardComputer
    from r1mega.train.grpo import run_grpo
    from r1mega.train.model_setup import build_training_model
    from r1mega.train.sft import build_rows, eval_loss, run_sft

    t_start = time.monotonic()
    out = Path(cfg.trainer.output_dir)
    metrics_path = out / "metrics.jsonl"
    steps = dict(sft=sft_steps, grpo=cfg.trainer.steps)
    train, held_out = task_splits("addition", 4000, seed=cfg.data.seed, eval_fraction=0.1, digits=digits)
    tok_dir = out / "tokenizer"
    if env.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("")
        build_tokenizer(tok_dir, train, cfg.model.vocab_size)
    dist.barrier()
    tokenizer = HFTokenizer(tok_dir)
    tm = build_training_model(cfg.model, cfg.parallel, cfg.optimizer,
                              total_steps=steps["sft"] + steps["grpo"])
    save_hf(tm.module, tm.config, cfg.model, out / "hf_init", tokenizer_dir=tok_dir)

    engine, rewarder = None, None
    if env.rank == 0:
        from r1mega.rollout import build_engine

        engine = build_engine(out / "hf_init", cfg.rollout, in_process=False,
                              env={"VLLM_CACHE_ROOT": str(out / "vllm-cache"), "OMP_NUM_THREADS": "1"})
        rewarder = RewardComputer(cfg.reward, cfg.rollout.max_new_tokens)

    def log_record(record: dict) -> None:
        if env.rank == 0:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    eval_set = make_prompts(held_out[:eval_prompts], tokenizer)
    k = eval_k

    def evaluate(tag: str, step: int = 0) -> dict:
        r = pass_at_1(engine, rewarder, eval_set, k, cfg, tokenizer, seed=12345)
        log_record({"stage": "eval", "step": step, "when": tag, **r})
        if env.rank == 0:
            log.info("eval (%s): pass@1 %.3f format %.3f", tag, r["eval/pass@1"], r["eval/format"])
        return r

    from r1mega.train.grpo import refit

    summary: dict = {"world_size": env.world_size}
    try:
        before = evaluate("before_sft")
        rows = build_rows(train, tokenizer, cfg.model.seq_length, multiple=cfg.parallel.tp)
        eval_rows = build_rows(held_out[:64], tokenizer, cfg.model.seq_length, multiple=cfg.parallel.tp)
        mbs = cfg.parallel.micro_batch_size
        sft_loss_before = eval_loss(tm, eval_rows, mbs, cfg.model.vocab_size)
        t0 = time.monotonic()
        set_lr(tm, sft_lr)
        run_sft(tm, rows, steps=steps["sft"], global_batch_size=cfg.trainer.global_batch_size, micro_batch_size=mbs,
                valid_vocab=cfg.model.vocab_size, seed=cfg.data.seed, on_step=log_record)
        sft_loss_after = eval_loss(tm, eval_rows, mbs, cfg.model.vocab_size)
        refit(engine, tm, cfg.model, int(cfg.rollout.refit_bucket_mb * 2**20))
        t_sft = time.monotonic() - t0
        after_sft = evaluate("after_sft", 0)
        set_lr(tm, cfg.optimizer.lr)
        t0 = time.monotonic()
        prompts_per_step = max(1, cfg.trainer.global_batch_size // cfg.rollout.n)
        result = run_grpo(cfg, tm, engine, tokenizer, make_prompts(train, tokenizer), steps=steps["grpo"],
                          prompts_per_step=prompts_per_step, out_dir=out, rewarder=rewarder,
                          evaluate=lambda step: evaluate("grpo", step))
        t_grpo = time.monotonic() - t0
        after_grpo = evaluate("after_grpo", steps["grpo"])
        hist = result["history"]
        fifth = max(1, len(hist) // 5)
        summary.update({
            "eval/pass@1_before_sft": before["eval/pass@1"], "eval/pass@1_after_sft": after_sft["eval/pass@1"],
            "eval/pass@1_after_grpo": after_grpo["eval/pass@1"],
            "eval/format_after_sft": after_sft["eval/format"], "eval/format_after_grpo": after_grpo["eval/format"],
            "sft/eval_loss_before": sft_loss_before, "sft/eval_loss_after": sft_loss_after,
            "grpo/reward_first_20pct": sum(h["reward/mean"] for h in hist[:fifth]) / fifth if hist else 0.0,
            "grpo/reward_last_20pct": sum(h["reward/mean"] for h in hist[-fifth:]) / fifth if hist else 0.0,
            "sft_steps": steps["sft"], "grpo_steps": steps["grpo"], "eval_k": k, "eval_prompts": len(eval_set),
            "time/sft": t_sft, "time/grpo": t_grpo, "seconds": time.monotonic() - t_start,
        })
        if env.rank == 0:
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            plot(metrics_path, out / "curves.png")
    finally:
        if engine is not None:
            engine.close()
        if rewarder is not None:
            rewarder.close()
    shutdown()
    return summary


def plot(metrics_path: Path, png: Path) -> None:
    """Reward and eval curves (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    grpo = [r for r in rows if r["stage"] == "grpo"]
    evals = [r for r in rows if r["stage"] == "eval" and r["when"] != "before_sft"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in grpo], [r["reward/mean"] for r in grpo], label="train reward (mean)")
    ax.plot([r["step"] for r in evals], [r["eval/pass@1"] for r in evals], "o-", label="eval pass@1")
    ax.set_xlabel("GRPO step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
