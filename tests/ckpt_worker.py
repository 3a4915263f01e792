"""Scripted checkpoint scenarios in fresh gloo processes (``tests/test_checkpoint.py`` drives this).

A *job* is a layout, a model, an optimizer and a list of actions run in order on every rank:

    {"op": "train", "steps": 2}                      next global batches (batch i for step i)
    {"op": "gather", "tag": "at_save"}              full params + Adam moments on rank 0
    {"op": "save", "root": ..., "keep_last": 2, "fault": "before_rename"}
    {"op": "load", "path": ..., "strict": true}      step continues from the checkpoint
    {"op": "listdir", "root": ..., "tag": ...}       files under a checkpoint root
    {"op": "build", "model": {...}}                  rebuild the model (e.g. other num_layers)
    {"op": "rng", "tag": ...}                        draw from python/numpy/torch RNG (rank 0's)

Any action may carry ``"expect_error": "<exception class name>"``: the error's message is recorded
instead of failing. Rank 0 writes the results (losses per step, gathered tensors, messages, timings)
with ``torch.save``; :func:`run_job` spawns the ranks with a timeout and returns them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from r1mega.config.schema import ModelConfig, OptimizerConfig
from r1mega.platform.spawn import spawn_ranks
from r1mega.train.parallel_check import Layout


@dataclasses.dataclass
class Job:
    layout: str
    actions: list[dict]
    model: dict = dataclasses.field(default_factory=lambda: {"preset": "qwen3_moe", "size": "tiny"})
    optimizer: dict = dataclasses.field(default_factory=lambda: {
        "lr": 3e-3, "min_lr": 3e-4, "weight_decay": 0.01, "clip_grad": 1.0, "warmup_steps": 1,
        "lr_decay_style": "cosine"})
    use_distributed_optimizer: bool = True
    total_steps: int = 8  # scheduler horizon: must be the same in runs that share checkpoints
    global_batch: int = 4
    micro_batch_size: int = 1
    seq_length: int = 32
    data_seed: int = 11


def run_job(job: Job, timeout_s: float = 180.0, name: str | None = None) -> dict:
    """Run ``job`` in ``Layout.parse(job.layout).world_size`` fresh processes; rank 0's results."""
    layout = Layout.parse(job.layout)
    with tempfile.TemporaryDirectory(prefix="r1mega-ckpt-job-") as tmp:
        job_path, out_path = Path(tmp, "job.json"), Path(tmp, "out.pt")
        job_path.write_text(json.dumps(dataclasses.asdict(job)))
        spawn_ranks([str(Path(__file__).resolve()), "--worker", str(job_path), str(out_path)],
                    layout.world_size, timeout_s, name=name or f"ckpt job {layout.name()}", log_dir=tmp)
        return torch.load(out_path, weights_only=True)


# ----------------------------------------------------------------------------- worker side


def _global_batches(job: Job, vocab_size: int, count: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(job.data_seed)
    return [torch.randint(0, vocab_size, (job.global_batch, job.seq_length + 1), generator=gen)
            for _ in range(count)]


def _optimizer_moments(tm) -> dict[str, dict[str, torch.Tensor]]:
    """Per local parameter name: the optimizer's full (this rank's TP/EP shard) fp32 param,
    exp_avg and exp_avg_sq. The distributed optimizer's DP-sharded ranges are summed over its
    data-parallel group (each element lives on exactly one DP rank). Collective."""
    import torch.distributed as dist

    from r1mega.ckpt.dist_ckpt import _is_distributed_optimizer, _leaf_optimizers

    names = {p: n for n, p in tm.module.named_parameters()}
    keys = ("param", "exp_avg", "exp_avg_sq")
    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in keys}
    for leaf in _leaf_optimizers(tm.optimizer):
        if _is_distributed_optimizer(leaf):
            params = [p for buf in leaf.buffers for p in buf.param_index_map]
            local = {}
            for gbuf_range_maps in leaf.gbuf_ranges:
                for per_bucket in gbuf_range_maps.values():
                    for bucket in per_bucket:
                        for model_param, rmap in bucket["param_map"].items():
                            tensors = leaf._get_main_param_and_optimizer_states(model_param)
                            local[model_param] = (rmap["param"], tensors)
            for key in keys:
                flat = [torch.zeros(p.numel(), dtype=torch.float32) for p in params]
                for f, p in zip(flat, params):
                    if p in local:
                        rng, tensors = local[p]
                        f[rng.start:rng.end] = tensors[key].detach().float().cpu()
                joined = torch.cat(flat) if flat else torch.zeros(0)
                if leaf.data_parallel_group.size() > 1:
                    dist.all_reduce(joined, group=leaf.data_parallel_group)
                for p, part in zip(params, joined.split([p.numel() for p in params])):
                    out[key][names[p]] = part.view(p.shape).clone()
        else:  # fp32 optimizer: its params are the model's (bf16 would need its fp32 copies mapped)
            inner = leaf.optimizer
            for group in inner.param_groups:
                for p in group["params"]:
                    if p not in names:
                        raise NotImplementedError("optimizer state gather: only fp32 models without "
                                                  "the distributed optimizer")
                    st = inner.state.get(p, {})
                    out["param"][names[p]] = p.detach().float().clone()
                    for key in ("exp_avg", "exp_avg_sq"):
                        out[key][names[p]] = (st[key].detach().float().clone() if key in st
                                              else torch.zeros_like(p, dtype=torch.float32))
    return out


