"""Rank program for the bridge tests (run through ``r1mega.platform.spawn.spawn_ranks``).

    python tests/bridge_worker.py <json spec>

``mode``:
* ``roundtrip``: build ``preset`` in ``layout`` with layout-invariant random weights (norms and the
  expert bias too), stream-export it to ``out`` (HF dir), import that into a freshly initialised
  model of the same layout and require every local tensor to be bit-identical. Rank 0 writes
  ``out/stats.json`` (export peak bytes per bucket).
* ``parity`` (one process): for each preset, export, load with transformers and compare logits;
  then a random transformers model saved with ``save_pretrained`` is imported and compared, and
  exported again (HF -> r1mega -> HF must be bit-identical). Writes ``report`` (json).
* ``hf_roundtrip``: import the HF directory ``src`` (a transformers-made model) into ``layout`` and
  export it to ``out``; the test compares the two directories.
* ``mtp``: import ``src`` (a transformers-made DeepSeek-V3 or GLM-4-MoE plus an MTP layer, see
  ``mtp_checkpoint``) into ``layout`` with the MTP block, write the main model's logits (through
  the pipeline schedule, gathered over TP) to ``out/logits.pt`` (rank 0) and export to ``out``.
"""

from __future__ import annotations

import json
import sys
import zlib
from dataclasses import replace

import torch


def _model_cfg(preset: str, overrides: dict):
    from r1mega.config.presets import resolve_model
    from r1mega.config.schema import ModelConfig

    return resolve_model(ModelConfig(preset=preset, **overrides))


@torch.no_grad()
def randomize(model, config, seed: int) -> None:
    """Layout-invariant random values for every exported tensor (matrices, norms, expert bias)."""
    from r1mega.bridge.export import local_tensors
    from r1mega.models.sharding import shard_of

    for info, t in local_tensors(model, config):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(info.canonical_name.encode()))
        full = torch.randn(info.full_shape, generator=gen)
        if t.dim() == 1:
            full = (0.1 * full) if "expert_bias" in info.canonical_name else 1.0 + 0.1 * full
        else:
            full = 0.05 * full
        t.copy_(shard_of(full, info).to(t.dtype))


def _setup(layout_text: str):
    from r1mega.platform.distributed import init_model_parallel, init_process_group
    from r1mega.train.parallel_check import Layout

    init_process_group(timeout_minutes=3)
    layout = Layout.parse(layout_text)
    parallel = layout.parallel_config(micro_batch_size=1)
    init_model_parallel(parallel, seed=1)
    return parallel


def roundtrip(spec: dict) -> None:
    parallel = _setup(spec["layout"])
    from r1mega.bridge.export import local_tensors
    from r1mega.bridge.hf_dir import load_hf, save_hf
    from r1mega.models.policy import build_policy

    model_cfg = _model_cfg(spec["preset"], spec.get("overrides", {}))
    stage = build_policy(model_cfg, parallel)
    randomize(stage.model, stage.config, seed=11)
    before = {info.canonical_name: t.detach().clone() for info, t in local_tensors(stage.model, stage.config)}
    exporter = save_hf(stage.model, stage.config, model_cfg, spec["out"], bucket_bytes=spec["bucket_bytes"])

    fresh = build_policy(model_cfg, parallel)
    randomize(fresh.model, fresh.config, seed=99)
    load_hf(fresh.model, fresh.config, model_cfg, spec["out"])
    after = {info.canonical_name: t.detach() for info, t in local_tensors(fresh.model, fresh.config)}
    assert before.keys() == after.keys()
    bad = [n for n in before if not torch.equal(before[n], after[n])]
    assert not bad, f"not bit-identical after Megatron -> HF -> Megatron: {bad[:5]}"
    stats = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(stats, exporter.stats.peak_bucket_bytes)
    if torch.distributed.get_rank() == 0:
        largest = max(e.nbytes for e in exporter.entries)
        json.dump({"peak_bucket_bytes": stats, "bucket_bytes": spec["bucket_bytes"], "largest_tensor": largest,
                   "buckets": exporter.stats.buckets, "checked": len(before)},
                  open(f"{spec['out']}/stats.json", "w"))
    from r1mega.platform.distributed import shutdown

    shutdown()


