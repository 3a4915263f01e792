#!/usr/bin/env python
"""Peak memory and time of per-token log-probs + entropy (forward and backward), three paths.

    python tools/bench_logprob.py --vocab 152064 --tokens 2048 --hidden 256

Paths: ``naive`` (full [tokens, vocab] logits), ``chunked`` (the pure-torch chunked fallback in
``r1mega.rl.vocab_parallel``) and ``cpp`` (the compiled fused op from ``csrc/``, tiled over tokens
and vocabulary). Each path runs in a fresh process (so one path's allocator state cannot hide the
other's peak); peak = max RSS during the path minus RSS just before it; time = forward + backward,
best of ``--repeat``. Inputs are the same for all. ``--device cuda`` measures the CUDA op against
the same paths (peak = the CUDA allocator's peak above what the inputs hold). Last lines:
``peak_mem_ratio=<chunked/naive> cpp_peak_mem_ratio=<cpp/naive> max_abs_err=<v>`` (target <= 0.125) and
``cpp_speedup=<chunked time / cpp time>`` (> 1: the C++ op is faster than the torch fallback).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch


def _run_path(args) -> None:
    from r1mega.kernels import load_ops
    from r1mega.rl.vocab_parallel import VocabShard, logprob_and_entropy, naive_logprob_and_entropy

    if args.path == "cpp" and not load_ops()["available"]:
        raise SystemExit(f"the C++ op did not build: {load_ops()['error']}")
    torch.manual_seed(0)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    hidden = torch.randn(args.tokens, args.hidden, device=dev, dtype=dtype, requires_grad=True)
    weight = (torch.randn(args.vocab, args.hidden, device=dev) * 0.02).to(dtype).requires_grad_()
    target = torch.randint(0, args.vocab, (args.tokens,), device=dev)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rss_before = psutil.Process().memory_info().rss
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        rss_before = torch.cuda.memory_allocated()
    seconds = float("inf")
    for _ in range(args.repeat):
        hidden.grad = weight.grad = None
        sync()
        t0 = time.perf_counter()
        if args.path == "naive":
            logp, ent = naive_logprob_and_entropy(hidden, weight, target)
        else:
            impl = "ext" if args.path == "cpp" else "torch"
            logp, ent = logprob_and_entropy(hidden, weight, target, VocabShard(0, args.vocab), chunk_size=args.chunk,
                                            impl=impl)
        (logp.sum() + 0.1 * ent.sum()).backward()
        sync()
        seconds = min(seconds, time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    torch.save({"logp": logp.detach().float().cpu(), "entropy": ent.detach().float().cpu()}, args.out + ".pt")
    Path(args.out + ".json").write_text(json.dumps({"peak_bytes": peak - rss_before, "seconds": seconds}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=2, help="time = best of this many runs")
    parser.add_argument("--device", default="cpu", help="cpu (peak = RSS) or cuda (peak = allocator peak)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--path", choices=["chunked", "naive", "cpp"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.path:
        _run_path(args)
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in ("chunked", "cpp", "naive"):
            out = str(Path(tmp, path))
            cmd = [sys.executable, __file__, "--path", path, "--out", out, "--vocab", str(args.vocab),
                   "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--chunk", str(args.chunk),
                   "--repeat", str(args.repeat), "--device", args.device, "--dtype", args.dtype]
            subprocess.run(cmd, check=True, timeout=900)
            results[path] = json.loads(Path(out + ".json").read_text())
            results[path].update(torch.load(out + ".pt", weights_only=True))
    err = max(float((results[p][k] - results["naive"][k]).abs().max())
              for k in ("logp", "entropy") for p in ("chunked", "cpp"))
    mib = {p: results[p]["peak_bytes"] / 2**20 for p in results}
    print(f"tokens={args.tokens} vocab={args.vocab} hidden={args.hidden} chunk={args.chunk} device={args.device} "
          f"dtype={args.dtype} threads={torch.get_num_threads()}")
    for p in ("naive", "chunked", "cpp"):
        print(f"{p:>8}: peak {mib[p]:8.1f} MiB  forward+backward {results[p]['seconds']:.2f} s")
    print(f"peak_mem_ratio={mib['chunked'] / mib['naive']:.4f} cpp_peak_mem_ratio={mib['cpp'] / mib['naive']:.4f} "
          f"max_abs_err={err:.2e}")
    print(f"cpp_speedup={results['chunked']['seconds'] / results['cpp']['seconds']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
