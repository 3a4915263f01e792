"""Several optimizer steps per rollout batch: ``rl.mini_batches`` updates per pass, ``rl.epochs`` passes.

Why: long chain-of-thought rollouts are the expensive part of a GRPO step, so PPO-style reuse takes
k optimizer steps on one batch (verl ``ppo_mini_batch_size``/``ppo_epochs``, slime
``num_steps_per_rollout``). The old log-probs are computed once, before the first update, so the
first mini-batch is exactly on-policy (ratio 1, nothing clipped) and later ones are corrected by the
clipped ratio against that same old policy.

Loss normalisation is **per mini-batch**: each update's ``token_weights`` are computed over its own
mini-batch, as verl and slime do. Every optimizer step then sees a mean-normalised loss whatever k
is, so ``clip_grad`` and the learning rate keep their meaning; normalising over the whole rollout
batch instead would shrink each step's gradient by about 1/k (Adam hides most of that, gradient
clipping and SGD do not). Within a mini-batch the weights are still global over its micro-batches and
DP ranks (``aggregation``), so an update does not depend on the layout.

Mini-batches are consecutive slices of the batch (``B / k`` rows, whole GRPO groups when k divides
the prompt count), in the same order every epoch.
"""

from __future__ import annotations

from r1mega.config.schema import RLConfig
from r1mega.rl.batching import LearnerBatch
from r1mega.rl.learner import LearnerSettings, StepMetrics, compute_logprobs, learner_step


def mini_batch_slices(batch_size: int, mini_batches: int) -> list[slice]:
    """Consecutive equal slices of the rows; the count must divide the batch."""
    if mini_batches < 1 or batch_size % mini_batches:
        raise ValueError(f"a batch of {batch_size} sequences does not split into rl.mini_batches={mini_batches} "
                         f"equal mini-batches: choose rl.mini_batches from "
                         f"{[d for d in range(1, batch_size + 1) if batch_size % d == 0]}")
    per = batch_size // mini_batches
    return [slice(j * per, (j + 1) * per) for j in range(mini_batches)]


def learner_update(tm, batch: LearnerBatch, settings: LearnerSettings, rl: RLConfig,
                   force_all_reduce: bool = False) -> list[StepMetrics]:
    """``rl.epochs`` passes of ``rl.mini_batches`` optimizer steps over ``batch`` (collective).

    ``batch`` is the global rollout batch with advantages (and ``ref_logp`` / ``rollout_logp`` /
    routing tables as for :func:`learner_step`). If ``batch.old_logp`` is unset and there is more than
    one update, it is computed here once, before the first update (with routing replay,
    ``prepare_routing_replay`` has already set it). Returns one :class:`StepMetrics` per update, in
    order, tagged with ``update`` (0-based over the whole call), ``epoch`` and ``mini_batch``.
    ``force_all_reduce`` as for :func:`learner_step` (parity checks read full gradients).
    """
    if rl.epochs < 1:
        raise ValueError(f"rl.epochs={rl.epochs} must be >= 1")
    slices = mini_batch_slices(batch.size, rl.mini_batches)
    if batch.old_logp is None and len(slices) * rl.epochs > 1:
        # one update alone is on-policy by construction (old = the training forward's own log-probs)
        batch.old_logp = compute_logprobs(tm.ddp, tm.module, batch, settings)
    out: list[StepMetrics] = []
    for epoch in range(rl.epochs):
        for j, rows in enumerate(slices):
            m = learner_step(tm, batch.rows(rows), settings, rl, force_all_reduce=force_all_reduce)
            m.update, m.epoch, m.mini_batch = len(out), epoch, j
            out.append(m)
    return out