@torch.no_grad()
def megatron_logits(model, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    model.eval()
    positions = torch.arange(tokens.size(1)).unsqueeze(0).expand_as(tokens)
    logits = model(tokens, positions, None)
    return logits[..., :vocab].float()


def hf_roundtrip(spec: dict) -> None:
    parallel = _setup(spec["layout"])
    from r1mega.bridge.hf_config import from_hf_config
    from r1mega.bridge.hf_dir import load_hf, read_hf_config, save_hf
    from r1mega.models.policy import build_policy

    model_cfg = from_hf_config(read_hf_config(spec["src"]))
    stage = build_policy(model_cfg, parallel)
    randomize(stage.model, stage.config, seed=99)  # nothing of the initial weights may survive the import
    result = load_hf(stage.model, stage.config, model_cfg, spec["src"])
    assert not result["unused"], f"HF tensors not imported: {result['unused']}"
    save_hf(stage.model, stage.config, model_cfg, spec["out"], bucket_bytes=spec["bucket_bytes"])
    from r1mega.platform.distributed import shutdown

    shutdown()


def deepseek_with_mtp(out: str, seed: int) -> dict:
    """A transformers DeepSeek-V3 (tiny preset) whose checkpoint carries one MTP layer, as DeepSeek's do."""
    return mtp_checkpoint("deepseek_v3", {}, out, seed)


def mtp_checkpoint(preset: str, overrides: dict, out: str, seed: int) -> dict:
    """A transformers model of ``preset`` (DeepSeek-V3, GLM-4-MoE) whose checkpoint carries one MTP layer.

    transformers has no MTP: a model with one more decoder layer is made and saved, and that last layer
    becomes the MTP layer (its attention and MoE MLP) plus the MTP-only tensors (enorm, hnorm, eh_proj,
    the shared head's norm) and the copies of the embedding and output head; config.json says
    ``num_nextn_predict_layers: 1``. transformers loads it and ignores the MTP layer.
    """
    import tempfile
    from pathlib import Path

    from r1mega.bridge.safetensors_io import write_safetensors

    model_cfg = _model_cfg(preset, overrides)
    n, h = model_cfg.num_layers, model_cfg.hidden_size
    with tempfile.TemporaryDirectory() as tmp:
        _random_hf_model(replace(model_cfg, num_layers=n + 1), tmp, seed=seed)
        tensors = _tensors(tmp)
        config = json.loads(Path(tmp, "config.json").read_text())
    gen = torch.Generator().manual_seed(seed)
    mtp = f"model.layers.{n}."
    tensors.update({
        mtp + "enorm.weight": 1.0 + 0.1 * torch.randn(h, generator=gen),
        mtp + "hnorm.weight": 1.0 + 0.1 * torch.randn(h, generator=gen),
        mtp + "eh_proj.weight": 0.05 * torch.randn(h, 2 * h, generator=gen),
        mtp + "shared_head.norm.weight": 1.0 + 0.1 * torch.randn(h, generator=gen),
        mtp + "embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
        mtp + "shared_head.head.weight": tensors["lm_head.weight"].clone(),
    })
    Path(out).mkdir(parents=True, exist_ok=True)
    write_safetensors(Path(out, "model.safetensors"), sorted(tensors.items()))
    config.update(num_hidden_layers=n, num_nextn_predict_layers=1)
    Path(out, "config.json").write_text(json.dumps(config, indent=1))
    return {"num_layers": n, "mtp_tensors": sorted(k for k in tensors if k.startswith(mtp))}


@torch.no_grad()
def pipeline_logits(model, tokens: torch.Tensor, vocab: int) -> torch.Tensor | None:
    """The model's logits through megatron's schedule (any PP), gathered over TP; None off the last stage."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model.eval()

    def step(data_iterator, chunk):
        toks = next(data_iterator)
        positions = torch.arange(toks.size(1)).unsqueeze(0).expand_as(toks)
        out = chunk(toks, positions, None)
        return out, lambda o: (o.float().sum() * 0, {"logits": o.detach()})

    outs = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([tokens]), model=[model],
                                       num_microbatches=1, seq_length=tokens.size(1),
                                       micro_batch_size=tokens.size(0), forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    local = outs[0]["logits"].float()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(local) for _ in range(tp)]
        torch.distributed.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        local = torch.cat(parts, dim=-1)
    return local[..., :vocab]


def mtp(spec: dict) -> None:
    parallel = _setup(spec["layout"])
    from r1mega.bridge.export import local_tensors
    from r1mega.bridge.hf_config import from_hf_config
    from r1mega.bridge.hf_dir import load_hf, read_hf_config, save_hf
    from r1mega.models.policy import build_policy

    model_cfg = from_hf_config(read_hf_config(spec["src"]))
    assert model_cfg.mtp_num_layers == 1, model_cfg.mtp_num_layers
    stage = build_policy(model_cfg, parallel)
    randomize(stage.model, stage.config, seed=99)  # nothing of the initial weights may survive the import
    result = load_hf(stage.model, stage.config, model_cfg, spec["src"])
    assert not result["unused"], f"HF tensors not imported: {result['unused']}"
    mtp_here = sorted(i.canonical_name for i, _ in local_tensors(stage.model, stage.config)
                      if i.canonical_name.startswith("mtp."))
    tokens = torch.randint(0, model_cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    logits = pipeline_logits(stage.model, tokens, model_cfg.vocab_size)
    rank = torch.distributed.get_rank()
    if logits is not None and rank == torch.distributed.get_world_size() - 1:
        torch.save({"logits": logits, "tokens": tokens, "mtp_on_last_stage": mtp_here},
                   f"{spec['out']}_logits.pt")
    save_hf(stage.model, stage.config, model_cfg, spec["out"], bucket_bytes=1 << 16)
    from r1mega.platform.distributed import shutdown

    shutdown()


def _tensors(hf_dir: str) -> dict[str, torch.Tensor]:
    from pathlib import Path

    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@torch.no_grad()
def hf_logits(hf_dir: str, tokens: torch.Tensor, **config_changes) -> torch.Tensor:
    import transformers

    config = transformers.AutoConfig.from_pretrained(hf_dir)
    for k, v in config_changes.items():
        setattr(config, k, v)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, config=config, dtype=torch.float32,
                                                           attn_implementation="eager")
    hf.eval()
    return hf(input_ids=tokens).logits.float()


def cli_convert_round_trip(src, work) -> list[str]:
    """``r1mega convert from-hf`` then ``to-hf`` of the HF directory ``src`` with default flags, each in a
    fresh process; the names of the tensors that differ from ``src`` (or are missing / extra), for a test's
    assertion."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    ckpt, out = Path(work) / "ckpt", Path(work) / "out"
    for args in (["from-hf", "--hf", str(src), "--out", str(ckpt)], ["to-hf", "--ckpt", str(ckpt), "--out", str(out)]):
        r = subprocess.run([sys.executable, "-m", "r1mega.cli", "--log-level", "WARNING", "convert", *args],
                           capture_output=True, text=True, timeout=280, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
    ref, got = _tensors(str(src)), _tensors(str(out))
    return sorted(set(ref) ^ set(got)) + [k for k in ref if k in got and not torch.equal(ref[k], got[k])]


def _random_hf_model(model_cfg, out: str, seed: int) -> None:
    """A randomly initialised transformers model (noisy norms / router bias) saved with save_pretrained."""
    import transformers

    from r1mega.bridge.hf_config import to_hf_config

    cfg_dict = to_hf_config(model_cfg)
    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in cfg_dict.items() if k != "architectures"})
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    for _, p in hf.named_parameters():  # default init leaves norms at 1: perturb everything
        p.data.add_(0.02 * torch.randn_like(p)) if p.dim() == 1 else p.data.normal_(0, 0.05)
    for name, b in hf.named_buffers():
        if "e_score_correction_bias" in name:
            b.copy_(0.1 * torch.randn_like(b))
    hf.save_pretrained(out)


