"""Parallel-correctness check: every layout must train exactly like one process.

For each layout (e.g. ``tp2ep2pp2``) spawn ``tp*pp*dp`` CPU processes (gloo), build the policy with
layout-invariant init, run ``steps`` training steps (megatron DDP + distributed optimizer) on the
same global batches, and compare with a single-process reference: loss per step, gradients of the
last step, and parameters after the last optimizer step. Each run is a subprocess with a timeout, so
a hang fails instead of stalling.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from r1mega.config.schema import ModelConfig, OptimizerConfig, ParallelConfig, R1Config, RLConfig, TrainerConfig
from r1mega.config.validate import validate_config
from r1mega.platform.spawn import spawn_ranks

_LAYOUT = re.compile(r"(etp|tp|pp|cp|ep|dp|first|last)(\d+)")


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1
    etp: int = 0  # 0 = tp (megatron's default)
    # uneven pipeline split: layers on the first / last stage (0 = even split), e.g. ``pp2first2``
    first: int = 0
    last: int = 0
    cp: int = 1

    @classmethod
    def parse(cls, text: str) -> "Layout":
        """``tp2ep2pp2`` -> Layout; dp defaults to what the expert grid (etp * ep, carved out of tp * cp * dp)
        needs, so expert parallelism has ranks to use."""
        text = text.strip().lower()
        if text in ("1", "ref", "single"):
            return cls()
        parts = dict((k, int(v)) for k, v in _LAYOUT.findall(text))
        if "".join(f"{k}{v}" for k, v in _LAYOUT.findall(text)) != text or not parts or \
                parts.get("first", 1) < 1 or parts.get("last", 1) < 1:
            raise ValueError(f"layout {text!r}: write it like tp2, ep2, pp2, cp2, tp2ep2, tp2ep2pp2 (optional dpN, "
                             f"etpN; firstN / lastN: layers on the first / last pipeline stage)")
        parts.setdefault("etp", parts.get("tp", 1))
        parts.setdefault("dp", max(1, parts.get("ep", 1) * parts["etp"] // (parts.get("tp", 1) * parts.get("cp", 1))))
        return cls(**parts)

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    def name(self) -> str:
        shown = {k: v for k, v in dataclasses.asdict(self).items()
                 if (v > 0 if k in ("first", "last") else v > 1) and not (k == "etp" and v == self.tp)}
        return "".join(f"{k}{v}" for k, v in shown.items()) or "1"

    def parallel_config(self, micro_batch_size: int) -> ParallelConfig:
        return ParallelConfig(tp=self.tp, pp=self.pp, cp=self.cp, ep=self.ep, etp=self.etp or self.tp, dp=self.dp,
                              num_layers_in_first_pipeline_stage=self.first or None,
                              num_layers_in_last_pipeline_stage=self.last or None,
                              use_distributed_optimizer=True, micro_batch_size=micro_batch_size)


@dataclass
class CheckSpec:
    model: ModelConfig
    steps: int = 2
    global_batch: int = 4
    micro_batch_size: int = 1
    seq_length: int = 32
    data_seed: int = 7
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-3, clip_grad=0.0))
    objective: str = "lm"  # lm (megatron's cross entropy) | grpo | sft (r1mega's learner step)
    pack: bool = False  # learner objectives: padding-free packed micro-batches
    # learner objectives: reorder each global batch before the step so that contiguous slices are
    # token-balanced over this many DP ranks (rl.balance); 0 keeps the order. Loss and grads must not change.
    balance_parts: int = 0
    max_tokens_per_micro_batch: Optional[int] = None  # learner objectives: token-budget micro-batches (packed)
    row_lengths: list[int] = field(default_factory=list)  # learner objectives: tokens per row (empty: random)
    rl: RLConfig = field(default_factory=lambda: RLConfig(kl_coef=0.01, entropy_coef=0.01, tis_cap=None))

    @classmethod
    def from_dict(cls, d: dict) -> "CheckSpec":
        return cls(**dict(d, model=ModelConfig(**d["model"]), optimizer=OptimizerConfig(**d["optimizer"]),
                          rl=RLConfig(**d["rl"])))


@dataclass
class LayoutReport:
    layout: str
    world_size: int
    seconds: float
    loss_rel_err: float
    grad_rel_err: float
    param_rel_err: float
    losses: list[float]

    @property
    def max_rel_err(self) -> float:
        return max(self.loss_rel_err, self.grad_rel_err, self.param_rel_err)


def learner_batch(spec: CheckSpec, tokens: torch.Tensor, step: int):
    """A deterministic RL/SFT batch over ``tokens``: random prompt/response split per row (one row has
    an empty response) and random advantages. ``spec.row_lengths`` fixes each row's prompt + response
    length (a long-tailed batch for token-budget tests)."""
    from r1mega.rl.learner import LearnerBatch

    gen = torch.Generator().manual_seed(spec.data_seed * 1000 + step)
    rows, positions = tokens.size(0), tokens.size(1) - 1
    mask = torch.zeros(rows, positions)
    lengths = torch.zeros(rows, dtype=torch.long)
    for row in range(rows):
        if spec.row_lengths:
            total = spec.row_lengths[row]
            prompt = int(torch.randint(1, max(min(positions // 2, total - 1), 2), (1,), generator=gen))
            length = max(total - prompt, 0)
            mask[row, prompt - 1: prompt - 1 + length] = 1.0
            lengths[row] = prompt + length
            continue
        prompt = int(torch.randint(1, positions // 2, (1,), generator=gen))
        length = 0 if row == 1 else int(torch.randint(1, positions - prompt + 1, (1,), generator=gen))
        mask[row, prompt - 1: prompt - 1 + length] = 1.0
        lengths[row] = prompt + length  # tokens after this are padding
    return LearnerBatch(tokens, mask, advantages=torch.randn(rows, generator=gen), lengths=lengths)


def _train_step(spec: CheckSpec, tm, reference, vocab_size: int, tokens: torch.Tensor, step: int, last: bool
                ) -> tuple[float, dict]:
    if spec.objective == "lm":
        from r1mega.train.lm_step import lm_train_step, local_batch

        return lm_train_step(tm, local_batch(tokens), spec.micro_batch_size, force_all_reduce=last).loss, {}
    from r1mega.rl.learner import LearnerSettings, compute_logprobs, learner_step, prepare_routing_replay

    settings = LearnerSettings(micro_batch_size=spec.micro_batch_size, valid_vocab=vocab_size,
                               temperature=0.9, chunk_size=16, constant_norm=float(spec.seq_length),
                               pack=spec.pack, max_tokens_per_micro_batch=spec.max_tokens_per_micro_batch)
    batch = learner_batch(spec, tokens, step)
    rl = None
    if spec.objective == "grpo":
        rl = spec.rl
        # old-policy log-probs recomputed like a PPO epoch would, and a frozen reference for the KL
        if rl.routing_replay == "none":
            batch.old_logp = compute_logprobs(tm.ddp, tm.module, batch, settings)
        else:  # R2/R3: the old-logprob pass records or replays routing; the step replays it
            batch.rollout_experts = synthetic_engine_routing(tm.config, tokens.size(0), tokens.size(1) - 1,
                                                             spec.data_seed + step)
            routing_metrics = prepare_routing_replay(tm, batch, settings, rl.routing_replay)
        batch.ref_logp = reference.logprobs(batch, settings)
        # an engine's sampling log-probs differ slightly from the trainer's: exercises TIS + mismatch
        noise = torch.Generator().manual_seed(spec.data_seed + step)
        batch.rollout_logp = batch.old_logp + 0.3 * torch.randn(batch.old_logp.shape, generator=noise)
    if spec.balance_parts:  # after every per-row field is filled: the rows move with all their fields
        from r1mega.rl.balance import balance_batch

        batch, _ = balance_batch(batch, spec.balance_parts)
    if rl is not None and rl.mini_batches * rl.epochs > 1:  # k updates: the last one's loss, grads, metrics
        from r1mega.rl.updates import learner_update

        result = learner_update(tm, batch, settings, rl, force_all_reduce=last)[-1]
    else:
        result = learner_step(tm, batch, settings, rl, force_all_reduce=last)
    if rl is not None and rl.routing_replay != "none":
        result.values.update(routing_metrics)
    return result.values["loss"], result.values


def synthetic_engine_routing(config, rows: int, positions: int, seed: int) -> torch.Tensor:
    """A stand-in for an engine's expert choices: distinct random experts per (row, position, MoE layer)."""
    from r1mega.models.routing_replay import moe_layer_numbers

    gen = torch.Generator().manual_seed(seed)
    layers = len(moe_layer_numbers(config))
    scores = torch.rand(rows, positions, layers, config.num_moe_experts, generator=gen)
    return scores.argsort(-1)[..., : config.moe_router_topk].to(torch.int16)


