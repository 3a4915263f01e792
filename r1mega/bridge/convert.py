"""Checkpoint conversion (``r1mega convert`` and ``tools/convert_checkpoint.py``).

* ``to_hf``: r1mega dist checkpoint -> HF directory (config.json, sharded safetensors + index,
  generation_config.json, tokenizer files when given);
* ``from_hf``: HF directory -> r1mega dist checkpoint (step 0) in any ``tp``/``pp``/``ep`` layout.

Both run on one process or under ``torchrun`` (the layout's world size); the export streams in
bounded buckets. The full r1mega ``ModelConfig`` is written next to a converted checkpoint
(``model_config.json``) so sizes that are not a preset survive ``from-hf`` -> ``to-hf``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, fields
from pathlib import Path

import torch

from r1mega.bridge.hf_config import from_hf_config, to_hf_config
from r1mega.config.schema import ModelConfig, OptimizerConfig, ParallelConfig

log = logging.getLogger(__name__)
MODEL_CONFIG_FILE = "model_config.json"


class ConvertError(RuntimeError):
    """A conversion that cannot proceed; the message says what to change."""


def check_output_dir(out: str | Path, force: bool) -> None:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConvertError(f"output {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise ConvertError(f"output directory {out} is not empty: choose another or pass --force")


def _setup(tp: int, pp: int, ep: int):
    import r1mega.models  # noqa: F401
    from r1mega.platform.distributed import init_model_parallel, init_process_group

    env = init_process_group()
    if env.world_size % (tp * pp):
        raise ConvertError(f"world size {env.world_size} is not a multiple of tp*pp={tp * pp}")
    parallel = ParallelConfig(tp=tp, pp=pp, ep=ep, etp=tp, dp=env.world_size // (tp * pp))
    init_model_parallel(parallel, seed=0)
    return parallel


def _model_config_for(step_dir: Path, meta: dict) -> ModelConfig:
    for candidate in (step_dir / MODEL_CONFIG_FILE, step_dir.parent / MODEL_CONFIG_FILE):
        if candidate.exists():
            data = json.loads(candidate.read_text())
            known = {f.name for f in fields(ModelConfig)}
            return ModelConfig(**{k: v for k, v in data.items() if k in known})
    names = meta.get("model", {})
    if not names.get("preset"):
        raise ConvertError(f"{step_dir}: meta.json names no model preset and there is no {MODEL_CONFIG_FILE}")
    from r1mega.config.presets import resolve_model

    return resolve_model(ModelConfig(preset=names["preset"], size=names.get("size") or "tiny",
                                     precision=names.get("precision") or "fp32"))


def checkpoint_model_config(ckpt: str | Path) -> ModelConfig:
    """The architecture an r1mega checkpoint (root or ``step_*`` dir) was saved with."""
    from r1mega.ckpt import read_meta, resolve_checkpoint_dir

    step_dir = resolve_checkpoint_dir(ckpt)
    return _model_config_for(step_dir, read_meta(step_dir))


def _training_model(model_cfg: ModelConfig, parallel: ParallelConfig):
    from r1mega.train.model_setup import build_training_model

    return build_training_model(model_cfg, parallel, OptimizerConfig(), total_steps=1)


def to_hf(ckpt: str | Path, out: str | Path, *, tokenizer: str | Path | None = None, force: bool = False,
          tp: int = 1, pp: int = 1, ep: int = 1, bucket_mb: float = 256.0, dtype: str | None = None,
          fp8: bool = False, progress: bool = True) -> dict:
    from r1mega.ckpt import load_checkpoint, read_meta, resolve_checkpoint_dir

    check_output_dir(out, force)
    step_dir = resolve_checkpoint_dir(ckpt)
    meta = read_meta(step_dir)
    model_cfg = _model_config_for(step_dir, meta)
    to_hf_config(model_cfg)  # unsupported architecture: fail before building anything
    parallel = _setup(tp, pp, ep)
    tm = _training_model(model_cfg, parallel)
    load_checkpoint(tm, step_dir, model_cfg=model_cfg, load_optimizer=False, load_rng=False)
    from r1mega.bridge.hf_dir import save_hf

    exporter = save_hf(tm.module, tm.config, model_cfg, out, bucket_bytes=int(bucket_mb * (1 << 20)),
                       dtype=getattr(torch, dtype) if dtype else None, tokenizer_dir=tokenizer,
                       progress=progress, fp8=fp8)
    if tokenizer is None:
        log.warning("no --tokenizer given: %s has no tokenizer files", out)
    return {"out": str(out), "tensors": exporter.stats.tensors, "bytes": exporter.stats.bytes,
            "buckets": exporter.stats.buckets, "peak_bucket_bytes": exporter.stats.peak_bucket_bytes}


def from_hf(hf: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1, ep: int = 1, force: bool = False,
            precision: str = "fp32") -> dict:
    from r1mega.bridge.hf_source import HFSource, read_hf_config
    from r1mega.ckpt import save_checkpoint

    check_output_dir(out, force)
    hf_cfg = read_hf_config(hf)
    model_cfg = from_hf_config(hf_cfg, precision=precision)
    source = HFSource(hf, hf_cfg)  # FP8 pairs and shard files are checked before anything is built
    if model_cfg.num_experts and model_cfg.num_experts % ep:
        raise ConvertError(f"--ep {ep} does not divide the {model_cfg.num_experts} experts")
    if model_cfg.num_attention_heads % tp:
        raise ConvertError(f"--tp {tp} does not divide the {model_cfg.num_attention_heads} attention heads")
    parallel = _setup(tp, pp, ep)
    tm = _training_model(model_cfg, parallel)
    from r1mega.bridge.importer import import_hf

    result = import_hf(tm.module, tm.config, model_cfg, source)
    path = save_checkpoint(tm, out, 0, model_cfg=model_cfg)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(out, MODEL_CONFIG_FILE).write_text(json.dumps(asdict(model_cfg), indent=1) + "\n")
    if dist.is_initialized():
        dist.barrier()
    return {"out": str(path), "unused_hf_tensors": result["unused"]}
