"""Refit bandwidth: shards -> HF tensors -> engine buffers through the bridge vs a plain memcpy.

Builds a ~1 GB (float32) Qwen3-MoE-style policy in one process, streams it through
``r1mega.bridge.export`` in buckets and copies every HF tensor into preallocated "engine" tensors (what
an in-place engine weight update does); then copies the same number of bytes with one flat
``Tensor.copy_``. Best of ``--repeats`` for each, same run, same machine. Also reports the peak RSS
growth during an export that only touches each bucket (no engine copy) against the bucket size.

    python tools/bench_refit.py [--gb 1.0] [--bucket-mb 256] [--repeats 3]

Last line: ``refit_vs_memcpy=<memcpy_time / refit_time>`` (target >= 0.5).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="model size in GB (float32)")
    parser.add_argument("--bucket-mb", type=float, default=256.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine", action="store_true",
                        help="end-to-end mode: shards -> bridge -> a live vLLM engine (tools/bench_refit_engine.py): "
                             "old vs new transport, interleaved, each with its time breakdown")
    parser.add_argument("--no-throughput", action="store_true", help="--engine: skip the generation part")
    args = parser.parse_args(argv)
    if args.engine:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_refit_engine import main as engine_main

        return engine_main(["--gb", str(args.gb), "--bucket-mb", str(args.bucket_mb), "--repeats", str(args.repeats)]
                           + (["--no-throughput"] if args.no_throughput else []))

    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    import torch

    import r1mega.models  # noqa: F401  (readies megatron)
    from r1mega.bridge.export import StreamingExporter
    from r1mega.config.presets import resolve_model
    from r1mega.config.schema import ModelConfig, ParallelConfig
    from r1mega.models.policy import build_policy
    from r1mega.platform.distributed import init_model_parallel, init_process_group

    # hidden 1024, 32 experts x 512 per layer: ~54M params per layer; vocab rows 2 x 32k x 1024
    layers = max(1, round((args.gb * 2**30 / 4 - 2 * 32768 * 1024) / 54.5e6))
    model_cfg = resolve_model(ModelConfig(
        preset="qwen3_moe", num_layers=layers, hidden_size=1024, num_attention_heads=16, num_query_groups=4,
        kv_channels=64, ffn_hidden_size=2048, moe_ffn_hidden_size=512, num_experts=32, moe_router_topk=4,
        vocab_size=32768))
    init_process_group()
    parallel = ParallelConfig(tp=1, pp=1, ep=1, dp=1)
    init_model_parallel(parallel, seed=0)
    t0 = time.perf_counter()
    with torch.no_grad():
        stage = build_policy(model_cfg, parallel)
    print(f"built {layers}-layer model in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    bucket_bytes = int(args.bucket_mb * 2**20)
    exporter = StreamingExporter(stage.model, stage.config, model_cfg, bucket_bytes=bucket_bytes)
    engine = {}
    for bucket in StreamingExporter(stage.model, stage.config, model_cfg, bucket_bytes=bucket_bytes).buckets():
        for name, t in bucket:
            engine[name] = torch.empty(t.shape, dtype=t.dtype)
    total = sum(t.numel() * t.element_size() for t in engine.values())

    # peak memory of a bare export (consumer touches each tensor, keeps nothing)
    rss_before = _rss_peak_bytes()
    checksum = 0.0
    for bucket in exporter.buckets():
        checksum += sum(float(t.reshape(-1)[0]) for _, t in bucket)
    export_rss_growth = _rss_peak_bytes() - rss_before

    def refit() -> None:
        for bucket in StreamingExporter(stage.model, stage.config, model_cfg, bucket_bytes=bucket_bytes).buckets():
            for name, t in bucket:
                engine[name].copy_(t)

    src = torch.empty(total // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)

    def memcpy() -> None:
        dst.copy_(src)

    def best(fn) -> float:
        fn()  # warm-up (page faults on the destination)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    t_refit, t_memcpy = best(refit), best(memcpy)
    ok = all(torch.equal(engine[n], t) for b in exporter.buckets() for n, t in b)
    gbps = lambda s: total / s / 1e9  # noqa: E731
    print(f"bytes={total / 2**30:.2f} GiB tensors={len(engine)} bucket={args.bucket_mb:.0f} MiB "
          f"buckets={exporter.stats.buckets} correct={ok}")
    print(f"refit {t_refit * 1e3:.1f} ms ({gbps(t_refit):.2f} GB/s); memcpy {t_memcpy * 1e3:.1f} ms "
          f"({gbps(t_memcpy):.2f} GB/s)")
    print(f"export peak RSS growth {export_rss_growth / 2**20:.1f} MiB (bucket {args.bucket_mb:.0f} MiB; one "
          f"process: HF tensors are views of the parameters)")
    print(f"refit_vs_memcpy={t_memcpy / t_refit:.3f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
