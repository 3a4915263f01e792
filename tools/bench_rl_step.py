"""GRPO steps with ``rollout.engine=megatron`` in this process: the RL step of a GPU check, and its CPU dry mode.

Why: vLLM, TE and flash-attn do not travel to the GPU machines this project is checked on; torch and the
megatron-core wheel do. With the megatron engine a whole GRPO step (generation with the learner's own
weights, rewards, old log-probs, update, parity probe) needs nothing else, so this measures it.

``--gpu`` (tools/gpu_check.sh rl): a Qwen3-30B-A3B-shaped policy (hidden 2048, 32 heads / 4 KV groups of
128, 128 experts top-8 of ffn 768, vocabulary 151,936) cut to ``--layers`` layers (default 4, about 3.1B
parameters with the embeddings: bf16 weights + fp32 grads + Adam state ~ 18 bytes a parameter ~ 56 GB, so
it fits one 80 GB H100 beside the KV cache and activations), bf16, grouped-GEMM experts
(``model.moe_grouped_experts``), world size 1, ``--steps`` GRPO steps of the demo's addition task
(``--prompts`` prompts x ``--n`` samples of up to ``--new-tokens`` tokens); random weights, so responses
run to the length limit. ``--dry``: the demo's tiny model on CPU, same code path, two steps (CI).

Prints each step's figures and, from the last step (the first one warms up): tokens/s/GPU of the whole step,
generation tokens/s (response tokens / rollout time), training tokens/s (all trained tokens / train time),
the learner's MFU (model FLOPs of fwd + bwd, ``train/flops.py``, over the train time, against the H100 SXM
dense bf16 peak 989 TFLOP/s; on CPU against a float32 matmul peak measured here) and peak memory (CUDA: max
allocated; CPU: peak RSS). Last line: ``rl_step device=<d> layers=<l> tokens_per_s_per_gpu=<x>
gen_tokens_per_s=<g> train_tokens_per_s=<t> mfu=<m> peak_mem_gib=<p>``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

H100_BF16_PEAK = 989e12
DEMO_SIZES = ("hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "ffn_hidden_size",
              "moe_ffn_hidden_size", "num_experts", "moe_router_topk", "vocab_size")


def overrides(args, out: Path) -> list[str]:
    """``r1mega train`` overrides of configs/demo_cpu.yaml for this check."""
    common = [f"trainer.output_dir={out}", "data.eval_path=null", "checkpoint.save_interval=0",
              "rollout.engine=megatron", f"rollout.n={args.n}", f"rollout.max_new_tokens={args.new_tokens}",
              f"trainer.global_batch_size={args.prompts * args.n}", "rollout.parity_check_interval=1",
              f"stages=[{{name: grpo, kind: grpo, steps: {args.steps}}}]", "rl.drop_uniform_groups=false"]
    if args.dry:
        return common + ["parallel.micro_batch_size=4"]
    return common + ["model.preset=qwen3_moe", "model.size=30b_a3b", *(f"model.{k}=null" for k in DEMO_SIZES),
                     f"model.num_layers={args.layers}", "model.precision=bf16", "model.moe_grouped_experts=true",
                     f"model.seq_length={args.seq_length}", "rollout.max_model_len=" + str(args.seq_length),
                     "parallel.micro_batch_size=1", f"parallel.max_tokens_per_micro_batch={args.seq_length}",
                     "rollout.parity_max_abs_logp=0.5"]


def peak_memory_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--gpu", action="store_true", help="the 30B-A3B-shaped check on one CUDA GPU")
    mode.add_argument("--dry", action="store_true", help="the demo's tiny model on CPU (same code path)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="GRPO steps (default: 3 on GPU, 2 dry)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts a step (default: 16 on GPU, 4 dry)")
    parser.add_argument("--n", type=int, default=None, help="samples a prompt (default: 8 on GPU, 4 dry)")
    parser.add_argument("--new-tokens", type=int, default=None, help="response tokens (default: 256 on GPU, 16 dry)")
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args = parser.parse_args(argv)
    for name, gpu, dry in (("steps", 3, 2), ("prompts", 16, 4), ("n", 8, 4), ("new_tokens", 256, 16)):
        if getattr(args, name) is None:
            setattr(args, name, gpu if args.gpu else dry)
    import tempfile

    import torch

    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs CUDA; use --dry on a CPU")
    out = Path(args.out or tempfile.mkdtemp(prefix="r1mega-rl-step-"))
    from r1mega.config import load_config
    from r1mega.train.flops import flops_per_token
    from r1mega.train.recipe import run_recipe

    cfg = load_config(str(ROOT / "configs" / "demo_cpu.yaml"), overrides(args, out), world_size=1)
    t0 = time.monotonic()
    run_recipe(cfg)
    wall = time.monotonic() - t0
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["stage"] == "grpo"]
    if not steps:
        raise SystemExit(f"no GRPO step was logged in {out / 'metrics.jsonl'}")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available():
        peak = H100_BF16_PEAK
    else:
        sys.path.insert(0, str(ROOT / "tools"))
        from bench_mfu import measure_cpu_matmul_peak

        peak = measure_cpu_matmul_peak(1024)
    samples = args.prompts * args.n
    for r in steps:
        response = r["response_len/mean"] * samples
        step_s = r["time/rollout"] + r["time/reward"] + r["time/train"] + r.get("time/refit", 0.0)
        trained = r["tokens_per_s"] * step_s  # prompt + response tokens of the batch (train/grpo.py)
        fpt = flops_per_token(cfg.model, max(1, int(trained / samples)))
        r["_fig"] = {"tokens_per_s_per_gpu": trained / step_s, "gen_tokens_per_s": response / r["time/rollout"],
                     "train_tokens_per_s": trained / r["time/train"],
                     "mfu": fpt * trained / r["time/train"] / peak}
        print(f"step {r['step']}: rollout {r['time/rollout']:.2f}s train {r['time/train']:.2f}s "
              + " ".join(f"{k}={v:.4g}" for k, v in r["_fig"].items())
              + f" parity={r.get('parity/max_abs_logp', float('nan')):.3g} mismatch={r['logprob_mismatch']:.3g}")
    fig = steps[-1]["_fig"]
    print(f"run wall {wall:.1f}s (model build included), MFU against {peak / 1e12:.4g} TFLOP/s, out {out}")
    print(f"rl_step device={device.replace(' ', '_')} layers={cfg.model.num_layers} "
          f"tokens_per_s_per_gpu={fig['tokens_per_s_per_gpu']:.1f} gen_tokens_per_s={fig['gen_tokens_per_s']:.1f} "
          f"train_tokens_per_s={fig['train_tokens_per_s']:.1f} mfu={fig['mfu']:.4f} "
          f"peak_mem_gib={peak_memory_gib():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
