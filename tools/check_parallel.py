#!/usr/bin/env python
"""Check that TP/PP/EP layouts train exactly like one process (CPU, gloo).

    python tools/check_parallel.py --model qwen3_moe --layouts tp2,ep2,pp2,tp2ep2,tp2ep2pp2
    python tools/check_parallel.py --model qwen2 --layouts tp2,pp2,tp2pp2   # dense presets: no EP
    python tools/check_parallel.py --model deepseek_v3 --set num_layers=5 --set first_k_dense_layers=3 \
        --layouts pp2first2,pp2last2                                       # uneven pipeline splits

Prints a table of loss / gradient / updated-parameter relative errors per layout and, as its last
line, ``max_rel_err=<value>``; exits 1 above ``--tol``.
"""

from __future__ import annotations

import argparse
import sys

from r1mega.config import ConfigError, load_config
from r1mega.config.presets import PRESETS
from r1mega.train.parallel_check import CheckSpec, Layout, check_layouts, format_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3_moe", choices=sorted(PRESETS))
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="model field override, e.g. num_layers=5 (repeatable)")
    parser.add_argument("--layouts", default="tp2,ep2,pp2,tp2ep2,tp2ep2pp2")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=32)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per layout")
    args = parser.parse_args(argv)
    try:
        layouts = [Layout.parse(x) for x in args.layouts.split(",") if x.strip()]
        model = load_config(overrides=[f"model.preset={args.model}", f"model.size={args.size}",
                                       *(f"model.{item}" for item in args.set)]).model
    except ValueError as e:  # ConfigError too
        parser.error(str(e))
    spec = CheckSpec(model=model, steps=args.steps,
                     global_batch=args.global_batch, seq_length=args.seq_length)
    try:
        reports = check_layouts(spec, layouts, timeout_s=args.timeout)
    except ConfigError as e:  # a layout that cannot hold this model: refused before anything spawns
        parser.error(str(e))
    print(format_table(" ".join([f"{args.model}/{args.size}", *args.set]), reports))
    worst = max(r.max_rel_err for r in reports)
    print(f"max_rel_err={worst:.3e}")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
