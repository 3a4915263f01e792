"""Rollout on several engines, and the learner's DP token balance on a long-tailed batch.

Why: a GRPO step generates on world_size / rollout.tp engines and then trains on the learner's
data-parallel ranks; each rank waits for the one with the most tokens. Two measurements:

- engines: the same batch on 1, 2 and 4 engines (on CPU with the same total number of threads), the
  per-engine token share and the wall time per engine count. PENDING: this part needs the rollout
  over several engines; until then the script says so and reports no wall times.
- balance: a batch of ``--prompts`` x ``--group`` samples (prompt lengths uniform in
  [``--prompt-min``, ``--prompt-max``], one per group; response lengths lognormal with median
  ``--median`` tokens and sigma ``--sigma``, truncated at ``--max-new-tokens``) split over ``--dp``
  learner ranks: the imbalance (largest per-rank token count over the mean) of the learner's contiguous
  split next to the token-balanced one (``rl.balance``), with whole GRPO groups kept together as well.

    PYTHONPATH=. python tools/bench_rollout.py [--engines 1,2,4] [--dp 8] [--prompts 32 --group 8]

Last line: ``rollout_engines=<list> wall_s=<list> dp_imbalance_contiguous=<x> dp_imbalance_balanced=<y>``
(``wall_s=pending`` while the engine part is pending).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r1mega.rl.balance import balanced_partition, contiguous_partition, imbalance  # noqa: E402


def long_tailed_batch(args) -> tuple[list[int], list[int]]:
    """Tokens per sample (prompt + response) and the sample's GRPO group, in rollout order."""
    gen = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(args.prompt_min, args.prompt_max + 1, (args.prompts,), generator=gen)
    n = args.prompts * args.group
    responses = torch.empty(n).log_normal_(float(torch.tensor(args.median).log()), args.sigma, generator=gen)
    responses = responses.clamp(min=1, max=args.max_new_tokens).long()
    groups = [i // args.group for i in range(n)]
    return [int(prompts[g] + r) for g, r in zip(groups, responses)], groups


def measure_balance(args) -> dict[str, float]:
    tokens, groups = long_tailed_batch(args)
    t0 = time.perf_counter()
    balanced = balanced_partition(tokens, args.dp)
    seconds = time.perf_counter() - t0
    contiguous = contiguous_partition(len(tokens), args.dp)
    by_group = balanced_partition(tokens, args.dp, groups=groups)
    for name, part in (("contiguous", contiguous), ("balanced", balanced), ("balanced_groups", by_group)):
        per_rank = [sum(tokens[i] for i in p) for p in part]
        print(f"split={name} dp={args.dp} rank_tokens={per_rank} imbalance={imbalance(tokens, part):.4f}")
    result = {"contiguous": imbalance(tokens, contiguous), "balanced": imbalance(tokens, balanced),
              "balanced_groups": imbalance(tokens, by_group)}
    print(f"samples={len(tokens)} tokens={sum(tokens)} max_sample={max(tokens)} "
          f"mean_rank={sum(tokens) / args.dp:.0f} partition_ms={seconds * 1e3:.1f} "
          f"contiguous_over_balanced={result['contiguous'] / result['balanced']:.3f}")
    return result


def measure_engines(engine_counts: list[int], args) -> list[float] | None:
    """Wall time of the same batch on each engine count. Pending: needs the rollout over several
    engines (one engine per rollout-TP group); returns None until then."""
    print(f"engines={engine_counts}: PENDING, the rollout over several engines is not wired yet; "
          "no wall times are reported")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="1,2,4", help="engine counts, comma-separated")
    parser.add_argument("--dp", type=int, default=8, help="learner data-parallel ranks")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--group", type=int, default=8, help="samples per prompt (GRPO group size)")
    parser.add_argument("--prompt-min", type=int, default=32)
    parser.add_argument("--prompt-max", type=int, default=256)
    parser.add_argument("--median", type=float, default=400.0, help="median response length (tokens)")
    parser.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of the response lengths")
    parser.add_argument("--max-new-tokens", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        engines = [int(x) for x in args.engines.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--engines {args.engines!r}: give engine counts like 1,2,4")
    if not engines or min(engines) < 1:
        parser.error(f"--engines {args.engines!r}: give positive engine counts like 1,2,4")
    if args.dp < 1 or (args.prompts * args.group) % args.dp or args.prompts % args.dp:
        parser.error(f"--prompts {args.prompts} x --group {args.group} must split over --dp {args.dp} "
                     "(whole prompts per rank as well): choose --prompts as a multiple of --dp")
    balance = measure_balance(args)
    wall = measure_engines(engines, args)
    wall_s = "pending" if wall is None else "[" + ",".join(f"{w:.2f}" for w in wall) + "]"
    print(f"rollout_engines=[{','.join(map(str, engines))}] wall_s={wall_s} "
          f"dp_imbalance_contiguous={balance['contiguous']:.4f} dp_imbalance_balanced={balance['balanced']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
