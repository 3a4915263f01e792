"""Checkpoint conversion (``r1mega convert`` and ``tools/convert_checkpoint.py``), in bounded memory.

* ``from_hf``: HF directory -> weights-only r1mega dist checkpoint (step 0) in any ``tp``/``pp``/``ep``
  layout (one process, or the layout's world under ``torchrun``). The model is built on the meta
  device; each of its tensors is read from the memory-mapped safetensors (FP8 dequantised), converted
  and written when the checkpoint writer reaches it (``ckpt.weights.save_weights``). No optimizer,
  no DDP, no initialisation. The trainer loads the result as initial weights in any layout.
* ``to_hf``: r1mega dist checkpoint saved in any layout (training or weights-only) -> HF directory
  (config.json, sharded safetensors + index, generation_config.json, tokenizer files when given), on
  one process: full tensors are read from the checkpoint one bucket at a time and written as one
  safetensors shard each.

Peak memory is about one bucket (``to_hf``) or a few tensors (``from_hf``) above the interpreter's.
The full r1mega ``ModelConfig`` is written next to a converted checkpoint (``model_config.json``) so
sizes that are not a preset survive ``from-hf`` -> ``to-hf``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from r1mega.bridge.hf_config import from_hf_config, to_hf_config
from r1mega.config.pipeline_split import split_problem, suggest
from r1mega.config.schema import ModelConfig, ParallelConfig

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


def check_pipeline_split(model_cfg: ModelConfig, pp: int, pp_first: int | None, pp_last: int | None) -> None:
    """The layers must split over ``pp`` stages as megatron builds them (before any process group)."""
    problem = split_problem(model_cfg.num_layers, pp, pp_first, pp_last)
    if problem is None:
        return
    fixes = [" ".join(f"--{flag} {v}" for flag, v in (("pp-first", f), ("pp-last", lst)) if v is not None)
             for f, lst in suggest(model_cfg.num_layers, pp, pp_first, pp_last)]
    fix = " or ".join(fixes) if fixes else "another --pp"
    raise ConvertError(f"{model_cfg.num_layers} layers over --pp {pp} (--pp-first {pp_first}, --pp-last {pp_last}): "
                       f"{problem}; pass {fix}")


def _setup(tp: int, pp: int, ep: int, pp_first: int | None = None, pp_last: int | None = None) -> ParallelConfig:
    import r1mega.models  # noqa: F401
    from r1mega.platform.distributed import init_model_parallel, init_process_group

    env = init_process_group()
    if env.world_size % (tp * pp):
        raise ConvertError(f"world size {env.world_size} is not a multiple of tp*pp={tp * pp}")
    parallel = ParallelConfig(tp=tp, pp=pp, ep=ep, etp=tp, dp=env.world_size // (tp * pp),
                              num_layers_in_first_pipeline_stage=pp_first, num_layers_in_last_pipeline_stage=pp_last)
    init_model_parallel(parallel, seed=0)
    return parallel


def _model_config_from(data: dict) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in data.items() if k in known})


def _model_config_for(step_dir: Path, meta: dict) -> tuple[ModelConfig, str]:
    """The checkpoint's ``ModelConfig`` and where it came from.

    In order: meta.json's ``model.config`` (every field as the run resolved it; written by every save
    since it exists), a ``model_config.json`` in the step directory or its root, then (checkpoints
    that predate both) the preset's stock size, which :func:`_check_shapes` verifies.
    """
    saved = meta.get("model", {})
    if isinstance(saved.get("config"), dict):
        return _model_config_from(saved["config"]), f"{step_dir / 'meta.json'} (model.config)"
    for candidate in (step_dir / MODEL_CONFIG_FILE, step_dir.parent / MODEL_CONFIG_FILE):
        if candidate.exists():
            return _model_config_from(json.loads(candidate.read_text())), str(candidate)
    if not saved.get("preset"):
        raise ConvertError(f"{step_dir}: meta.json names no model and there is no {MODEL_CONFIG_FILE}: write the "
                           f"run's `model:` section (its config.yaml) as JSON to {step_dir / MODEL_CONFIG_FILE}")
    from r1mega.config.presets import resolve_model

    size = saved.get("size") or "tiny"
    cfg = resolve_model(ModelConfig(preset=saved["preset"], size=size, precision=saved.get("precision") or "fp32"))
    log.warning("%s predates meta.json's model.config: rebuilding preset=%s size=%s from the preset (sizes a "
                "recipe set are not recorded)", step_dir, saved["preset"], size)
    return cfg, f"preset={saved['preset']} size={size} (old meta.json without model.config)"


def checkpoint_model_config(ckpt: str | Path) -> ModelConfig:
    """The architecture an r1mega checkpoint (root or ``step_*`` dir) was saved with."""
    from r1mega.ckpt import read_meta, resolve_checkpoint_dir

    step_dir = resolve_checkpoint_dir(ckpt)
    return _model_config_for(step_dir, read_meta(step_dir))[0]


def _check_shapes(stage, meta: dict, step_dir: Path, source: str) -> None:
    """The checkpoint holds this architecture: every tensor with its full shape (before any read)."""
    from r1mega.models.sharding import shard_infos

    saved = meta.get("model", {}).get("param_shapes", {})
    here = {i.canonical_name: list(i.full_shape) for i in shard_infos(stage.model, stage.config)}
    problems = [f"{n}: checkpoint {saved.get(n)}, model {shape}" for n, shape in sorted(here.items())
                if saved.get(n) != shape]
    if problems:
        fix = ("" if source.endswith("(model.config)") else
               f"; write the run's `model:` section (its config.yaml, resolved) as JSON to "
               f"{step_dir / MODEL_CONFIG_FILE} and convert again")
        raise ConvertError(f"{step_dir} does not hold the model built from {source}: "
                           f"{problems[:5]}{' ...' if len(problems) > 5 else ''}{fix}")


def to_hf(ckpt: str | Path, out: str | Path, *, tokenizer: str | Path | None = None, force: bool = False,
          bucket_mb: float = 256.0, dtype: str | None = None, fp8: bool = False, progress: bool = True) -> dict:
    """Export a checkpoint of any layout on one process; memory: about one bucket of full tensors."""
    from r1mega.ckpt import read_meta, resolve_checkpoint_dir

    check_output_dir(out, force)
    step_dir = resolve_checkpoint_dir(ckpt)
    meta = read_meta(step_dir)
    model_cfg, source = _model_config_for(step_dir, meta)
    to_hf_config(model_cfg)  # unsupported architecture: fail before building anything
    parallel = _setup(1, 1, 1)
    if parallel.dp != 1:
        raise ConvertError(f"to-hf runs on one process (it reads a checkpoint of any layout); it was started "
                           f"with {parallel.dp} processes: run it without torchrun")
    from r1mega.bridge.hf_dir import save_hf
    from r1mega.bridge.passthrough import Passthrough
    from r1mega.ckpt.weights import WeightsReader
    from r1mega.models.policy import build_policy

    stage = build_policy(model_cfg, parallel, meta=True)
    _check_shapes(stage, meta, step_dir, source)
    reader = WeightsReader(step_dir, stage.model)
    passthrough = Passthrough.find(step_dir)
    if passthrough is not None:
        log.info("to-hf: writing back %d HF tensors kept unchanged at conversion (%s)",
                 len(passthrough.file.keys()), passthrough.file.path)
    try:
        exporter = save_hf(stage.model, stage.config, model_cfg, out, bucket_bytes=int(bucket_mb * (1 << 20)),
                           dtype=getattr(torch, dtype) if dtype else None, tokenizer_dir=tokenizer,
                           progress=progress, fp8=fp8, read=reader.read, passthrough=passthrough)
    except ValueError as e:  # the passthrough's FP8 tensors need an FP8 export
        raise ConvertError(str(e)) from None
    if tokenizer is None:
        log.warning("no --tokenizer given: %s has no tokenizer files", out)
    return {"out": str(out), "tensors": exporter.stats.tensors, "bytes": exporter.stats.bytes,
            "buckets": exporter.stats.buckets, "peak_bucket_bytes": exporter.stats.peak_bucket_bytes}


def source_precision(hf_cfg: dict) -> str:
    """``bf16`` for a bfloat16 source (and an FP8 one that states no dtype: DeepSeek's FP8 releases
    keep their other tensors in bfloat16), else fp32."""
    dtype = hf_cfg.get("dtype") or hf_cfg.get("torch_dtype")
    if dtype is None and hf_cfg.get("quantization_config"):
        dtype = "bfloat16"
    return "bf16" if dtype == "bfloat16" else "fp32"


def from_hf(hf: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1, ep: int = 1, pp_first: int | None = None,
            pp_last: int | None = None, force: bool = False, precision: str | None = None,
            mtp_layers: int | None = None) -> dict:
    """Write a weights-only checkpoint of ``hf`` in the layout ``tp``/``pp``/``ep`` (collective).

    ``pp_first``/``pp_last``: an uneven pipeline split (e.g. DeepSeek-V3's 61 layers over pp16).
    ``mtp_layers``: multi-token-prediction layers to convert into the model (default: all of
    config.json's ``num_nextn_predict_layers``); the others are kept unchanged for ``to_hf``.
    """
    from r1mega.bridge.hf_source import HFSource, read_hf_config
    from r1mega.bridge.importer import HFImporter

    check_output_dir(out, force)
    hf_cfg = read_hf_config(hf)
    if precision is None:
        precision = source_precision(hf_cfg)
        log.info("from-hf: precision %s (the source's dtype is %s; --precision overrides)", precision,
                 hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "unstated")
    model_cfg = from_hf_config(hf_cfg, precision=precision)
    hf_mtp = int(hf_cfg.get("num_nextn_predict_layers") or 0)
    if mtp_layers is not None:
        if not 0 <= mtp_layers <= hf_mtp:
            raise ConvertError(f"--mtp-layers {mtp_layers}: config.json has {hf_mtp} MTP layer(s) "
                               f"(num_nextn_predict_layers); choose 0..{hf_mtp}")
        model_cfg = replace(model_cfg, mtp_num_layers=mtp_layers)
    source = HFSource(hf, hf_cfg)  # FP8 pairs and shard files are checked before anything is built
    if mtp_layers is None:
        model_cfg = _without_absent_mtp_layers(source, model_cfg, hf_mtp)
    if model_cfg.num_experts and model_cfg.num_experts % ep:
        raise ConvertError(f"--ep {ep} does not divide the {model_cfg.num_experts} experts")
    if model_cfg.num_attention_heads % tp:
        raise ConvertError(f"--tp {tp} does not divide the {model_cfg.num_attention_heads} attention heads")
    check_pipeline_split(model_cfg, pp, pp_first, pp_last)
    parallel = _setup(tp, pp, ep, pp_first, pp_last)
    from r1mega.ckpt.weights import save_weights
    from r1mega.models.policy import build_policy

    stage = build_policy(model_cfg, parallel, meta=True)
    importer = HFImporter(stage.model, stage.config, model_cfg, source)
    path = save_weights(stage.model, stage.config, out, model_cfg=model_cfg, resolve=importer.tensor,
                        resolve_rows=importer.rows)
    unused = importer.unused()
    import torch.distributed as dist

    kept: list[str] = []
    if not dist.is_initialized() or dist.get_rank() == 0:
        kept = _keep_mtp_layers(source, hf_cfg, model_cfg, out)
        unused = [n for n in unused if n not in set(kept)]
        if unused:
            log.warning("%d HF tensors were not used (e.g. %s)", len(unused), unused[:5])
        Path(out, MODEL_CONFIG_FILE).write_text(json.dumps(asdict(model_cfg), indent=1) + "\n")
    if dist.is_initialized():
        dist.barrier()
    return {"out": str(path), "unused_hf_tensors": unused, "kept_hf_tensors": len(kept)}


def _without_absent_mtp_layers(source, model_cfg: ModelConfig, hf_mtp: int) -> ModelConfig:
    """config.json's MTP layers whose files hold no tensor at all are left out of the model (one log line).

    transformers' DeepseekV3 declares ``num_nextn_predict_layers=1`` but builds no MTP layer, so what it
    saves has none. A layer with some of its tensors stays in the model: the importer then names the
    missing ones. The MTP layers run in sequence, so the model holds the leading present ones.
    """
    if not hf_mtp:
        return model_cfg
    names = source.names()
    present = 0
    while present < hf_mtp and any(n.startswith(f"model.layers.{model_cfg.num_layers + present}.") for n in names):
        present += 1
    if present < hf_mtp:
        log.warning("from-hf: config.json declares num_nextn_predict_layers=%d but %s holds no tensor of MTP layer "
                    "model.layers.%d: converting with %d MTP layer(s) (model.mtp_num_layers=%d)", hf_mtp, source.dir,
                    model_cfg.num_layers + present, present, present)
    return replace(model_cfg, mtp_num_layers=present)


def _keep_mtp_layers(source, hf_cfg: dict, model_cfg: ModelConfig, out: str | Path) -> list[str]:
    """config.json's MTP layers the model does not hold: copied unchanged next to the checkpoint."""
    from r1mega.bridge.passthrough import layer_tensors, save_passthrough

    hf_mtp, held = int(hf_cfg.get("num_nextn_predict_layers") or 0), model_cfg.mtp_num_layers or 0
    if hf_mtp <= held:
        return []
    first = model_cfg.num_layers + held
    names = layer_tensors(source.reader.names(), first)
    if not names:  # the files hold none of them (said when the model was chosen)
        return []
    path = save_passthrough(source.reader, names, out, hf_mtp, hf_cfg)
    log.warning("from-hf: config.json has %d MTP layer(s) (model.layers.%d...); the r1mega model holds %d "
                "(model.mtp_num_layers): the other %d layer(s), %d tensors, are kept unchanged in %s and "
                "written back by to-hf", hf_mtp, model_cfg.num_layers, held, hf_mtp - held, len(names), path)
    return names
