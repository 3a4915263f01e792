#!/usr/bin/env python
"""Peak memory per rank and step time of one long-sequence training step: cp1 vs cp2, recompute off/on.

    python tools/bench_long_context.py --lengths 2048,4096,8192,16384

A tiny Qwen3-MoE (CPU, gloo, one thread per rank) takes one learner step (masked NLL over every
position, Adam) on a single sequence of each length. Configurations: context parallelism 1 and 2
(``parallel.cp``), each with activation recompute off and ``full``/``uniform``/1 layer
(``parallel.recompute_*``). Each configuration runs in fresh processes over the lengths in
ascending order after a short warm-up step. Peak = the highest RSS during the step (the process's
high-water mark when the step raised it, else a 1 ms RSS sampler) minus the RSS just before it,
max over ranks; large allocations are returned to the OS between steps (``MALLOC_MMAP_THRESHOLD_``).
Last line: ``cp2_peak_mem_ratio=<cp2 / cp1 at the longest length> recompute_mem_ratio=<recompute on /
off, cp1, longest length>`` (expected: cp2 <= 0.6).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = [(1, False), (1, True), (2, False), (2, True)]  # (cp, recompute)


class PeakRss:
    """Highest RSS while active: the kernel's high-water mark when it moved, else a 1 ms sampler."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.before = self.proc.memory_info().rss
        self.hwm_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.sampled, self.stop = self.before, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.001):
            self.sampled = max(self.sampled, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = hwm if hwm > self.hwm_before else self.sampled
        self.peak = max(peak, self.sampled) - self.before


def _worker(spec: dict) -> None:
    import torch

    from r1mega.config.presets import resolve_model
    from r1mega.config.schema import ModelConfig, OptimizerConfig, ParallelConfig
    from r1mega.platform.distributed import init_model_parallel, init_process_group, shutdown

    init_process_group(timeout_minutes=30)
    longest = max(spec["lengths"])
    model = resolve_model(ModelConfig(preset="qwen3_moe", seq_length=longest, max_position_embeddings=longest))
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) \
        if spec["recompute"] else {}
    parallel = ParallelConfig(cp=spec["cp"], **recompute)
    init_model_parallel(parallel, seed=model.seed)

    from r1mega.rl.learner import LearnerBatch, LearnerSettings, learner_step
    from r1mega.train.model_setup import build_training_model

    tm = build_training_model(model, parallel, OptimizerConfig(lr=1e-4), total_steps=len(spec["lengths"]) + 1)
    settings = LearnerSettings(micro_batch_size=1, valid_vocab=model.vocab_size, chunk_size=1024)

    def step(length: int):
        tokens = torch.randint(0, model.vocab_size, (1, length + 1), generator=torch.Generator().manual_seed(length))
        return learner_step(tm, LearnerBatch(tokens, torch.ones(1, length)), settings, None)

    step(256)  # warm-up: optimizer state, megatron buffers
    rows = []
    for length in sorted(spec["lengths"]):
        torch.distributed.barrier()
        with PeakRss() as mem:
            t0 = time.perf_counter()
            result = step(length)
            seconds = time.perf_counter() - t0
        rows.append({"length": length, "peak_bytes": mem.peak, "seconds": seconds, "loss": result.values["loss"]})
    Path(spec["out"], f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(rows))
    shutdown()


def _run_config(cp: int, recompute: bool, lengths: list[int], timeout_s: float) -> list[dict]:
    """Per length: peak bytes (max over ranks) and step seconds (max over ranks)."""
    from r1mega.platform.spawn import spawn_ranks

    with tempfile.TemporaryDirectory(prefix="r1mega-longctx-") as tmp:
        spec = {"cp": cp, "recompute": recompute, "lengths": lengths, "out": tmp}
        spawn_ranks([str(Path(__file__).resolve()), "--worker", json.dumps(spec)], cp, timeout_s,
                    name=f"cp{cp}{'-recompute' if recompute else ''}", log_dir=tmp,
                    env={"MALLOC_MMAP_THRESHOLD_": "65536"})
        ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
    return [{"length": rows[0]["length"], "peak_bytes": max(r["peak_bytes"] for r in rows),
             "seconds": max(r["seconds"] for r in rows), "loss": rows[0]["loss"]} for rows in zip(*ranks)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,4096,8192,16384", help="tokens per sequence (multiples of 4)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return 0
    lengths = sorted(int(x) for x in args.lengths.split(","))
    if any(n % 4 for n in lengths):
        parser.error("--lengths must be multiples of 4 (cp2 splits every sequence into 4 chunks)")
    results = {cfg: _run_config(*cfg, lengths, args.timeout) for cfg in CONFIGS}
    print(f"{'length':>7}" + "".join(f"{f'cp{cp} rc{int(rc)} MiB':>15}{'s':>7}" for cp, rc in CONFIGS))
    for i, n in enumerate(lengths):
        cells = "".join(f"{results[c][i]['peak_bytes'] / 2**20:>15.1f}{results[c][i]['seconds']:>7.2f}"
                        for c in CONFIGS)
        print(f"{n:>7}{cells}")
    for i, n in enumerate(lengths):  # the same step in every configuration: the same loss
        losses = [results[c][i]["loss"] for c in CONFIGS]
        if max(losses) - min(losses) > 1e-4 * abs(losses[0]):
            print(f"warning: losses differ at {n} tokens: {losses}")
    peak = {c: results[c][-1]["peak_bytes"] for c in CONFIGS}
    print(f"cp2_peak_mem_ratio={peak[(2, False)] / peak[(1, False)]:.3f} "
          f"recompute_mem_ratio={peak[(1, True)] / peak[(1, False)]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
