"""End-to-end refit benchmark: megatron shards -> bridge stream -> a live vLLM(-CPU) engine, plus the
engine wrapper's generation throughput next to raw vLLM on the same prompts.

The end-to-end mode of ``tools/bench_refit.py`` (that tool measures shards -> HF tensors -> plain
buffers). Builds the same ~``--gb`` GB float32 Qwen3-MoE-style policy in one process, writes it once
as an HF directory (the engine's start point), starts a TP1 engine in a child process
(``r1mega.rollout.vllm_engine.EngineProcess``, how a learner rank owns its engine), re-draws the
weights and times ``engine.update_weights(exporter.buckets())`` (best of ``--repeats``) against one
``Tensor.copy_`` of the same bytes; the parity probe checks the engine got the new weights. Then a
clean child process loads the engine in-process and times ``VLLMEngine.generate`` against
``LLM.generate`` with the same ``SamplingParams`` (alternating, best of ``--repeats``).

    python tools/bench_refit_engine.py [--gb 1.0] [--bucket-mb 256] [--repeats 2]

Last lines: ``engine_refit_vs_memcpy=<memcpy_time / refit_time>``, ``wrapper_vs_raw_tokens_per_s=<ratio>``.
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
    env = {"VLLM_CACHE_ROOT": str(tmp / "vllm-cache"), "VLLM_CPU_KVCACHE_SPACE": "1"}
    bucket_bytes = int(args.bucket_mb * 2**20)
    with EngineProcess(tmp / "hf", seed=0, env=env) as engine:
        print(f"{layers}-layer model; engine started in {engine.startup_s:.1f}s", file=sys.stderr)
        times, stats = [], None
        for r in range(args.repeats):
            with torch.no_grad():
                init_layout_invariant(stage.model, stage.config, seed=100 + r)
            exporter = StreamingExporter(stage.model, stage.config, model_cfg, bucket_bytes=bucket_bytes)
            t = time.perf_counter()
            stats = engine.update_weights(exporter.buckets())
            times.append(time.perf_counter() - t)
        probe = probe_batch(model_cfg.vocab_size, batch=2, length=16, seed=0)
        with torch.no_grad():
            tokens = torch.tensor(probe)
            logits = stage.model(tokens, torch.arange(16).expand(2, 16), None)
            lp = torch.log_softmax(logits[:, :-1, : model_cfg.vocab_size].float(), -1)
            trainer = lp.gather(-1, tokens[:, 1:, None])[..., 0]
        parity = compare(engine.prompt_logprobs(probe), trainer)
    total = stats.bytes
    src = torch.empty(total // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = time.perf_counter()
    dst.copy_(src)
    t_memcpy = time.perf_counter() - t
    t_refit = min(times)
    del src, dst, stage
    out = subprocess.run([sys.executable, __file__, "--throughput-only", str(tmp / "hf"), "--prompts",
                          str(args.prompts), "--n", str(args.n), "--new-tokens", str(args.new_tokens),
                          "--repeats", str(args.repeats)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **env})
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        return 1
    tp = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"bytes={total / 2**30:.2f} GiB tensors={stats.tensors} bucket={args.bucket_mb:.0f} MiB "
          f"engine_calls={stats.buckets}")
    print(f"engine refit {t_refit:.2f} s ({total / t_refit / 1e9:.2f} GB/s; all runs {[round(x, 2) for x in times]}); "
          f"memcpy {t_memcpy * 1e3:.1f} ms ({total / t_memcpy / 1e9:.2f} GB/s)")
    print(f"parity after refit: max |dlogp| {parity.max_abs:.2e} (mean {parity.mean_abs:.2e})")
    print(f"generation ({args.prompts} prompts x n={args.n} x {args.new_tokens} tokens): wrapper "
          f"{tp['wrapper']:.1f} tok/s, raw vLLM {tp['raw']:.1f} tok/s")
    print(f"engine_refit_vs_memcpy={t_memcpy / t_refit:.3f}")
    print(f"wrapper_vs_raw_tokens_per_s={tp['wrapper'] / tp['raw']:.3f}")
    return 0 if parity.max_abs < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