def global_batches(spec: CheckSpec, vocab_size: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(spec.data_seed)
    return [torch.randint(0, vocab_size, (spec.global_batch, spec.seq_length + 1), generator=gen)
            for _ in range(spec.steps)]


# ----------------------------------------------------------------------------- worker side


def _worker(spec: CheckSpec, layout: Layout, out_path: str) -> None:
    from r1mega.config.presets import resolve_model
    from r1mega.platform.distributed import init_model_parallel, init_process_group, shutdown

    init_process_group(timeout_minutes=5)
    parallel = layout.parallel_config(spec.micro_batch_size)
    model_cfg = resolve_model(spec.model)
    init_model_parallel(parallel, seed=model_cfg.seed)

    from r1mega.models.sharding import gather_full
    from r1mega.train.model_setup import build_training_model

    tm = build_training_model(model_cfg, parallel, spec.optimizer, total_steps=spec.steps)
    reference = None
    if spec.objective == "grpo":
        from r1mega.rl.learner import ReferencePolicy

        reference = ReferencePolicy(tm)
    initial = gather_full(tm.module, tm.config)
    losses, metrics, grads = [], [], None
    for step, batch in enumerate(global_batches(spec, model_cfg.vocab_size)):
        last = step == spec.steps - 1
        # The step's optimizer update happens inside; read grads of the last step before it.
        if last:
            tm.optimizer.step = _capture_grads_then(tm, tm.optimizer.step, sink := {})
        loss, step_metrics = _train_step(spec, tm, reference, model_cfg.vocab_size, batch, step, last)
        losses.append(loss)
        metrics.append(step_metrics)
        if last:
            grads = sink["grads"]
    final = gather_full(tm.module, tm.config)
    if torch.distributed.get_rank() == 0:
        torch.save({"losses": losses, "metrics": metrics, "initial": initial, "grads": grads, "final": final},
                   out_path)
    shutdown()


def _capture_grads_then(tm, step_fn, sink: dict):
    from r1mega.models.sharding import gather_full

    def step():
        main_grads = {n: p.main_grad for n, p in tm.module.named_parameters()}
        sink["grads"] = gather_full(tm.module, tm.config, main_grads)
        return step_fn()

    return step


# ----------------------------------------------------------------------------- launcher side


def run_layout(spec: CheckSpec, layout: Layout, timeout_s: float = 300.0) -> dict:
    """Run one layout in fresh processes; returns rank 0's gathered results."""
    with tempfile.TemporaryDirectory(prefix="r1mega-parity-") as tmp:
        spec_path, out_path = Path(tmp, "spec.pt"), Path(tmp, "out.pt")
        spec_path.write_text(json.dumps({"spec": dataclasses.asdict(spec), "layout": dataclasses.asdict(layout)}))
        spawn_ranks(["-m", "r1mega.train.parallel_check", "--worker", str(spec_path), str(out_path)],
                    layout.world_size, timeout_s, name=f"layout {layout.name()}", log_dir=tmp)
        return torch.load(out_path, weights_only=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


# how far above its tensor's gradient noise an element's gradient must stand to count fully in the param error
_SIGNAL_OVER_NOISE = 1000.0


def _update_err(ref_update: torch.Tensor, update_diff: torch.Tensor, grad: torch.Tensor, grad_diff: torch.Tensor
                ) -> float:
    """One tensor's update error relative to its reference update, each element weighted by its gradient's
    signal-to-noise: w = g^2 / (g^2 + (K * noise)^2), noise = max |g_got - g_ref| over the tensor, K =
    ``_SIGNAL_OVER_NOISE``. Adam normalises every element's gradient to about lr, so where g is as small as the
    float noise of a reduction order (token-sum losses: ~1e-7 absolute) the two runs' steps differ by up to lr
    although the gradients agree; those elements get w <= 1/K^2. Elements well above the noise weigh ~1, so a
    missing, doubled or misplaced update still shows in full. Scaling all weights alike leaves the ratio
    unchanged: gradients that are wrong everywhere (huge noise) make it a gradient-weighted error, not zero.
    No noise (equal gradients) weighs all elements 1; an update without gradient signal (e.g. weight decay on
    zero gradients) is compared unweighted."""
    noise = float(grad_diff.abs().max())
    weight = grad.square() / (grad.square() + (_SIGNAL_OVER_NOISE * noise) ** 2) if noise > 0 else None
    if weight is not None and float((weight * ref_update.square()).sum()) > 0:
        ref_update, update_diff = weight.sqrt() * ref_update, weight.sqrt() * update_diff
    return float(update_diff.norm() / ref_update.norm())


def compare(ref: dict, got: dict) -> tuple[float, float, float]:
    """(loss, grad, param) relative errors of ``got`` against ``ref`` (run_layout results). The param error
    measures the last optimizer step applied to the gradients, relative to the reference update, with each
    element weighted by its gradient's signal-to-noise (see ``_update_err``): Adam turns float noise in
    near-zero gradients into lr-sized differences that no layout can avoid."""
    loss_err = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got["losses"], ref["losses"]))
    if ref["grads"].keys() != got["grads"].keys():
        missing = sorted(set(ref["grads"]) ^ set(got["grads"]))
        raise AssertionError(f"parameter sets differ: {missing[:5]}")
    grad_err = max(_rel(got["grads"][n], g) for n, g in ref["grads"].items() if g.norm() > 0)
    param_err = 0.0
    for name, final in ref["final"].items():
        update = final - ref["initial"][name]
        if update.norm() > 0:
            grad = ref["grads"][name]
            param_err = max(param_err, _update_err(update, got["final"][name] - final, grad,
                                                   got["grads"][name] - grad))
    return loss_err, grad_err, param_err