def parity(spec: dict) -> None:
    parallel = _setup("1")
    from r1mega.bridge.hf_config import from_hf_config
    from r1mega.bridge.hf_dir import load_hf, read_hf_config, save_hf
    from r1mega.models.policy import build_policy

    report = {}
    gen = torch.Generator().manual_seed(0)
    for preset, overrides in spec["presets"]:
        model_cfg = _model_cfg(preset, overrides)
        key = preset + "".join(f"_{k}{v}" for k, v in overrides.items() if k != "qk_layernorm")
        tokens = torch.randint(0, model_cfg.vocab_size, (2, 24), generator=gen)
        stage = build_policy(model_cfg, parallel)
        randomize(stage.model, stage.config, seed=5)
        out = f"{spec['root']}/{key}_export"
        save_hf(stage.model, stage.config, model_cfg, out, bucket_bytes=64 << 10)
        ours = megatron_logits(stage.model, tokens, model_cfg.vocab_size)
        theirs = hf_logits(out, tokens)
        export_diff = float((ours - theirs).abs().max())

        src = f"{spec['root']}/{key}_hf_random"
        _random_hf_model(model_cfg, src, seed=3)
        imported_cfg = from_hf_config(read_hf_config(src))
        diffs = {f: (getattr(imported_cfg, f), getattr(model_cfg, f)) for f in (
            "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "num_experts",
            "moe_router_topk", "moe_ffn_hidden_size", "vocab_size", "first_k_dense_layers", "qk_layernorm",
            "moe_shared_expert_intermediate_size", "norm_epsilon", "rotary_base")
            if getattr(imported_cfg, f) != getattr(model_cfg, f)}
        assert not diffs, f"{preset}: HF config -> ModelConfig differs: {diffs}"
        imported_cfg = replace(imported_cfg, seed=model_cfg.seed)
        stage2 = build_policy(imported_cfg, parallel)
        load_hf(stage2.model, stage2.config, imported_cfg, src)
        imported_logits = megatron_logits(stage2.model, tokens, model_cfg.vocab_size)
        import_diff = float((imported_logits - hf_logits(src, tokens)).abs().max())
        report[key] = {"export_max_abs_logit_diff": export_diff, "import_max_abs_logit_diff": import_diff,
                       "logit_scale": float(theirs.abs().max())}
        # HF -> r1mega -> HF: the same tensors, bit for bit
        again = f"{spec['root']}/{key}_hf_again"
        save_hf(stage2.model, stage2.config, imported_cfg, again, bucket_bytes=64 << 10)
        before, after = _tensors(src), _tensors(again)
        report[key]["hf_round_trip_identical"] = before.keys() == after.keys() and all(
            torch.equal(before[k], after[k]) for k in before)
        if (model_cfg.rotary_percent or 1.0) < 1:  # the rotary share matters: rotating every dim differs
            full = dict(read_hf_config(src)["rope_parameters"], partial_rotary_factor=1.0)
            report[key]["full_rotary_logit_diff"] = float(
                (imported_logits - hf_logits(src, tokens, rope_parameters=full)).abs().max())
        if model_cfg.rope_type == "llama3":  # the scaling matters at these positions: without it HF differs
            plain = dict(read_hf_config(src)["rope_parameters"], rope_type="default")
            report[key]["unscaled_rope_logit_diff"] = float(
                (imported_logits - hf_logits(src, tokens, rope_parameters=plain)).abs().max())
        if model_cfg.window_size:  # the window and YaRN's unrounded correction range matter at these positions
            report[key]["wider_window_logit_diff"] = float(
                (imported_logits - hf_logits(src, tokens, sliding_window=model_cfg.window_size + 1)).abs().max())
            rounded = dict(read_hf_config(src)["rope_parameters"], truncate=True)
            report[key]["truncated_yarn_logit_diff"] = float(
                (imported_logits - hf_logits(src, tokens, rope_parameters=rounded)).abs().max())
        print(key, report[key], flush=True)
    json.dump(report, open(spec["report"], "w"), indent=1)
    from r1mega.platform.distributed import shutdown

    shutdown()


if __name__ == "__main__":
    import r1mega.models  # noqa: F401  (readies megatron before any megatron import)

    spec = json.loads(sys.argv[1])
    {"roundtrip": roundtrip, "parity": parity, "hf_roundtrip": hf_roundtrip, "mtp": mtp}[spec["mode"]](spec)
