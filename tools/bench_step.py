"""The GRPO step at the demo's shape, next to a plain PyTorch loop on the same model and batch.

Why: at the demo's shape (8 prompts x 8 samples, 40 new tokens, a 658k-parameter Qwen3-MoE) the
step is mostly framework overhead; this measures how much, and where it goes, against the simplest
loop that does the same work.

- **r1mega**: ``r1mega train --config configs/demo_cpu.yaml`` in a subprocess with the cold-start SFT
  stage (``--sft-steps``) and a GRPO stage of ``--warmup + --steps`` steps, evals off. The GRPO steps
  after the warm-up are read back from ``metrics.jsonl``: ``time/step`` split into generate
  (``time/rollout``), score (``time/reward``), old/reference log-probs (``time/logprobs``), learner
  (``time/train`` less the log-probs), sync (``time/refit``, parity probes included) and other.
- **reference**: the weights the GRPO stage started from (the SFT stage's last checkpoint, converted by
  ``r1mega convert to-hf``) in transformers, in this process, which never imports megatron (so never
  installs r1mega's CPU emulation, whose per-call hook would slow the plain loop too); per step the
  same 8 prompts of the stage's prompt stream, ``generate`` with the same sampling (temperature,
  top-p, top-k, max new tokens, EOS), the same reward terms, GRPO advantages, r1mega's token-level
  PPO-clip loss at the same clip range, averaged over response tokens, and plain ``torch.optim.Adam``
  at the stage's learning rate. Its log-probs for the ratio come from ``generate``'s processed scores,
  as the engine's do.

    PYTHONPATH=. python tools/bench_step.py [--sft-steps 150] [--warmup 3] [--steps 10] [--engine vllm]

Both run on the same machine one after the other, with the same number of torch threads.
Last line: ``step_s=<median> reference_step_s=<median> ratio=<step/reference> generate_s=<> learner_s=<>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = ("generate", "score", "logprobs", "learner", "sync", "other")


def child_env() -> dict:
    """This environment with the repository on ``PYTHONPATH`` (for the ``r1mega`` subprocesses)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def run_r1mega(args, out: Path) -> list[dict]:
    """The GRPO step records after the warm-up, from a real ``r1mega train`` of the demo recipe."""
    steps = args.warmup + args.steps
    cmd = [sys.executable, "-m", "r1mega.cli", "train", "--config", str(ROOT / "configs/demo_cpu.yaml"),
           f"trainer.output_dir={out}", "data.eval_path=null", f"rollout.engine={args.engine}",
           f"stages.cold_start_sft.steps={args.sft_steps}", f"stages.grpo.steps={steps}", *args.override]
    print("r1mega:", " ".join(cmd[1:]), flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=child_env(), cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"r1mega train failed with exit code {proc.returncode}")
    print(f"r1mega run: {time.monotonic() - t0:.1f} s (start-up, SFT and {steps} GRPO steps)", flush=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    grpo = [r for r in records if r.get("stage") == "grpo"]
    if len(grpo) != steps:
        raise SystemExit(f"expected {steps} GRPO records in {out / 'metrics.jsonl'}, found {len(grpo)}")
    return grpo[args.warmup:]


def split_record(r: dict) -> dict[str, float]:
    """One r1mega step's seconds by part (``other``: the rest of ``time/step``)."""
    logprobs = r.get("time/logprobs", 0.0)
    parts = {"generate": r.get("time/rollout", 0.0), "score": r.get("time/reward", 0.0), "logprobs": logprobs,
             "learner": r["time/train"] - logprobs, "sync": r.get("time/refit", 0.0)}
    parts["other"] = r["time/step"] - sum(parts.values())
    return {"step": r["time/step"], **parts}


class ReferenceLoop:
    """The plain loop: transformers ``generate``, the same rewards and GRPO loss, ``torch.optim.Adam``."""

    def __init__(self, cfg, hf_dir: Path, tokenizer_dir: Path):
        from transformers import AutoModelForCausalLM

        from r1mega.data.tokenizer import HFTokenizer
        from r1mega.platform import cpu_emulation
        from r1mega.rewards import RewardComputer
        from r1mega.rl.policy_loss import clip_range
        from r1mega.train.evaluate import make_problems
        from r1mega.train.run_data import stage_examples

        if cpu_emulation.is_installed():  # every torch call would pay its Python hook: not a plain loop
            raise SystemExit("the reference loop must run without r1mega's CPU emulation of megatron: do not import "
                             "megatron (r1mega.models, r1mega.train.grpo, ...) into this process")
        self.cfg = cfg
        self.tok = HFTokenizer(tokenizer_dir)
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        self.model.train()
        grpo = next(s for s in cfg.stages if s.kind == "grpo")
        self.opt = torch.optim.Adam(self.model.parameters(), lr=grpo.lr or cfg.optimizer.lr,
                                    betas=(cfg.optimizer.adam_beta1, cfg.optimizer.adam_beta2),
                                    eps=cfg.optimizer.adam_eps)
        problems = make_problems(stage_examples(cfg.data.train_path, cfg.data.seed), self.tok,
                                 cfg.data.chat_template, cfg.data.max_prompt_length)
        self.prompts = problems  # .example, .text (the rendered prompt), .ids
        self.order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(cfg.data.seed)).tolist()
        self.per_step = max(1, cfg.trainer.global_batch_size // cfg.rollout.n)
        self.rewarder = RewardComputer(cfg.reward)
        self.eps_low, self.eps_high = clip_range(cfg.rl)

    def step(self, step: int) -> dict[str, float]:
        from r1mega.rewards import reward_input_from_example
        from r1mega.rl.advantages import compute_advantages
        from r1mega.rl.policy_loss import policy_loss

        cfg, ro, n = self.cfg, self.cfg.rollout, self.cfg.rollout.n
        start = (step - 1) * self.per_step
        prompts = [self.prompts[self.order[(start + i) % len(self.prompts)]] for i in range(self.per_step)]
        t0 = time.monotonic()
        width = max(len(p.ids) for p in prompts)
        rows = [[self.tok.pad_id] * (width - len(p.ids)) + p.ids for p in prompts for _ in range(n)]
        attn = [[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in prompts for _ in range(n)]
        input_ids, attention = torch.tensor(rows), torch.tensor(attn)
        torch.manual_seed(cfg.rollout.seed + step)
        self.model.eval()
        with torch.no_grad():
            out = self.model.generate(input_ids, attention_mask=attention, do_sample=True,
                                      temperature=ro.temperature, top_p=ro.top_p,
                                      top_k=ro.top_k if ro.top_k > 0 else None, max_new_tokens=ro.max_new_tokens,
                                      eos_token_id=self.tok.eos_id, pad_token_id=self.tok.pad_id,
                                      output_scores=True, return_dict_in_generate=True)
        new = out.sequences[:, width:]
        scores = torch.stack(out.scores, dim=1).log_softmax(-1)  # processed: the distribution sampled from
        old_logp = scores.gather(-1, new.unsqueeze(-1)).squeeze(-1)
        # a response runs up to and including its first EOS
        is_eos = new == self.tok.eos_id
        after = (is_eos.cumsum(1) - is_eos.long()) > 0
        resp_mask = (~after).float()
        t1 = time.monotonic()
        samples = []
        for i in range(new.size(0)):
            ids = [int(t) for t, m in zip(new[i], resp_mask[i]) if m and int(t) != self.tok.eos_id]
            p = prompts[i // n]
            samples.append(reward_input_from_example(p.example, self.tok.decode(ids), p.text, int(resp_mask[i].sum())))
        rewards = torch.tensor([r.total for r in self.rewarder.compute(samples)], dtype=torch.float32)
        t2 = time.monotonic()
        groups = torch.arange(len(prompts)).repeat_interleave(n)
        adv = compute_advantages(cfg.rl.advantage_estimator, rewards, groups, norm_by_std=cfg.rl.norm_by_std,
                                 eps=cfg.rl.advantage_eps)
        self.model.train()
        full = out.sequences
        mask = torch.cat([attention, resp_mask.long()], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=full, attention_mask=mask, position_ids=positions).logits
        logp = logits[:, width - 1:-1].float().log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        per_token, _ = policy_loss(cfg.rl.policy_loss, logp, old_logp, adv[:, None].expand_as(logp), resp_mask,
                                   eps_low=self.eps_low, eps_high=self.eps_high, dual_clip_c=cfg.rl.dual_clip_c)
        loss = per_token.sum() / resp_mask.sum().clamp(min=1)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        t3 = time.monotonic()
        return {"step": t3 - t0, "generate": t1 - t0, "score": t2 - t1, "logprobs": 0.0, "learner": t3 - t2,
                "sync": 0.0, "other": 0.0, "reward": float(rewards.mean())}

    def close(self) -> None:
        self.rewarder.close()


def starting_weights_hf(out: Path) -> Path:
    """The weights the GRPO stage started from (the cold-start SFT stage's last checkpoint) as an HF directory,
    converted by ``r1mega convert to-hf`` in a subprocess (this process stays free of megatron)."""
    done = json.loads((out / "cold_start_sft" / "done.json").read_text())
    hf = out / "hf_reference"
    cmd = [sys.executable, "-m", "r1mega.cli", "convert", "to-hf", "--ckpt", done["checkpoint"], "--out", str(hf),
           "--tokenizer", str(out / "tokenizer"), "--no-progress"]
    proc = subprocess.run(cmd, env=child_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"converting {done['checkpoint']} to HF failed with exit code {proc.returncode}")
    return hf


def summarize(name: str, rows: list[dict]) -> dict[str, float]:
    med = {k: statistics.median(r[k] for r in rows) for k in ("step", *PARTS)}
    print(f"{name}: steps={len(rows)} median_step_s={med['step']:.4f} min_step_s={min(r['step'] for r in rows):.4f} "
          + " ".join(f"{k}_s={med[k]:.4f}" for k in PARTS), flush=True)
    return med


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft-steps", type=int, default=150, help="cold-start SFT steps before GRPO (the demo's 150)")
    p.add_argument("--warmup", type=int, default=3, help="GRPO steps left out of the figures")
    p.add_argument("--steps", type=int, default=10, help="GRPO steps measured")
    p.add_argument("--engine", default="vllm", help="rollout.engine of the r1mega run")
    p.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds the r1mega run may take")
    p.add_argument("override", nargs="*", help="more dotted config overrides for the r1mega run")
    args = p.parse_args(argv)

    from r1mega.config import load_config

    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "run"
        records = run_r1mega(args, out)
        ours = summarize("r1mega", [split_record(r) for r in records])
        cfg = load_config(str(ROOT / "configs/demo_cpu.yaml"), [f"trainer.output_dir={out}", *args.override])
        ref = ReferenceLoop(cfg, starting_weights_hf(out), out / "tokenizer")
        try:
            first = args.warmup + 1
            for s in range(1, first):
                ref.step(s)
            ref_rows = [ref.step(s) for s in range(first, first + args.steps)]
        finally:
            ref.close()
        theirs = summarize("reference", ref_rows)
        print(f"threads={torch.get_num_threads()} "
              f"r1mega_reward_mean={statistics.mean(r['reward/mean'] for r in records):.3f} "
              f"reference_reward_mean={statistics.mean(r['reward'] for r in ref_rows):.3f}")
    print(f"step_s={ours['step']:.4f} reference_step_s={theirs['step']:.4f} ratio={ours['step'] / theirs['step']:.3f} "
          f"generate_s={ours['generate']:.4f} learner_s={ours['learner']:.4f}")


if __name__ == "__main__":
    main()
