"""``r1mega convert`` (from-hf -> dist checkpoint -> to-hf) and blockwise FP8 export."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from r1mega.bridge.fp8 import BLOCK, dequantize_blockwise, quantize_blockwise, quantize_bucket


def _cli(*args, timeout=150):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "r1mega.cli", "--log-level", "WARNING", "convert", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def _random_hf(path, layers: int = 2):
    import transformers

    cfg = transformers.Qwen3MoeConfig(vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                                      max_position_embeddings=512,
                                      rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    for p in model.parameters():
        p.data.normal_(1.0 if p.dim() == 1 else 0.0, 0.05)
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))


@pytest.mark.timeout(300)
def test_convert_cli_round_trip(tmp_path):
    from safetensors.torch import load_file

    src, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "hf_out"
    _random_hf(src)
    r = _cli("from-hf", "--hf", str(src), "--out", str(ckpt))
    assert r.returncode == 0, r.stderr[-3000:]
    r = _cli("to-hf", "--ckpt", str(ckpt), "--out", str(out), "--tokenizer", str(src), "--bucket-mb", "0.1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "export" in r.stderr  # progress bar
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer_config.json"} <= names
    assert len([n for n in names if n.endswith(".safetensors")]) > 1  # sharded
    original = load_file(str(src / "model.safetensors"))
    exported = {}
    for f in sorted(out.glob("*.safetensors")):
        exported.update(load_file(str(f)))
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)
    import transformers

    tokens = torch.randint(0, 300, (1, 16))
    a = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(tokens).logits
    b = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(tokens).logits
    assert torch.equal(a, b)

    r = _cli("to-hf", "--ckpt", str(ckpt), "--out", str(out))  # non-empty output without --force
    assert r.returncode == 2 and "--force" in r.stderr


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_convert_cli_uneven_pipeline_split(tmp_path):
    """3 layers: ``--pp 2`` alone is refused before any process starts, naming the flags that work;
    ``--pp 2 --pp-first 1`` converts on 2 ranks (1 + 2 layers) and that checkpoint exports at pp1
    to exactly the source tensors."""
    from bridge_worker import _tensors

    src, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "hf_out"
    _random_hf(src, layers=3)
    r = _cli("from-hf", "--hf", str(src), "--out", str(ckpt), "--pp", "2")
    assert r.returncode == 2 and "3 layers do not divide evenly over 2 pipeline stages" in r.stderr, r.stderr[-2000:]
    assert "--pp-first 1 --pp-last 2" in r.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    convert = ["convert", "from-hf", "--hf", str(src), "--out", str(ckpt), "--pp", "2", "--pp-first", "1"]
    launched = subprocess.run([sys.executable, "-m", "launch.local", "--nproc", "2", "--timeout", "240",
                               "--no-validate", "--", "--log-level", "WARNING", *convert],
                              capture_output=True, text=True, timeout=300, env=env)
    assert launched.returncode == 0, launched.stderr[-3000:]
    from r1mega.ckpt import read_meta, resolve_checkpoint_dir

    layout = read_meta(resolve_checkpoint_dir(ckpt))["layout"]
    assert (layout["pp"], layout["num_layers_in_first_pipeline_stage"]) == (2, 1)
    r = _cli("to-hf", "--ckpt", str(ckpt), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    original, exported = _tensors(src), _tensors(out)
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)


@pytest.mark.timeout(60)
def test_convert_cli_rejects_unsupported_architecture(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama4_text"}))
    r = _cli("from-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"))
    assert r.returncode == 2 and "not supported by the bridge" in r.stderr


def test_fp8_blockwise_dequantises():
    torch.manual_seed(0)
    w = torch.randn(300, 200) * torch.logspace(-3, 1, 200)  # columns of very different scale
    q, s = quantize_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.shape == (-(-300 // BLOCK), -(-200 // BLOCK))
    back = dequantize_blockwise(q, s)
    # e4m3 has a 3-bit mantissa: relative error per element <= 2^-4 of its block's scale range
    block_amax = s.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:300, :200] * 448
    assert ((back - w).abs() <= block_amax / 16 + 1e-12).all()
    assert (back - w).abs().max() < 0.1 * w.abs().max()
    bucket = quantize_bucket([("model.layers.0.self_attn.q_proj.weight", w), ("model.norm.weight", torch.ones(4))])
    assert [n for n, _ in bucket] == ["model.layers.0.self_attn.q_proj.weight",
                                      "model.layers.0.self_attn.q_proj.weight_scale_inv", "model.norm.weight"]