def validate_layouts(spec: CheckSpec, layouts: list[Layout]) -> None:
    """Fail before spawning anything if a layout cannot hold this model (ConfigError says why)."""
    for layout in layouts:
        cfg = R1Config(model=spec.model, parallel=layout.parallel_config(spec.micro_batch_size),
                       trainer=TrainerConfig(global_batch_size=spec.global_batch))
        validate_config(cfg, world_size=layout.world_size)


def check_layouts(spec: CheckSpec, layouts: list[Layout], timeout_s: float = 300.0,
                  reference: dict | None = None) -> list[LayoutReport]:
    validate_layouts(spec, layouts)
    t0 = time.monotonic()
    ref = reference or run_layout(spec, Layout(), timeout_s)
    reports = [LayoutReport("1", 1, time.monotonic() - t0, 0.0, 0.0, 0.0, ref["losses"])]
    for layout in layouts:
        t0 = time.monotonic()
        got = run_layout(spec, layout, timeout_s)
        errs = compare(ref, got)
        reports.append(LayoutReport(layout.name(), layout.world_size, time.monotonic() - t0, *errs,
                                    got["losses"]))
    return reports


def format_table(model: str, reports: list[LayoutReport]) -> str:
    lines = [f"model={model}",
             f"{'layout':<12}{'procs':>6}{'time_s':>8}{'loss_rel':>11}{'grad_rel':>11}{'param_rel':>11}  losses"]
    for r in reports:
        losses = " ".join(f"{x:.6f}" for x in r.losses)
        lines.append(f"{r.layout:<12}{r.world_size:>6}{r.seconds:>8.1f}{r.loss_rel_err:>11.2e}"
                     f"{r.grad_rel_err:>11.2e}{r.param_rel_err:>11.2e}  {losses}")
    return "\n".join(lines)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    payload = json.loads(Path(sys.argv[2]).read_text())
    _worker(CheckSpec.from_dict(payload["spec"]), Layout(**payload["layout"]), sys.argv[3])
elif __name__ == "__main__":
    argparse.ArgumentParser().error("internal worker entry; use tools/check_parallel.py")