def gather_state(tm) -> dict | None:
    """Full canonical model params and optimizer state on rank 0 (None elsewhere). Collective."""
    from r1mega.models.sharding import gather_full

    result = {"model": gather_full(tm.module, tm.config)}
    for key, tensors in _optimizer_moments(tm).items():
        result[f"optim.{key}"] = gather_full(tm.module, tm.config, tensors)
    return result if result["model"] is not None else None


def _build(job: Job, model: dict):
    from r1mega.config.presets import resolve_model
    from r1mega.train.model_setup import build_training_model

    layout = Layout.parse(job.layout)
    parallel = dataclasses.replace(layout.parallel_config(job.micro_batch_size),
                                   use_distributed_optimizer=job.use_distributed_optimizer)
    model_cfg = resolve_model(ModelConfig(**model))
    tm = build_training_model(model_cfg, parallel, OptimizerConfig(**job.optimizer),
                              total_steps=job.total_steps)
    return tm, model_cfg


def _worker(job: Job, out_path: str) -> None:
    import torch.distributed as dist

    from r1mega.config.presets import resolve_model
    from r1mega.platform.distributed import init_model_parallel, init_process_group, shutdown

    init_process_group(timeout_minutes=5)
    layout = Layout.parse(job.layout)
    init_model_parallel(layout.parallel_config(job.micro_batch_size),
                        seed=resolve_model(ModelConfig(**job.model)).seed)

    from r1mega.ckpt import load_checkpoint, save_checkpoint
    from r1mega.train.lm_step import lm_train_step, local_batch

    tm, model_cfg = _build(job, job.model)
    batches = _global_batches(job, model_cfg.vocab_size, job.total_steps)
    results: dict = {"losses": {}, "loss_log": [], "gathered": {}, "errors": {}, "listings": {}, "rng": {},
                     "saves": [], "loads": []}
    step = 0
    for index, action in enumerate(job.actions):
        op = action["op"]
        expected = action.get("expect_error")
        fault = action.get("fault")
        if fault:
            os.environ["R1MEGA_CKPT_FAULT"] = fault
        try:
            if op == "train":
                for _ in range(action["steps"]):
                    res = lm_train_step(tm, local_batch(batches[step]), micro_batch_size=job.micro_batch_size)
                    results["losses"][step] = res.loss
                    results["loss_log"].append([step, res.loss])
                    step += 1
            elif op == "gather":
                results["gathered"][action["tag"]] = gather_state(tm)
            elif op == "save":
                t0 = time.perf_counter()
                kwargs = {"optim_sharding_type": action["sharding"]} if "sharding" in action else {}
                path = save_checkpoint(tm, action["root"], step,
                                       extra={"consumed_samples": step * job.global_batch},
                                       keep_last=action.get("keep_last"), model_cfg=model_cfg, **kwargs)
                results["saves"].append({"step": step, "path": str(path),
                                         "seconds": time.perf_counter() - t0})
            elif op == "load":
                info = load_checkpoint(tm, action["path"], strict=action.get("strict", True),
                                       model_cfg=model_cfg, load_optimizer=action.get("load_optimizer", True))
                if info["extra"].get("consumed_samples") != info["step"] * job.global_batch:
                    raise AssertionError(f"extra not restored: {info['extra']}")
                step = info["step"]
                results["loads"].append({"step": step, "path": str(info["path"]), "seconds": info["seconds"],
                                         "same_layout": info["same_layout"]})
            elif op == "listdir":
                root = Path(action["root"])
                latest = root / "latest"
                results["listings"][action["tag"]] = {
                    "entries": sorted(p.name for p in root.iterdir()),
                    "latest": latest.read_text().strip() if latest.exists() else None}
            elif op == "build":
                tm, model_cfg = _build(job, {**job.model, **action.get("model", {})})
            elif op == "rng":  # draws from every stream (advances them)
                import random

                import numpy as np

                draws = [random.random(), float(np.random.rand()), float(torch.rand(1))]
                results["rng"][action["tag"]] = draws
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as e:  # noqa: BLE001 - matched against the expectation below
            if expected and any(cls.__name__ == expected for cls in type(e).__mro__):
                results["errors"][action.get("tag", str(index))] = f"{type(e).__name__}: {e}"
            else:
                raise
        else:
            if expected:
                raise AssertionError(f"action {index} ({action}) did not raise {expected}")
        finally:
            if fault:
                os.environ.pop("R1MEGA_CKPT_FAULT", None)
        if dist.is_initialized():
            dist.barrier()
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    shutdown()


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    _payload = json.loads(Path(sys.argv[2]).read_text())
    _worker(Job(**_payload), sys.argv[3])
elif __name__ == "__main__":
    raise SystemExit("worker of the checkpoint tests (see tests/test_checkpoint.py)")
