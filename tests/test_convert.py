"""Weights-only conversion: from-hf writes a checkpoint with the model's tensors only (no optimizer,
scheduler or RNG), the trainer loads it as initial weights in every layout, resuming from it is
refused, and to-hf reads a checkpoint of any layout on one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from r1mega.bridge.safetensors_io import HFReader
from r1mega.platform.spawn import spawn_ranks

WORKER = str(Path(__file__).with_name("convert_worker.py"))
WORLD = {"1": 1, "tp2": 2, "pp2": 2, "ep2": 2}


def _run(spec: dict, world: int, name: str, timeout: float = 300) -> None:
    spawn_ranks([WORKER, json.dumps(spec)], world, timeout_s=timeout, name=name)


def _tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    reader = HFReader(hf_dir)
    return {n: reader.get(n).clone() for n in reader.names()}


def _assert_same_tensors(src: Path, out: Path) -> None:
    ref, got = _tensors(src), _tensors(out)
    assert ref.keys() == got.keys()
    bad = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not bad, bad[:5]


@pytest.fixture(scope="module")
def qwen3_moe_hf(tmp_path_factory) -> Path:
    from bridge_worker import _random_hf_model

    from r1mega.config.presets import resolve_model
    from r1mega.config.schema import ModelConfig

    src = tmp_path_factory.mktemp("convert") / "src"
    _random_hf_model(resolve_model(ModelConfig(preset="qwen3_moe")), str(src), seed=5)
    return src


@pytest.mark.timeout(900)
@pytest.mark.slow
def test_trainer_loads_converted_checkpoint_in_every_layout(qwen3_moe_hf, tmp_path):
    """A checkpoint written by from-hf in EP2 loads into the training model (DDP + optimizer, as
    checkpoint.load_dir does) at 1, TP2, PP2 and EP2, with every weight equal to the HF source; the
    training checkpoints those layouts save, and the EP2 converted one, go back to HF with to-hf on
    one process, bit-identical to the source."""
    ckpt = tmp_path / "ckpt"
    _run({"mode": "from_hf", "hf": str(qwen3_moe_hf), "out": str(ckpt), "ep": 2}, 2, "from-hf ep2")
    meta = json.loads((ckpt / "step_000000" / "meta.json").read_text())
    assert meta["contents"] == "weights" and meta["layout"]["ep"] == 2
    jobs = [[str(ckpt), str(tmp_path / "back_converted")]]
    for layout, world in WORLD.items():
        out, saved = tmp_path / f"loaded_{layout}", tmp_path / f"train_{layout}"
        _run({"mode": "trainer_load", "layout": layout, "ckpt": str(ckpt), "out": str(out), "save": str(saved)},
             world, f"trainer load {layout}")
        _assert_same_tensors(qwen3_moe_hf, out)
        assert json.loads((saved / "step_000001" / "meta.json").read_text())["contents"] == "training"
        jobs.append([str(saved), str(tmp_path / f"back_{layout}")])
    _run({"mode": "to_hf", "jobs": jobs}, 1, "to-hf on one process")
    for _, back in jobs:
        _assert_same_tensors(qwen3_moe_hf, Path(back))


@pytest.mark.timeout(600)
def test_converted_checkpoint_is_weights_only_and_loads_in_another_layout(qwen3_moe_hf, tmp_path):
    """from-hf at TP2 (each rank writes its halves of the SwiGLU experts straight from HF's gate and up
    tensors) writes model tensors only; the trainer loads them at EP2, every weight equal to the source."""
    ckpt = tmp_path / "ckpt"
    _run({"mode": "from_hf", "hf": str(qwen3_moe_hf), "out": str(ckpt), "tp": 2}, 2, "from-hf tp2")
    step = ckpt / "step_000000"
    meta = json.loads((step / "meta.json").read_text())
    assert meta["contents"] == "weights" and meta["optimizer"] is None
    from torch.distributed.checkpoint import FileSystemReader

    keys = set(FileSystemReader(str(step)).read_metadata().state_dict_metadata)
    assert keys and all(k.startswith(("decoder.", "embedding.", "output_layer.")) or k.endswith("_extra_state")
                        for k in keys), sorted(k for k in keys if "optimizer" in k or "rng" in k)[:5]
    out = tmp_path / "loaded"
    _run({"mode": "trainer_load", "layout": "ep2", "ckpt": str(ckpt), "out": str(out)}, 2, "trainer load ep2")
    _assert_same_tensors(qwen3_moe_hf, out)


def test_resuming_from_a_weights_only_checkpoint_is_refused(tmp_path):
    from r1mega.ckpt import CheckpointError, load_checkpoint

    step = tmp_path / "step_000000"
    step.mkdir()
    (step / "meta.json").write_text(json.dumps({"contents": "weights", "step": 0}))
    with pytest.raises(CheckpointError, match="weights only.*not a resume point"):
        load_checkpoint(None, step)


def test_precision_defaults_to_the_source_dtype():
    from r1mega.bridge.convert import source_precision

    assert source_precision({"torch_dtype": "bfloat16"}) == "bf16"
    assert source_precision({"dtype": "bfloat16"}) == "bf16"
    assert source_precision({"dtype": "float32"}) == "fp32"
    assert source_precision({}) == "fp32"
    fp8 = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    assert source_precision({"quantization_config": fp8}) == "bf16"  # DeepSeek's releases: the rest is bf16
    assert source_precision({"quantization_config": fp8, "dtype": "float32"}) == "fp32"  # to-hf --fp8 of fp32


def test_which_model_a_checkpoint_holds(tmp_path):
    """meta.json's model.config first (every field as the run resolved it), then model_config.json, then
    (checkpoints that predate both) the preset's stock size; with none of them, the fix is named."""
    from dataclasses import asdict, replace

    from r1mega.bridge.convert import ConvertError, checkpoint_model_config
    from r1mega.config.presets import resolve_model
    from r1mega.config.schema import ModelConfig

    step = tmp_path / "step_000003"
    step.mkdir()
    resolved = replace(resolve_model(ModelConfig(preset="qwen3_moe", size="tiny")), hidden_size=128, vocab_size=512)
    meta = {"step": 3, "model": {"preset": "qwen3_moe", "size": "tiny", "precision": "fp32"}}
    (step / "meta.json").write_text(json.dumps(meta))
    assert checkpoint_model_config(step) == resolve_model(ModelConfig(preset="qwen3_moe", size="tiny"))  # old
    (tmp_path / "model_config.json").write_text(json.dumps(asdict(replace(resolved, hidden_size=96))))
    assert checkpoint_model_config(step).hidden_size == 96
    meta["model"]["config"] = asdict(resolved)
    (step / "meta.json").write_text(json.dumps(meta))
    assert checkpoint_model_config(tmp_path / "step_000003") == resolved
    (tmp_path / "model_config.json").unlink()
    (step / "meta.json").write_text(json.dumps({"step": 3, "model": {}}))
    with pytest.raises(ConvertError, match="names no model.*model_config.json"):
        checkpoint_model_config(step)
