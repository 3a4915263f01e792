"""Foundation demo: supervised training of the tiny MoE policy on synthetic addition.

This is the most complete job until the R1 pipeline (SFT -> GRPO) lands: it exercises config
loading, distributed set-up, the megatron MoE policy on any TP/PP/EP layout, the training step and
metrics. It trains on answer tokens only and reports held-out answer loss before and after.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from r1mega.config.schema import R1Config
from r1mega.data.char_tokenizer import BOS, EOS, PAD, CharTokenizer
from r1mega.data.synthetic import Problem, addition_problems, split_train_eval

log = logging.getLogger(__name__)

ALPHABET = "0123456789+=\n "


@dataclass
class Rows:
    tokens: torch.Tensor  # [n, seq+1]: bos, prompt, answer, eos, pad...
    answer_mask: torch.Tensor  # [n, seq]: 1 where the *next* token is an answer or eos token


def encode_rows(problems: list[Problem], tok: CharTokenizer, seq_length: int) -> Rows:
    tokens = torch.full((len(problems), seq_length + 1), PAD, dtype=torch.long)
    mask = torch.zeros(len(problems), seq_length)
    for i, p in enumerate(problems):
        prompt, answer = tok.encode(p.prompt), tok.encode(p.answer) + [EOS]
        ids = [BOS] + prompt + answer
        if len(ids) > seq_length + 1:
            raise ValueError(f"problem {p.prompt!r} needs {len(ids)} tokens; raise model.seq_length")
        tokens[i, : len(ids)] = torch.tensor(ids)
        mask[i, len(prompt): len(prompt) + len(answer)] = 1.0  # position t predicts token t+1
    return Rows(tokens, mask)


def run_lm_demo(cfg: R1Config) -> dict:
    """Train and evaluate on this rank (call on every rank of the job); returns the summary."""
    from r1mega.models.policy import padded_vocab_size  # noqa: F401  (readies megatron)
    from r1mega.platform.distributed import init_model_parallel, init_process_group, shutdown
    from r1mega.train.lm_step import lm_train_step, local_batch
    from r1mega.train.model_setup import build_training_model

    env = init_process_group(timeout_minutes=cfg.parallel.timeout_minutes)
    init_model_parallel(cfg.parallel, seed=cfg.model.seed)
    tok = CharTokenizer(ALPHABET)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} < tokenizer's {tok.vocab_size}")
    train, held_out = split_train_eval(addition_problems(4000, 2, cfg.data.seed), 0.1)
    train_rows = encode_rows(train, tok, cfg.model.seq_length)
    eval_rows = encode_rows(held_out[: cfg.trainer.global_batch_size * 4], tok, cfg.model.seq_length)
    tm = build_training_model(cfg.model, cfg.parallel, cfg.optimizer, total_steps=cfg.trainer.steps)
    mbs = cfg.parallel.micro_batch_size

    def evaluate() -> float:
        return lm_train_step(tm, local_batch(eval_rows.tokens), mbs, local_batch(eval_rows.answer_mask),
                             forward_only=True).loss

    out_dir = Path(cfg.trainer.output_dir)
    metrics_path = out_dir / "metrics.jsonl"
    if env.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("")
    eval_before = evaluate()
    gen = torch.Generator().manual_seed(cfg.data.seed)
    losses, t_start = [], time.monotonic()
    for step in range(1, cfg.trainer.steps + 1):
        t0 = time.monotonic()
        idx = torch.randint(0, train_rows.tokens.size(0), (cfg.trainer.global_batch_size,), generator=gen)
        result = lm_train_step(tm, local_batch(train_rows.tokens[idx]), mbs,
                               local_batch(train_rows.answer_mask[idx]))
        losses.append(result.loss)
        record = {"stage": "lm_demo", "step": step, "loss": result.loss, "grad_norm": result.grad_norm,
                  "skipped": result.skipped, "time/step": time.monotonic() - t0}
        if env.rank == 0:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if step % max(1, cfg.trainer.log_interval) == 0:
                log.info("step %d/%d loss %.4f grad_norm %.3f", step, cfg.trainer.steps, result.loss,
                         result.grad_norm)
    eval_after = evaluate()
    summary = {"eval/answer_loss_before": eval_before, "eval/answer_loss_after": eval_after,
               "train/loss_first": losses[0], "train/loss_last": losses[-1],
               "seconds": time.monotonic() - t_start, "world_size": env.world_size}
    if env.rank == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    shutdown()
    return summary
