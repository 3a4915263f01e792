"""End-to-end refit benchmark: megatron shards -> bridge stream -> a live vLLM(-CPU) engine, with a time
breakdown, plus the engine wrapper's generation throughput next to raw vLLM on the same prompts.

The end-to-end mode of ``tools/bench_refit.py`` (that tool measures shards -> HF tensors -> plain
buffers). Builds the same ~``--gb`` GB float32 Qwen3-MoE-style policy in one process, writes it once
as an HF directory (the engine's start point), starts a TP1 engine in a child process
(``r1mega.rollout.vllm_engine.EngineProcess``, how a learner rank owns its engine), then, round after
round, re-draws the weights and pushes them with each transport in turn (interleaved, same engine, same
machine state): ``before`` = one vLLM reload per batch with tensors pickled as shared-memory handles
(the previous code path), ``after`` = one streamed vLLM reload fed from reused shared-memory buffers,
pipelined, and ``after`` with the engine's reload on one torch thread. Round 0 is reported as the
first refit, the last round is profiled (``RefitStats.breakdown`` with vLLM's reload internals), the
others give the best time. A plain ``Tensor.copy_`` of the same bytes is timed before every push (best
of all). The parity probe checks the engine got the new weights after each transport. Then a clean
child process loads the engine in-process and times ``VLLMEngine.generate`` against ``LLM.generate``
with the same ``SamplingParams`` (alternating, best of ``--repeats``; ``--no-throughput`` skips it).

    python tools/bench_refit_engine.py [--gb 1.0] [--bucket-mb 256] [--repeats 2] [--no-throughput]

Last lines: ``engine_refit_vs_memcpy=<memcpy_time / refit_time (after)>``,
``wrapper_vs_raw_tokens_per_s=<ratio>``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _throughput(hf_dir: str, prompts: int, n: int, tokens: int, repeats: int) -> dict:
    """In a process of its own: wrapper vs raw vLLM generation on identical requests."""
    from vllm import SamplingParams

    from r1mega.rollout import SamplingSpec
    from r1mega.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(hf_dir, seed=0)
    ids = [[(7 * i + 3 * k) % 500 + 3 for k in range(16)] for i in range(prompts)]
    spec = SamplingSpec(max_new_tokens=tokens, seed=1, ignore_eos=True)
    raw_params = [engine._params(spec, n, spec.seed + i) for i in range(prompts)]

    def wrapper() -> int:
        return sum(len(s.token_ids) for row in engine.generate(ids, n, spec) for s in row)

    def raw() -> int:
        outs = engine.llm.generate([{"prompt_token_ids": p} for p in ids], raw_params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    assert isinstance(SamplingParams, type)
    wrapper(), raw()  # warm-up
    best = {"wrapper": float("inf"), "raw": float("inf")}
    count = {}
    for _ in range(repeats):
        for name, fn in (("raw", raw), ("wrapper", wrapper)):
            t = time.perf_counter()
            count[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return {k: count[k] / best[k] for k in best} | {"tokens": count["wrapper"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="model size in GB (float32)")
    parser.add_argument("--bucket-mb", type=float, default=256.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--no-throughput", action="store_true", help="skip the generation-throughput part")
    parser.add_argument("--throughput-only", metavar="HF_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.throughput_only:
        print(json.dumps(_throughput(args.throughput_only, args.prompts, args.n, args.new_tokens, args.repeats)))
        return 0

    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    import torch

    import r1mega.models  # noqa: F401  (readies megatron)
    from r1mega.bridge.export import StreamingExporter
    from r1mega.bridge.hf_dir import save_hf
    from r1mega.config.presets import resolve_model
    from r1mega.config.schema import ModelConfig, ParallelConfig
    from r1mega.data.tokenizer_training import demo_corpus, train_hf_bpe
    from r1mega.models.policy import build_policy
    from r1mega.models.sharding import init_layout_invariant
    from r1mega.platform.distributed import init_model_parallel, init_process_group
    from r1mega.rollout import compare, probe_batch
    from r1mega.rollout.refit_profile import format_breakdown
    from r1mega.rollout.vllm_engine import EngineProcess

    layers = max(1, round((args.gb * 2**30 / 4 - 2 * 32768 * 1024) / 54.5e6))
    model_cfg = resolve_model(ModelConfig(
        preset="qwen3_moe", num_layers=layers, hidden_size=1024, num_attention_heads=16, num_query_groups=4,
        kv_channels=64, ffn_hidden_size=2048, moe_ffn_hidden_size=512, num_experts=32, moe_router_topk=4,
        vocab_size=32768, init_method_std=0.02))
    init_process_group()
    parallel = ParallelConfig(tp=1, pp=1, ep=1, dp=1)
    init_model_parallel(parallel, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="r1mega-bench-refit-"))
    with torch.no_grad():
        stage = build_policy(model_cfg, parallel)
    train_hf_bpe(demo_corpus(300), tmp / "tok" / "tokenizer.json", vocab_size=512)
    save_hf(stage.model, stage.config, model_cfg, tmp / "hf", tokenizer_dir=tmp / "tok")
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    bucket_bytes = int(args.bucket_mb * 2**20)
    nbytes = StreamingExporter(stage.model, stage.config, model_cfg).total_bytes()
    src = torch.empty(nbytes // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)

    def memcpy() -> float:
        t = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - t

    def trainer_logprobs(probe):
        with torch.no_grad():
            tokens = torch.tensor(probe)
            logits = stage.model(tokens, torch.arange(tokens.size(1)).expand(tokens.size(0), -1), None)
            lp = torch.log_softmax(logits[:, :-1, : model_cfg.vocab_size].float(), -1)
            return lp.gather(-1, tokens[:, 1:, None])[..., 0]

    memcpy()  # first touch of the destination pages
    probe = probe_batch(model_cfg.vocab_size, batch=2, length=16, seed=0)
    modes = {"before": dict(streamed=False), "after": dict(streamed=True),  # EngineProcess.update_weights(**)
             "after, engine 1 thread": dict(streamed=True, engine_threads=1)}
    first, times, profiled, parity, copies = {}, {m: [] for m in modes}, {}, {}, []
    with EngineProcess(tmp / "hf", seed=0, env=env) as engine:
        print(f"{layers}-layer model; engine started in {engine.startup_s:.1f}s", file=sys.stderr)
        seed = 100
        for r in range(args.repeats + 2):  # round 0: first pushes; last round: profiled (vLLM internals timed)
            for mode, kwargs in modes.items():
                seed += 1
                with torch.no_grad():
                    init_layout_invariant(stage.model, stage.config, seed=seed)
                exporter = StreamingExporter(stage.model, stage.config, model_cfg, bucket_bytes=bucket_bytes)
                copies.append(memcpy())  # interleaved with the pushes: same machine state
                last = r == args.repeats + 1
                t = time.perf_counter()
                stats = engine.update_weights(exporter.buckets(), profile=last, **kwargs)
                elapsed = time.perf_counter() - t
                print(f"round {r} {mode}: {elapsed:.2f} s", file=sys.stderr)
                if r == 0:
                    first[mode] = (elapsed, stats)
                elif not last:
                    times[mode].append(elapsed)
                else:
                    profiled[mode] = stats
                    parity[mode] = compare(engine.prompt_logprobs(probe), trainer_logprobs(probe))
    total = stats.bytes
    t_memcpy = min(copies) * total / nbytes
    best = {m: min(v) for m, v in times.items()}
    src = dst = stage = None  # free 2 GB before the throughput child starts
    tp = None
    if not args.no_throughput:
        out = subprocess.run([sys.executable, __file__, "--throughput-only", str(tmp / "hf"), "--prompts",
                              str(args.prompts), "--n", str(args.n), "--new-tokens", str(args.new_tokens),
                              "--repeats", str(args.repeats)], capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, **env})
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        tp = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"bytes={total / 2**30:.2f} GiB tensors={stats.tensors} bucket={args.bucket_mb:.0f} MiB "
          f"engine_batches={stats.buckets}; memcpy of the same bytes {t_memcpy * 1e3:.1f} ms "
          f"({total / t_memcpy / 1e9:.2f} GB/s; best of {len(copies)}, interleaved with the pushes)")
    labels = {"before": "before (per-batch reload, tensors pickled as shared-memory handles)",
              "after": "after (one streamed reload, reused shared-memory buffers, pipelined)",
              "after, engine 1 thread": "after, the engine's reload on 1 torch thread"}
    for mode, label in labels.items():
        f_s, f_stats = first[mode]
        print(f"{label}: refit {best[mode]:.2f} s ({total / best[mode] / 1e9:.2f} GB/s; runs "
              f"{[round(x, 2) for x in times[mode]]}); first refit {f_s:.2f} s (copied into shared memory: "
              f"{f_stats.shm_copied_bytes / 2**30:.2f} GiB first, {profiled[mode].shm_copied_bytes / 2**30:.2f} GiB "
              f"later); refit_vs_memcpy={t_memcpy / best[mode]:.3f}; parity max |dlogp| {parity[mode].max_abs:.2e}")
        p = profiled[mode]
        print(f"  breakdown of one profiled {mode} refit ({p.seconds * 1e3:.0f} ms):")
        print("\n".join("  " + row for row in format_breakdown(p.breakdown, p.seconds, min_share=0.002)))
    print(f"speedup_after_vs_before={best['before'] / best['after']:.2f}")
    print(f"speedup_after_1thread_vs_before={best['before'] / best['after, engine 1 thread']:.2f}")
    if tp is not None:
        print(f"generation ({args.prompts} prompts x n={args.n} x {args.new_tokens} tokens): wrapper "
              f"{tp['wrapper']:.1f} tok/s, raw vLLM {tp['raw']:.1f} tok/s")
    print(f"engine_refit_vs_memcpy={t_memcpy / best['after']:.3f}")
    if tp is not None:
        print(f"wrapper_vs_raw_tokens_per_s={tp['wrapper'] / tp['raw']:.3f}")
    return 0 if max(p.max_abs for p in parity.values()) < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
