#!/usr/bin/env python
"""Model FLOPs per token, and measured tokens/s, TFLOP/s and MFU of a preset on this machine.

    python tools/bench_mfu.py --flops-only --model deepseek_v3 --size 671b --seq-len 4096
    python tools/bench_mfu.py --flops-only --model dense --size qwen3_8b --seq-len 4096
    python tools/bench_mfu.py --model qwen3_moe --size tiny --seq-len 256 --batch 4 --steps 5 --experts-compare

``--flops-only`` prints ``flops_per_token=<v>`` (training: fwd + bwd = 3 x forward, the MFU numerator;
see ``r1mega/train/flops.py`` for every convention) and a term-by-term table. ``--model dense`` takes
a dense reference architecture (``--size qwen3_8b | llama3_8b | qwen2_7b | tiny | <family>_<size>``: the
dense presets qwen2, qwen3, llama3, which ``--model qwen3 --size 8b`` also names); ``--num-experts 0``
counts any preset's FLOPs with a dense MLP in every layer.

Without ``--flops-only`` it times ``--steps`` real training steps (after ``--warmup``) of the model
with r1mega's stack (``build_training_model`` + ``lm_train_step``: megatron DDP, distributed
optimizer, one process) and reports tokens/s, achieved TFLOP/s (model FLOPs) and MFU against a peak:
on CUDA the H100 SXM dense peak (BF16 989, FP8 1979, FP32 via TF32 494.5 TFLOP/s) and a bf16 matmul
peak measured in the same run (8192^3, best of 10); on CPU a float32
matmul peak measured in the same run (``--peak-matmul N``: N x N x N, best of 5). It prints which
expert implementation ran; ``--experts grouped`` uses ``model.moe_grouped_experts``, and
``--experts-compare`` times SequentialMLP and the grouped experts one after the other in this run.
``--set field=value`` overrides any ``ModelConfig`` field (e.g. ``--set hidden_size=256``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from r1mega.config.presets import resolve_model  # noqa: E402
from r1mega.config.schema import ModelConfig  # noqa: E402
from r1mega.train.flops import dense_model, flops_breakdown, format_breakdown  # noqa: E402

CUDA_PEAK_TFLOPS = {"bf16": 989.0, "fp8": 1979.0, "fp32": 494.5}  # H100 SXM dense


def _parse_value(field_type: str, text: str):
    if text.lower() in ("none", "null"):
        return None
    if "bool" in field_type:
        return text.lower() in ("1", "true", "yes")
    if "int" in field_type:
        return int(text)
    if "float" in field_type:
        return float(text)
    return text


def model_from_args(args) -> ModelConfig:
    types = {f.name: str(f.type) for f in fields(ModelConfig)}
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"--set {item!r}: ModelConfig has no field {key!r}")
        overrides[key] = _parse_value(types[key], value)
    if args.num_experts is not None:
        overrides["num_experts"] = args.num_experts
    overrides["seq_length"] = args.seq_len
    if args.model == "dense":
        m = dense_model(args.size or "qwen3_8b", **overrides)
    else:
        m = resolve_model(ModelConfig(preset=args.model, size=args.size or "tiny", **overrides))
    if m.max_position_embeddings < args.seq_len:
        m = replace(m, max_position_embeddings=args.seq_len)
    return m


def measure_cpu_matmul_peak(n: int) -> float:
    """Best float32 matmul rate (FLOP/s) of ``n^3`` on this machine, 5 tries."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def measure_cuda_matmul_peak(n: int = 8192) -> float:
    """Best bf16 matmul rate (FLOP/s) of ``n^3`` on this GPU, 10 tries (after a warm-up)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * n**3 / best


def time_training(model: ModelConfig, args) -> dict:
    """Seconds per step of ``args.steps`` training steps on one process (after warm-up)."""
    import torch

    from r1mega.config.schema import OptimizerConfig, ParallelConfig
    from r1mega.models.grouped_experts import expert_path
    from r1mega.train.lm_step import lm_train_step
    from r1mega.train.model_setup import build_training_model

    tm = build_training_model(model, ParallelConfig(micro_batch_size=args.batch), OptimizerConfig(lr=1e-5),
                              total_steps=args.warmup + args.steps)
    path = expert_path(tm.module)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.vocab_size, (args.batch, args.seq_len + 1), generator=gen)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(args.warmup):
        lm_train_step(tm, tokens, args.batch)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        result = lm_train_step(tm, tokens, args.batch)
    sync()
    seconds = (time.perf_counter() - t0) / args.steps
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=acts) as prof:
            lm_train_step(tm, tokens, args.batch)
            sync()
        key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        print(f"--- profile of one step ({path}), top {args.profile} ops by {key}")
        print(prof.key_averages().table(sort_by=key, row_limit=args.profile, max_name_column_width=60))
    return {"expert_path": path, "seconds_per_step": seconds, "loss": result.loss}


def bench(args) -> int:
    import torch

    from r1mega.platform.distributed import init_model_parallel, init_process_group, shutdown

    model = model_from_args(args)
    b = flops_breakdown(model, args.seq_len)
    fpt = b.model_flops_per_token
    on_cuda = torch.cuda.is_available()
    measured_peak = None
    if on_cuda:
        peak, peak_src = CUDA_PEAK_TFLOPS[model.precision] * 1e12, f"H100 SXM dense {model.precision}"
        measured_peak = measure_cuda_matmul_peak()
    else:
        peak = measure_cpu_matmul_peak(args.peak_matmul)
        peak_src = f"float32 matmul {args.peak_matmul}^3 measured here"
    init_process_group()
    from r1mega.config.schema import ParallelConfig

    init_model_parallel(ParallelConfig(micro_batch_size=args.batch), seed=model.seed)
    variants = [False, True] if args.experts_compare else [args.experts == "grouped"]
    rows = []
    for grouped in variants:
        m = replace(model, moe_grouped_experts=grouped)
        r = time_training(m, args)
        tok_s = args.batch * args.seq_len / r["seconds_per_step"]
        rows.append(dict(r, tokens_per_s=tok_s, tflops=tok_s * fpt / 1e12, mfu=tok_s * fpt / peak))
        if measured_peak:
            rows[-1]["mfu_vs_measured_bf16_matmul"] = tok_s * fpt / measured_peak
    shutdown()
    print(f"model {model.preset}/{model.size} ({'dense' if not model.num_experts else 'MoE'}) "
          f"h={model.hidden_size} layers={model.num_layers} experts={model.num_experts} seq={args.seq_len} "
          f"batch={args.batch} precision={model.precision}; flops_per_token={fpt:.6e}")
    print(f"peak {peak / 1e12:.3f} TFLOP/s ({peak_src})")
    if measured_peak:
        print(f"measured bf16 matmul peak on {torch.cuda.get_device_name()}: {measured_peak / 1e12:.1f} TFLOP/s "
              "(8192^3); MFU vs it: " + ", ".join(f"{100 * r['mfu_vs_measured_bf16_matmul']:.2f}%" for r in rows))
    print(f"{'experts':<52}{'s/step':>9}{'tokens/s':>11}{'TFLOP/s':>10}{'MFU':>8}")
    for r in rows:
        print(f"{r['expert_path']:<52}{r['seconds_per_step']:>9.4f}{r['tokens_per_s']:>11.1f}"
              f"{r['tflops']:>10.4f}{100 * r['mfu']:>7.2f}%")
    if len(rows) == 2:
        print(f"grouped/sequential speed-up: {rows[0]['seconds_per_step'] / rows[1]['seconds_per_step']:.2f}x; "
              f"loss {rows[0]['loss']:.6f} vs {rows[1]['loss']:.6f}")
    if args.json:
        print(json.dumps({"flops_per_token": fpt, "peak_flops": peak, "runs": rows}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3_moe",
                   help="preset (qwen3_moe, deepseek_v3, mixtral, qwen2, qwen3, llama3) or dense")
    p.add_argument("--size", default=None, help="preset size (default tiny; dense: qwen3_8b)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--num-experts", type=int, default=None, help="0 = dense MLP in every layer")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="ModelConfig override")
    p.add_argument("--flops-only", action="store_true")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--experts", choices=["sequential", "grouped"], default="sequential")
    p.add_argument("--experts-compare", action="store_true", help="time both expert paths in this run")
    p.add_argument("--peak-matmul", type=int, default=2048, help="CPU peak: N of the timed N^3 matmul")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile one step and print the top N ops (torch.profiler)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.flops_only:
        model = model_from_args(args)
        b = flops_breakdown(model, args.seq_len)
        print(f"model {model.preset if args.model != 'dense' else 'dense'}/{args.size or 'default'} "
              f"seq_len={args.seq_len}")
        print(format_breakdown(b))
        print(f"flops_per_token={b.model_flops_per_token:.6e}")
        return 0
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
