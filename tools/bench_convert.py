"""Checkpoint conversion cost: peak memory and speed of ``from-hf`` / ``to-hf`` against plain safetensors I/O.

For each size (default about 0.5 and 1 GB of bfloat16 weights) a transformers Qwen3-MoE is made from
a config and saved with ``save_pretrained``. Then, each in a fresh child process whose peak resident
set (``ru_maxrss`` of that child, from ``wait4``) is measured:

* ``from-hf``: HF directory -> weights-only r1mega checkpoint (``--precision`` left to its default,
  bf16 for a bf16 source);
* ``to-hf``: that checkpoint -> HF directory (``--bucket-mb`` per shard);
* ``io``: the baseline, plain ``safetensors`` ``load_file`` of every source shard and ``save_file`` of
  the same tensors into a new directory, fsynced (the same bytes read and written durably, as a
  checkpoint and an exported model are).

Times are measured inside each child after its imports (interpreter and megatron start-up are not
conversion); every child runs one thread (``OMP_NUM_THREADS=1``); the file system is synced before each
timed step, so none pays for writing back another's files (transformers does not fsync what it saves).
The three steps run ``--repeat`` rounds, interleaved, and each time is the median over the rounds.
Ratios: ``rss_over_weights`` = peak RSS / bytes of weights; ``vs_io`` = baseline time / conversion time
(1.0 = as fast as reading and writing the bytes with safetensors).

    python tools/bench_convert.py [--gb 0.5 1.0] [--bucket-mb 64] [--repeat 3] [--keep DIR]

Last line (the larger model): ``from_hf_rss_over_weights=<x> to_hf_rss_over_weights=<y>
from_hf_vs_io=<r> to_hf_vs_io=<s>``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, EXPERTS, MOE_FFN, VOCAB = 512, 32, 512, 16384
_CHILD = "--child"


def _config(layers: int) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, moe_intermediate_size=MOE_FFN,
                num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                num_experts=EXPERTS, num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=4096,
                rope_parameters={"rope_theta": 1e6, "rope_type": "default"}, tie_word_embeddings=False)


def _params(layers: int) -> int:
    attn = HIDDEN * 8 * 64 * 2 + HIDDEN * 4 * 64 * 2 + 2 * 64 + 2 * HIDDEN
    moe = EXPERTS * 3 * HIDDEN * MOE_FFN + EXPERTS * HIDDEN
    return layers * (attn + moe) + 2 * VOCAB * HIDDEN + HIDDEN


def _layers_for(gb: float) -> int:
    per_layer = _params(1) - _params(0)
    return max(1, round((gb * 1e9 / 2 - _params(0)) / per_layer))


# ----------------------------------------------------------------------------- children


def _make_model(out: str, layers: int) -> None:
    import torch
    import transformers

    cfg = transformers.Qwen3MoeConfig(**_config(layers))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="256MB")


def _child(task: str, args: list[str]) -> dict:
    if task == "make":
        _make_model(args[0], int(args[1]))
        return {}
    if task == "io":
        from safetensors.torch import load_file, save_file

        src, dst = Path(args[0]), Path(args[1])
        dst.mkdir(parents=True)
        t0 = time.perf_counter()
        for f in sorted(src.glob("*.safetensors")):
            tensors = load_file(str(f))
            save_file(tensors, str(dst / f.name), metadata={"format": "pt"})
            del tensors
            with open(dst / f.name, "rb") as written:  # durable, as the conversions' outputs are
                os.fsync(written.fileno())
        return {"seconds": time.perf_counter() - t0}
    # everything conversion imports is imported before the clock starts (start-up is not conversion)
    import r1mega.bridge.hf_dir  # noqa: F401
    import r1mega.bridge.importer  # noqa: F401
    import r1mega.ckpt.weights  # noqa: F401
    import r1mega.models.policy  # noqa: F401
    from r1mega.bridge.convert import from_hf, to_hf

    t0 = time.perf_counter()
    if task == "from_hf":
        from_hf(args[0], args[1])
    elif task == "to_hf":
        to_hf(args[0], args[1], bucket_mb=float(args[2]), progress=False)
    else:
        raise ValueError(task)
    return {"seconds": time.perf_counter() - t0}


def _run_child(task: str, *args: str) -> dict:
    """Run ``task`` in a fresh interpreter; its result plus its peak RSS in bytes."""
    # one thread per process, as every multi-process run here (spawn.rank_env): on a shared machine
    # torch's parallel copies otherwise spend most of their time waiting at OpenMP barriers
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    with tempfile.NamedTemporaryFile("w+", suffix=".json") as result, tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, __file__, _CHILD, task, result.name, *args], env=env,
                                stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{task} failed ({proc.returncode}):\n{log.read()[-3000:]}")
        out = json.loads(Path(result.name).read_text() or "{}")
    out["peak_rss"] = usage.ru_maxrss * 1024  # kilobytes on Linux
    return out


def _weights_bytes(hf_dir: Path) -> int:
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        return int(json.loads(index.read_text())["metadata"]["total_size"])
    return sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))


def measure(root: Path, gb: float, bucket_mb: float, repeat: int) -> dict:
    """``repeat`` rounds of io, from-hf, to-hf on one source; each figure is the median over the rounds.

    The rounds interleave the baseline with the conversions, so a slow spell of the machine or its disk hits
    both. Nothing is deleted before the last round ends: on a file system mounted with ``discard`` a
    deletion's discards slow the writes that follow it.
    """
    layers = _layers_for(gb)
    src = root / f"{gb}gb_hf"
    _run_child("make", str(src), str(layers))
    weights = _weights_bytes(src)
    runs: dict[str, list[dict]] = {"io": [], "from_hf": [], "to_hf": []}
    made: list[Path] = []
    for r in range(repeat):
        ckpt, out, io = (root / f"{gb}gb_{n}_{r}" for n in ("ckpt", "hf_out", "io"))
        made += [ckpt, out, io]
        # each timed step starts with nothing of the previous steps' left to write back: the model just saved
        # (not fsynced by transformers) would otherwise be flushed during whichever step comes next
        os.sync()
        runs["io"].append(_run_child("io", str(src), str(io)))
        os.sync()
        runs["from_hf"].append(_run_child("from_hf", str(src), str(ckpt)))
        os.sync()
        runs["to_hf"].append(_run_child("to_hf", str(ckpt), str(out), str(bucket_mb)))
    res = {"gb": gb, "layers": layers, "weights_bytes": weights, "bucket_mb": bucket_mb, "repeat": repeat}
    for task, rs in runs.items():
        res[f"{task}_s"] = statistics.median(x["seconds"] for x in rs)
        res[f"{task}_rss"] = max(x["peak_rss"] for x in rs)
        res[f"{task}_all_s"] = [round(x["seconds"], 2) for x in rs]
    res["from_hf_rss_over_weights"] = res["from_hf_rss"] / weights
    res["to_hf_rss_over_weights"] = res["to_hf_rss"] / weights
    res["from_hf_vs_io"] = res["io_s"] / res["from_hf_s"]
    res["to_hf_vs_io"] = res["io_s"] / res["to_hf_s"]
    for d in made:
        shutil.rmtree(d, ignore_errors=True)
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, nargs="+", default=[0.5, 1.0], help="model sizes (GB of bf16 weights)")
    parser.add_argument("--bucket-mb", type=float, default=64.0, help="to-hf bucket (one safetensors shard each)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of io / from-hf / to-hf; medians are reported")
    parser.add_argument("--keep", default=None, help="work directory to keep (default: a temporary one)")
    args = parser.parse_args(argv)
    root = Path(args.keep or tempfile.mkdtemp(prefix="r1mega-bench-convert-"))
    root.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for gb in args.gb:
            r = measure(root, gb, args.bucket_mb, args.repeat)
            results.append(r)
            print(f"{r['weights_bytes'] / 1e9:.2f} GB ({r['layers']} layers): "
                  f"from-hf {r['from_hf_s']:.1f} s, peak RSS {r['from_hf_rss'] / 1e9:.2f} GB "
                  f"({r['from_hf_rss_over_weights']:.2f}x weights) | "
                  f"to-hf {r['to_hf_s']:.1f} s, peak RSS {r['to_hf_rss'] / 1e9:.2f} GB "
                  f"({r['to_hf_rss_over_weights']:.2f}x) | safetensors read+write {r['io_s']:.1f} s, "
                  f"peak RSS {r['io_rss'] / 1e9:.2f} GB (medians of {r['repeat']} rounds, s: from-hf "
                  f"{r['from_hf_all_s']}, to-hf {r['to_hf_all_s']}, read+write {r['io_all_s']})", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    grow = [(a["from_hf_rss_over_weights"], b["from_hf_rss_over_weights"], a["to_hf_rss_over_weights"],
             b["to_hf_rss_over_weights"]) for a, b in zip(results, results[1:])]
    for f0, f1, t0, t1 in grow:
        print(f"RSS ratio from the smaller to the larger model: from-hf {f0:.2f} -> {f1:.2f}, "
              f"to-hf {t0:.2f} -> {t1:.2f}")
    last = results[-1]
    print(f"from_hf_rss_over_weights={last['from_hf_rss_over_weights']:.3f} "
          f"to_hf_rss_over_weights={last['to_hf_rss_over_weights']:.3f} "
          f"from_hf_vs_io={last['from_hf_vs_io']:.3f} to_hf_vs_io={last['to_hf_vs_io']:.3f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == _CHILD:
        result = _child(sys.argv[2], sys.argv[4:])
        Path(sys.argv[3]).write_text(json.dumps(result))
        sys.exit(0)
    sys.exit(main())
