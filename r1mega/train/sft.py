"""Cold-start SFT: a few hundred R1-formatted demonstrations teach the policy the template.

The demonstrations are synthetic: an arithmetic problem, a short chain of thought that works the
sum column by column, and the answer, as ``<think>...</think>\\n<answer>...</answer>`` after the
R1 chat prompt (which prefills ``<think>\\n``). Training is masked NLL on the completion tokens
(``learner_step(tm, batch, settings, None)``); every rank holds the same global batch.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Optional

import torch

from r1mega.data.templates import get_template
from r1mega.rl.learner import LearnerBatch, LearnerSettings, learner_step

log = logging.getLogger(__name__)

_BINARY = re.compile(r"^\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=?\s*$")


def chain_of_thought(prompt: str, answer: str) -> str:
    """A short worked solution: column-wise addition with carries, else one line of working."""
    m = _BINARY.match(prompt)
    if m and m[2] == "+" and int(m[1]) >= 0 and int(m[3]) >= 0:
        a, b = m[1][::-1], m[3][::-1]
        lines, carry = [], 0
        for i in range(max(len(a), len(b))):
            da, db = int(a[i]) if i < len(a) else 0, int(b[i]) if i < len(b) else 0
            s = da + db + carry
            lines.append(f"{da}+{db}+{carry}={s}")
            carry = s // 10
        return "\n".join(lines)
    return f"{prompt.rstrip('= ')}={answer}"


def r1_completion(prompt: str, answer: str) -> str:
    """The reply after the prefilled ``<think>\\n``."""
    return f"{chain_of_thought(prompt, answer)}\n</think>\n<answer>{answer}</answer>"


def user_prompt(problem_prompt: str) -> str:
    return problem_prompt.rstrip("= ")


def render(problem_prompt: str, template: str = "r1") -> str:
    return get_template(template).prompt([{"role": "user", "content": user_prompt(problem_prompt)}])


@dataclass
class SFTRows:
    tokens: torch.Tensor  # [N, S] bos + prompt + completion + eos, right-padded
    loss_mask: torch.Tensor  # [N, S-1] 1 where the predicted token belongs to the completion
    lengths: torch.Tensor  # [N]
    # distillation: the teacher's top-k per label position ([N, S-1, k]; -inf log-prob off the response)
    teacher_ids: Optional[torch.Tensor] = None
    teacher_logp: Optional[torch.Tensor] = None

    def batch(self, idx: torch.Tensor) -> LearnerBatch:
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return LearnerBatch(self.tokens[idx], self.loss_mask[idx], lengths=self.lengths[idx],
                            teacher_ids=pick(self.teacher_ids), teacher_logp=pick(self.teacher_logp))


def build_rows(examples, tokenizer, seq_length: int, template: str = "r1", multiple: int = 1) -> SFTRows:
    """Tokenize ``(prompt, answer)`` examples into SFT rows of ``seq_length + 1`` tokens (worked solutions)."""
    pairs = [(render(ex.prompt, template), r1_completion(ex.prompt, ex.answer)) for ex in examples]
    return rows_from_pairs(pairs, tokenizer, seq_length, multiple, [ex.prompt for ex in examples])


def chat_pair(messages: list[dict], template: str = "r1") -> tuple[str, str]:
    """``(prompt, completion)`` of a conversation ending with the assistant reply (e.g. rejection sampling's
    output). The template's end-of-turn text is dropped: the EOS token that ``rows_from_pairs`` appends
    ends the reply, which is what the engine stops on."""
    tpl = get_template(template)
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("an SFT record needs 'messages' ending with the assistant reply (as rejection sampling "
                         "writes them)")
    prompt, completion = tpl.render_sft(messages)
    end = tpl.completion("")
    if end.strip() and completion.endswith(end):
        completion = completion[: -len(end)]
    return prompt, completion


def rows_from_pairs(pairs, tokenizer, seq_length: int, multiple: int = 1, names=None) -> SFTRows:
    """``(prompt text, completion text)`` pairs -> bos + prompt + completion + eos rows, loss on the completion."""
    names = names if names is not None else [prompt_text[-60:] for prompt_text, _ in pairs]
    seqs = [(tokenizer.encode(p, add_bos=True), tokenizer.encode(c) + [tokenizer.eos_id]) for p, c in pairs]
    return rows_from_ids(seqs, tokenizer.pad_id, seq_length, multiple, names)


def rows_from_ids(seqs, pad_id: int, seq_length: int, multiple: int = 1, names=None, teacher=None) -> SFTRows:
    """``(prompt ids, completion ids)`` -> right-padded rows of ``seq_length + 1`` tokens, loss on the completion.

    ``teacher``: per row the teacher's top-k ``(ids, log-probs)`` for each completion token (distillation).
    """
    width = seq_length + 1
    width += (-(width - 1)) % multiple  # S-1 divisible by ``multiple`` (tp: sequence parallel)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width - 1)
    lengths = torch.zeros(len(seqs), dtype=torch.long)
    k = len(teacher[0][0][0]) if teacher else 0
    t_ids = torch.zeros(len(seqs), width - 1, k, dtype=torch.long) if teacher else None
    t_logp = torch.full((len(seqs), width - 1, k), float("-inf")) if teacher else None
    for i, (prompt, completion) in enumerate(seqs):
        ids = list(prompt) + list(completion)
        if len(ids) > width:
            name = names[i] if names is not None else i
            raise ValueError(f"SFT example {name!r} needs {len(ids)} tokens; raise model.seq_length")
        tokens[i, : len(ids)] = torch.tensor(ids)
        span = slice(len(prompt) - 1, len(ids) - 1)  # position t predicts token t + 1
        mask[i, span] = 1.0
        lengths[i] = len(ids)
        if teacher:
            top_ids, top_logp = teacher[i]
            for j, (tid, tlp) in enumerate(zip(top_ids, top_logp)):  # fewer than k entries: -inf padding
                t_ids[i, span.start + j, : len(tid)] = torch.tensor(tid, dtype=torch.long)
                t_logp[i, span.start + j, : len(tlp)] = torch.tensor(tlp)
    return SFTRows(tokens, mask, lengths, t_ids, t_logp)


def run_sft(tm, rows: SFTRows, *, steps: int, global_batch_size: int, settings: LearnerSettings, seed: int = 0,
            on_step=None, ckpt=None, stage: str = "sft", resume: Optional[dict] = None) -> list[float]:
    """Masked NLL on random global batches up to step ``steps``; returns the losses.

    ``ckpt`` (a ``resilience.Checkpointer``) is told about every step (periodic / on-signal saves, recorded
    under ``stage``); ``resume`` is the loop state of such a checkpoint: continue after its step with its
    sampler state. ``settings`` e.g. pack micro-batches or add the distillation KL.
    """
    from r1mega.train.resilience import check_skip

    gen = torch.Generator().manual_seed(seed)  # same draw on every rank
    start, skipped = 0, 0
    if resume is not None:
        gen.set_state(resume["sft_generator"])
        start, skipped = resume["stage_step"], resume.get("skipped_steps", 0)
    losses = []
    for step in range(start + 1, steps + 1):
        t0 = time.monotonic()
        idx = torch.randint(0, rows.tokens.size(0), (global_batch_size,), generator=gen)
        m = learner_step(tm, rows.batch(idx), settings, None)
        skipped += check_skip(m, "sft", step, settings.skip_nonfinite)
        losses.append(m.values["loss"])
        record = {"stage": "sft", "step": step, "loss": m.values["loss"], "entropy": m.values.get("entropy", 0.0),
                  "grad_norm": m.grad_norm, "skipped": m.skipped, "skipped_steps": skipped,
                  "time/train": time.monotonic() - t0,
                  **{k: m.values[k] for k in ("nll", "distill_kl") if k in m.values}}
        if on_step is not None:
            on_step(record)
        if ckpt is not None:
            ckpt.end_of_step(stage, step, {"sft_generator": gen.get_state(), "skipped_steps": skipped})
    return losses

