"""Blockwise-FP8 HF checkpoints (DeepSeek-V3 / R1 as published) are dequantised on import.

The bound: e4m3 keeps 3 mantissa bits, so quantising ``W / s`` moves it by at most half a unit in the
last place: ``2^-4 |W / s|`` for normal values, ``2^-10`` (half the subnormal spacing ``2^-9``) below
``2^-6``. Scaled back by ``s``: ``|W' - W| <= 2^-4 |W| + 2^-10 s``, plus float32 rounding of the
division and product (``2^-22 |W|`` is ample). Every element of every quantised weight must be within
it; a bare cast of the FP8 values (what the import did before) is not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r1mega.bridge.fp8 import quantization_config, quantize_bucket
from r1mega.bridge.hf_source import HFFormatError, HFSource
from r1mega.bridge.safetensors_io import INDEX, HFReader, ShardedWriter, write_safetensors
from r1mega.kernels.fp8_blockwise import block_shape, dequantize_blockwise_torch, quantize_blockwise_torch
from r1mega.platform.spawn import spawn_ranks

WORKER = str(Path(__file__).with_name("convert_worker.py"))


def _tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    reader = HFReader(hf_dir)
    return {n: reader.get(n).clone() for n in reader.names()}


def _rounding_bound(original: torch.Tensor, scale_inv: torch.Tensor, block) -> torch.Tensor:
    br, bc = block_shape(block)
    s = scale_inv.repeat_interleave(br, 0).repeat_interleave(bc, 1)[: original.shape[0], : original.shape[1]]
    return 2.0 ** -4 * original.abs() + 2.0 ** -10 * s + 2.0 ** -22 * original.abs()


def _check_within_fp8_rounding(src: Path, fp8_dir: Path, back: Path, block) -> dict:
    original, quantized, again = _tensors(src), _tensors(fp8_dir), _tensors(back)
    assert original.keys() == again.keys()
    checked, worst, bare_cast_worst = 0, 0.0, 0.0
    for name, w in original.items():
        scale = quantized.get(name + "_scale_inv")
        if scale is None:
            assert torch.equal(w, again[name]), f"{name} is not quantised and must come back bit-identical"
            continue
        assert quantized[name].dtype == torch.float8_e4m3fn
        err = (again[name] - w).abs()
        bound = _rounding_bound(w, scale, block)
        assert (err <= bound).all(), (name, float((err - bound).max()))
        br, bc = block_shape(block)
        amax = scale.repeat_interleave(br, 0).repeat_interleave(bc, 1)[: w.shape[0], : w.shape[1]] * 448
        worst = max(worst, float((err / amax).max()))
        bare_cast_worst = max(bare_cast_worst, float(((quantized[name].float() - w).abs() > bound).float().mean()))
        checked += 1
    return {"checked": checked, "worst_over_block_amax": worst, "bare_cast_violations": bare_cast_worst}


def _quantize_dir(src: Path, out: Path, block) -> None:
    """``src`` (HF dir) with its linear weights in blockwise FP8 of tile ``block``, scales in a file of their own."""
    tensors = _tensors(src)
    quantized = quantize_bucket(list(tensors.items()), block)
    weights = [(n, t) for n, t in quantized if not n.endswith("_scale_inv")]
    scales = [(n, t) for n, t in quantized if n.endswith("_scale_inv")]
    writer = ShardedWriter(out, 2)
    writer.write(weights)
    writer.write(scales)
    writer.close()
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config(block)
    (out / "config.json").write_text(json.dumps(config))


@pytest.mark.timeout(600)
def test_fp8_round_trip_is_within_e4m3_rounding(tmp_path):
    """to-hf --fp8 output read back by from-hf is within FP8 rounding of the original (128x128 tiles and
    rectangular 32x16 tiles named by weight_block_size); tensors that are not quantised are bit-identical."""
    from bridge_worker import _random_hf_model

    from r1mega.config.presets import resolve_model
    from r1mega.config.schema import ModelConfig

    _random_hf_model(resolve_model(ModelConfig(preset="deepseek_v3")), str(tmp_path / "src"), seed=7)
    _quantize_dir(tmp_path / "src", tmp_path / "fp8_rect", (32, 16))
    spawn_ranks([WORKER, json.dumps({"mode": "fp8", "root": str(tmp_path)})], 1, timeout_s=540, name="fp8")
    square = _check_within_fp8_rounding(tmp_path / "src", tmp_path / "fp8", tmp_path / "back", 128)
    rect = _check_within_fp8_rounding(tmp_path / "src", tmp_path / "fp8_rect", tmp_path / "back_rect", (32, 16))
    print({"square": square, "rect": rect}, file=sys.stderr)
    for r in (square, rect):
        assert r["checked"] > 20
        assert r["worst_over_block_amax"] <= 2.0 ** -4
        assert r["bare_cast_violations"] > 0.5  # the bound would catch the old bare cast
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"][
        "weight_block_size"] == [128, 128]


def test_dequantize_rectangular_tiles_matches_per_tile_reference():
    torch.manual_seed(0)
    w = torch.randn(70, 45) * torch.logspace(-3, 1, 45)
    q, s = quantize_blockwise_torch(w, (32, 16))
    assert s.shape == (3, 3)
    back = dequantize_blockwise_torch(q, s, (32, 16), torch.float32)
    expect = torch.empty_like(w)
    for i in range(3):
        for j in range(3):
            tile = (slice(32 * i, 32 * i + 32), slice(16 * j, 16 * j + 16))
            expect[tile] = q[tile].float() * s[i, j]
    assert torch.equal(back, expect)
    assert (back - w).abs().le(_rounding_bound(w, s, (32, 16))).all()
    assert torch.equal(dequantize_blockwise_torch(q, s, (32, 16), torch.bfloat16), expect.bfloat16())


def _fp8_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    src = tmp_path / "plain"
    src.mkdir()
    write_safetensors(src / "model.safetensors", [("model.layers.0.mlp.down_proj.weight", torch.randn(40, 30)),
                                                  ("model.layers.0.mlp.up_proj.weight", torch.randn(30, 40)),
                                                  ("model.norm.weight", torch.ones(30))])
    from r1mega.bridge.hf_config import to_hf_config
    from r1mega.config.presets import resolve_model
    from r1mega.config.schema import ModelConfig

    (src / "config.json").write_text(json.dumps(to_hf_config(resolve_model(ModelConfig(preset="deepseek_v3")))))
    out = tmp_path / "fp8"
    _quantize_dir(src, out, 16)
    return out


def _drop_from_index(hf: Path, name: str) -> None:
    index = json.loads((hf / INDEX).read_text())
    del index["weight_map"][name]
    (hf / INDEX).write_text(json.dumps(index))


def test_fp8_source_dequantises_and_pairs_scales(tmp_path):
    hf = _fp8_dir(tmp_path)
    source = HFSource(hf)
    assert sorted(source.names()) == ["model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight",
                                      "model.norm.weight"]
    plain = _tensors(tmp_path / "plain")
    got = source.get("model.layers.0.mlp.down_proj.weight", torch.float32)
    scale = HFReader(hf).get("model.layers.0.mlp.down_proj.weight_scale_inv")
    w = plain["model.layers.0.mlp.down_proj.weight"]
    assert (got - w).abs().le(_rounding_bound(w, scale, 16)).all()
    assert torch.equal(source.get("model.norm.weight", torch.float32), plain["model.norm.weight"])


@pytest.mark.parametrize("dropped,message", [
    ("model.layers.0.mlp.up_proj.weight_scale_inv",
     r"model\.layers\.0\.mlp\.up_proj\.weight is float8_e4m3fn but its scale "
     r"model\.layers\.0\.mlp\.up_proj\.weight_scale_inv is missing"),
    ("model.layers.0.mlp.up_proj.weight",
     r"scale model\.layers\.0\.mlp\.up_proj\.weight_scale_inv has no weight model\.layers\.0\.mlp\.up_proj\.weight"),
])
def test_unpaired_fp8_weight_or_scale_names_both(tmp_path, dropped, message):
    hf = _fp8_dir(tmp_path)
    _drop_from_index(hf, dropped)
    with pytest.raises(HFFormatError, match=message):
        HFSource(hf)


def test_fp8_without_quantization_config_is_refused(tmp_path):
    hf = _fp8_dir(tmp_path)
    config = json.loads((hf / "config.json").read_text())
    del config["quantization_config"]
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFFormatError, match="no quantization_config"):
        HFSource(hf)
    for quant, field in (({"quant_method": "awq"}, "quant_method"),
                         ({"quant_method": "fp8", "weight_block_size": None}, "weight_block_size"),
                         ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "fmt")):
        with pytest.raises(HFFormatError, match=field):
            HFSource(hf, dict(config, quantization_config=quant))


def test_from_hf_with_a_missing_scale_file_fails_clearly(tmp_path):
    """The scales live in their own shard; deleting it must stop from-hf before anything is written."""
    hf = _fp8_dir(tmp_path)
    scale_file = json.loads((hf / INDEX).read_text())["weight_map"]["model.layers.0.mlp.up_proj.weight_scale_inv"]
    (hf / scale_file).unlink()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    r = subprocess.run([sys.executable, "-m", "r1mega.cli", "convert", "from-hf", "--hf", str(hf), "--out",
                        str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"names file(s) that are not there: {scale_file}" in r.stderr
    assert "weight_scale_inv" in r.stderr
    assert not (tmp_path / "ckpt").exists()
