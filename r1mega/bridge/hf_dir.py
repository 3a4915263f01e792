"""Whole HF directories: save a (sharded) megatron model as an HF checkpoint, load one into it."""

from __future__ import annotations

import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

from r1mega.bridge.export import DEFAULT_BUCKET_BYTES, StreamingExporter
from r1mega.bridge.hf_config import to_hf_config
from r1mega.bridge.hf_source import read_hf_config  # noqa: F401  (re-exported)
from r1mega.bridge.importer import import_hf
from r1mega.bridge.safetensors_io import ShardedWriter

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with transformers
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr)


def save_hf(model, config, model_cfg, out_dir: str | Path, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
            dtype: torch.dtype | None = None, tokenizer_dir: str | Path | None = None,
            progress: bool = False, fp8: bool = False, read=None, passthrough=None) -> StreamingExporter:
    """Write config.json, generation_config.json, safetensors shards + index (rank 0). Collective.

    ``fp8``: linear weights as float8_e4m3fn with blockwise 128x128 ``weight_scale_inv`` tensors and a
    DeepSeek-V3 ``quantization_config`` (see ``bridge.fp8``). ``read``: full tensors come from it, not
    from the model (see ``StreamingExporter``). ``passthrough`` (``bridge.passthrough.Passthrough``):
    HF tensors the model does not hold, written back unchanged as one more shard.
    """
    if passthrough is not None:
        from r1mega.bridge.fp8 import quantization_config

        passthrough.check_export(quantization_config()["weight_block_size"] if fp8 else None)
    out = Path(out_dir)
    exporter = StreamingExporter(model, config, model_cfg, bucket_bytes=bucket_bytes, dtype=dtype, read=read)
    writer = None
    bar = None
    if _rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        writer = ShardedWriter(out, len(exporter.plan()) + (passthrough is not None))
        bar = _progress(exporter.total_bytes(), "export", progress)
    # rank 0 writes each bucket in a background thread while the next one is read / gathered: one
    # bucket in flight, so about two buckets are alive at once
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-writer") if writer is not None else None
    pending = None
    try:
        for bucket in exporter.buckets():
            if writer is not None:
                if fp8:
                    from r1mega.bridge.fp8 import quantize_bucket

                    bucket = quantize_bucket(bucket)
                if pending is not None:
                    pending.result()
                pending = pool.submit(writer.write, bucket)
                if bar is not None:
                    bar.update(sum(t.numel() * t.element_size() for _, t in bucket))
            del bucket
        if pending is not None:
            pending.result()
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    if writer is not None:
        if passthrough is not None:
            writer.write(passthrough.tensors(), written=passthrough.file.release)
        writer.close()
        if bar is not None:
            bar.close()
        hf_cfg = to_hf_config(model_cfg)
        if passthrough is not None and passthrough.mtp_layers:
            hf_cfg["num_nextn_predict_layers"] = passthrough.mtp_layers
        if dtype is not None:
            hf_cfg["dtype"] = str(dtype).removeprefix("torch.")
        if fp8:
            from r1mega.bridge.fp8 import quantization_config

            hf_cfg["quantization_config"] = quantization_config()
        (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        gen = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id") if hf_cfg.get(k) is not None}
        (out / "generation_config.json").write_text(json.dumps({**gen, "do_sample": True}, indent=2) + "\n")
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, out)
    if dist.is_initialized():
        dist.barrier()
    return exporter


def copy_tokenizer(src: str | Path, dst: str | Path) -> list[str]:
    src, copied = Path(src), []
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, Path(dst) / name)
            copied.append(name)
    if not copied:
        raise FileNotFoundError(f"{src}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return copied


def load_hf(model, config, model_cfg, hf_dir: str | Path) -> dict:
    """Load an HF directory's weights into this rank's chunk (see ``importer.import_hf``)."""
    return import_hf(model, config, model_cfg, hf_dir)

