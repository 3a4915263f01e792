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
    width = seq_length + 1
    width += (-(width - 1)) % multiple  # S-1 divisible by ``multiple`` (tp: sequence parallel)
    tokens = torch.full((len(pairs), width), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(len(pairs), width - 1)
    lengths = torch.zeros(len(pairs), dtype=torch.long)
    for i, (prompt_text, completion_text) in enumerate(pairs):
        prompt = tokenizer.encode(prompt_text, add_bos=True)
        completion = tokenizer.encode(completion_text) + [tokenizer.eos_id]
        ids = prompt + completion
        if len(ids) > width:
            name = names[i] if names is not None else prompt_text[-60:]
            raise ValueError(f"SFT example {name!r} needs {len(ids)} tokens; raise model.seq_length")
        tokens[i, : len(ids)] = torch.tensor(ids)
        mask[i, len(prompt) - 1: len(ids) - 1] = 1.0  # position t predicts token t + 1
        lengths[i] = len(ids)
    return SFTRows(tokens, mask, lengths)


def run_sft(tm, rows: SFTRows, *, steps: int, global_batch_size: int, micro_batch_size: int,
            valid_vocab: int, seed: int = 0, on_step=None, ckpt=None, resume: Optional[dict] = None,
            skip_nonfinite: bool = True) -> list[float]:
    """Masked NLL on random global batches up to step ``steps``; returns the losses.

    ``ckpt`` (a ``resilience.Checkpointer``) is told about every step (periodic / on-signal saves);
    ``resume`` is the ``extra`` of an SFT-stage checkpoint: continue after its step with its sampler state.
    """
    from r1mega.train.resilience import check_skip

    settings = LearnerSettings(micro_batch_size=micro_batch_size, valid_vocab=valid_vocab)
    gen = torch.Generator().manual_seed(seed)  # same draw on every rank
    start, skipped = 0, 0
    if resume is not None:
        gen.set_state(resume["sft_generator"])
        start, skipped = resume["stage_step"], resume.get("skipped_steps", 0)
    losses = []
    for step in range(start + 1, steps + 1):
        t0 = time.monotonic()
        idx = torch.randint(0, rows.tokens.size(0), (global_batch_size,), generator=gen)
        batch = LearnerBatch(rows.tokens[idx], rows.loss_mask[idx], lengths=rows.lengths[idx])
        m = learner_step(tm, batch, settings, None)
        skipped += check_skip(m, "sft", step, skip_nonfinite)
        losses.append(m.values["loss"])
        record = {"stage": "sft", "step": step, "loss": m.values["loss"], "entropy": m.values.get("entropy", 0.0),
                  "grad_norm": m.grad_norm, "skipped": m.skipped, "skipped_steps": skipped,
                  "time/train": time.monotonic() - t0}
        if on_step is not None:
            on_step(record)
        if ckpt is not None:
            ckpt.end_of_step("sft", step, {"sft_generator": gen.get_state(), "skipped_steps": skipped})
    return losses


@torch.no_grad()
def eval_loss(tm, rows: SFTRows, micro_batch_size: int, valid_vocab: int) -> float:
    """Masked NLL of ``rows`` (forward only)."""
    settings = LearnerSettings(micro_batch_size=micro_batch_size, valid_vocab=valid_vocab)
    batch = LearnerBatch(rows.tokens, rows.loss_mask, lengths=rows.lengths)
    return learner_step(tm, batch, settings, None, forward_only=True).values["loss"]
