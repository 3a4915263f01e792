#!/usr/bin/env python
"""Peak memory of per-token log-probs + entropy (forward and backward): chunked vs full logits.

    python tools/bench_logprob.py --vocab 152064 --tokens 2048 --hidden 256

Each path runs in a fresh process (so one path's allocator state cannot hide the other's peak);
peak = max RSS during the path minus RSS just before it. Inputs and the weight gradient are the same
in both. Last line: ``peak_mem_ratio=<chunked/naive> max_abs_err=<v>`` (target ratio <= 0.125).
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
    from r1mega.rl.vocab_parallel import VocabShard, logprob_and_entropy, naive_logprob_and_entropy

    torch.manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, requires_grad=True)
    weight = (torch.randn(args.vocab, args.hidden) * 0.02).requires_grad_()
    target = torch.randint(0, args.vocab, (args.tokens,))
    rss_before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    if args.path == "chunked":
        logp, ent = logprob_and_entropy(hidden, weight, target, VocabShard(0, args.vocab), chunk_size=args.chunk)
    else:
        logp, ent = naive_logprob_and_entropy(hidden, weight, target)
    (logp.sum() + 0.1 * ent.sum()).backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    torch.save({"logp": logp.detach(), "entropy": ent.detach()}, args.out + ".pt")
    Path(args.out + ".json").write_text(json.dumps({"peak_bytes": peak - rss_before, "seconds": seconds}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--path", choices=["chunked", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.path:
        _run_path(args)
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in ("chunked", "naive"):
            out = str(Path(tmp, path))
            cmd = [sys.executable, __file__, "--path", path, "--out", out, "--vocab", str(args.vocab),
                   "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--chunk", str(args.chunk)]
            subprocess.run(cmd, check=True, timeout=900)
            results[path] = json.loads(Path(out + ".json").read_text())
            results[path].update(torch.load(out + ".pt", weights_only=True))
    err = max(float((results["chunked"][k] - results["naive"][k]).abs().max()) for k in ("logp", "entropy"))
    mib = {p: results[p]["peak_bytes"] / 2**20 for p in results}
    print(f"tokens={args.tokens} vocab={args.vocab} hidden={args.hidden} chunk={args.chunk}")
    for p in ("naive", "chunked"):
        print(f"{p:>8}: peak {mib[p]:8.1f} MiB  forward+backward {results[p]['seconds']:.2f} s")
    print(f"peak_mem_ratio={mib['chunked'] / mib['naive']:.4f} max_abs_err={err:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
