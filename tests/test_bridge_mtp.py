"""DeepSeek-V3 multi-token prediction: the MTP layer (``model.layers.{N}``) maps to megatron's MTP block
both ways. A transformers-made DeepSeek-V3 with an MTP layer imports at 1, TP2, PP2 (MTP on the last
stage) and EP2, gives transformers' logits and exports bit-identically; converted without its MTP layer
(``--mtp-layers 0``) the layer is kept and written back unchanged."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from r1mega.bridge.rules import BridgeError, Dims
from r1mega.bridge.safetensors_io import HFReader
from r1mega.models.registry import architecture
from r1mega.platform.spawn import spawn_ranks

WORKER = str(Path(__file__).with_name("bridge_worker.py"))
CONVERT = str(Path(__file__).with_name("convert_worker.py"))
WORLD = {"1": 1, "tp2": 2, "pp2": 2, "ep2": 2}


def _tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    reader = HFReader(hf_dir)
    return {n: reader.get(n).clone() for n in reader.names()}


def _same(src: Path, out: Path) -> None:
    ref, got = _tensors(src), _tensors(out)
    assert ref.keys() == got.keys(), (sorted(set(ref) ^ set(got)))[:8]
    bad = [k for k in ref if not (ref[k].dtype == got[k].dtype and torch.equal(ref[k], got[k]))]
    assert not bad, bad[:8]


@pytest.fixture(scope="module")
def with_mtp(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from bridge_worker import deepseek_with_mtp

    src = tmp_path_factory.mktemp("mtp") / "src"
    info = deepseek_with_mtp(str(src), seed=3)
    return src, info


def test_mtp_rules_name_the_hf_layer_after_the_decoder():
    arch = architecture("deepseek_v3")
    dims = Dims(vocab_size=8, num_attention_heads=2, num_query_groups=2, head_dim=4, hidden_size=8,
                num_layers=61, mtp_num_layers=1)
    assert arch.hf_names("mtp.layers.0.eh_proj.weight", dims) == ["model.layers.61.eh_proj.weight"]
    assert arch.hf_names("mtp.layers.0.final_layernorm.weight", dims) == ["model.layers.61.shared_head.norm.weight"]
    assert arch.hf_names("mtp.layers.0.transformer_layer.mlp.experts.local_experts.7.linear_fc2.weight", dims) == [
        "model.layers.61.mlp.experts.7.down_proj.weight"]
    assert arch.hf_names("embedding.word_embeddings.weight", dims) == [
        "model.embed_tokens.weight", "model.layers.61.embed_tokens.weight"]
    assert arch.hf_names("output_layer.weight", dims) == ["lm_head.weight", "model.layers.61.shared_head.head.weight"]
    emb = torch.randn(8, 8)
    with pytest.raises(BridgeError, match="model.layers.61.embed_tokens.weight differs"):
        arch.to_megatron("embedding.word_embeddings.weight", [emb, emb + 1], dims, (8, 8))
    with pytest.raises(BridgeError, match="no MTP layers"):
        arch.hf_names("mtp.layers.0.enorm.weight", Dims(8, 2, 2, 4, 8, num_layers=61))
    with pytest.raises(BridgeError, match="maps no multi-token prediction"):
        architecture("qwen3_moe").hf_names("mtp.layers.0.enorm.weight", dims)


@pytest.mark.timeout(900)
# CI: one process and tp2; pp2 (the MTP layer on the last stage) and ep2 are `slow`
@pytest.mark.parametrize("layout", ["1", "tp2", *(pytest.param(x, marks=pytest.mark.slow) for x in ("pp2", "ep2"))])
def test_mtp_round_trip_and_logits_in_layouts(layout, with_mtp, tmp_path):
    src, info = with_mtp
    out = tmp_path / layout
    spawn_ranks([WORKER, json.dumps({"mode": "mtp", "layout": layout, "src": str(src), "out": str(out)})],
                WORLD[layout], timeout_s=600, name=f"mtp {layout}")
    _same(src, out)  # every tensor, the MTP layer and its embedding / head copies included
    sys.path.insert(0, str(Path(__file__).parent))
    from bridge_worker import hf_logits

    got = torch.load(f"{out}_logits.pt", weights_only=True)
    theirs = hf_logits(str(src), got["tokens"])
    diff = float((got["logits"] - theirs).abs().max())
    print(layout, "max |logit diff|", diff, "scale", float(theirs.abs().max()), file=sys.stderr)
    assert diff < 1e-5 and float(theirs.abs().max()) > 0.1
    # the MTP block lives on the last pipeline stage, with its own attention, MoE and norms
    names = got["mtp_on_last_stage"]
    assert "mtp.layers.0.eh_proj.weight" in names and any(".mlp.experts.local_experts." in n for n in names)


@pytest.mark.timeout(900)
def test_from_hf_without_mtp_keeps_the_layer_for_to_hf(with_mtp, tmp_path):
    """Converted with --mtp-layers 0 the model has no MTP block; the layer's tensors are kept unchanged
    and to-hf writes them back: HF -> r1mega -> HF is still bit-identical. With the block (default),
    the streaming conversion round-trips bit-identically too."""
    src, info = with_mtp
    jobs = {"keep": {"mtp_layers": 0}, "convert": {}}
    spec = {"mode": "mtp_convert", "src": str(src), "root": str(tmp_path), "jobs": jobs}
    spawn_ranks([CONVERT, json.dumps(spec)], 1, timeout_s=600, name="mtp convert")
    for name in jobs:
        _same(src, tmp_path / f"{name}_hf")
    kept = json.loads((tmp_path / "keep_result.json").read_text())
    assert kept["kept_hf_tensors"] == len(info["mtp_tensors"]) > 10
    assert not kept["unused_hf_tensors"]
    assert json.loads((tmp_path / "keep_ckpt" / "model_config.json").read_text())["mtp_num_layers"] == 0
    assert json.loads((tmp_path / "convert_ckpt" / "model_config.json").read_text())["mtp_num_layers"] == 1
    assert json.loads((tmp_path / "keep_hf" / "config.json").read_text())["num_nextn_predict_layers"] == 1


def _transformers_deepseek(out: Path) -> int:
    """A tiny DeepSeek-V3 that transformers itself makes and saves: config.json keeps the default
    num_nextn_predict_layers=1, the files hold no MTP layer (transformers builds none)."""
    import transformers

    from r1mega.bridge.hf_config import to_hf_config
    from r1mega.config.presets import resolve_model
    from r1mega.config.schema import ModelConfig

    settings = to_hf_config(resolve_model(ModelConfig(preset="deepseek_v3", size="tiny")))
    cfg = transformers.DeepseekV3Config(**{k: v for k, v in settings.items()
                                           if k not in ("architectures", "model_type", "num_nextn_predict_layers")})
    assert cfg.num_nextn_predict_layers == 1
    torch.manual_seed(5)
    transformers.DeepseekV3ForCausalLM(cfg).save_pretrained(out)
    return cfg.num_hidden_layers


@pytest.mark.timeout(600)
def test_declared_but_absent_mtp_layer_converts_without_it_and_a_partial_one_is_refused(with_mtp, tmp_path):
    """transformers' DeepSeek-V3 converts with the default flags (one line says the MTP layer is left out)
    and round-trips bit-identically; an MTP layer with some of its tensors is refused, naming the missing."""
    layers = _transformers_deepseek(tmp_path / "hf_saved")
    assert not [n for n in HFReader(tmp_path / "hf_saved").names() if n.startswith(f"model.layers.{layers}.")]
    partial = tmp_path / "partial"
    partial.mkdir()
    src, info = with_mtp
    tensors = _tensors(src)
    gone = [f"model.layers.{info['num_layers']}.eh_proj.weight", f"model.layers.{info['num_layers']}.enorm.weight"]
    from r1mega.bridge.safetensors_io import write_safetensors

    write_safetensors(partial / "model.safetensors", sorted((k, v) for k, v in tensors.items() if k not in gone))
    (partial / "config.json").write_text((src / "config.json").read_text())
    jobs = {"absent": {"src": str(tmp_path / "hf_saved")}, "partial": {"src": str(partial), "expect_error": True}}
    spec = {"mode": "mtp_convert", "root": str(tmp_path), "jobs": jobs}
    spawn_ranks([CONVERT, json.dumps(spec)], 1, timeout_s=500, name="mtp absent", log_dir=tmp_path / "logs")
    _same(tmp_path / "hf_saved", tmp_path / "absent_hf")
    said = [line for line in (tmp_path / "logs" / "mtp_absent.rank0.log").read_text().splitlines()
            if "num_nextn_predict_layers" in line]
    assert len(said) == 1 and "no tensor of MTP layer" in said[0], said
    assert json.loads((tmp_path / "absent_ckpt" / "model_config.json").read_text())["mtp_num_layers"] == 0
    error = (tmp_path / "partial_error.txt").read_text()
    assert "present only in part" in error and all(n in error for n in gone), error
