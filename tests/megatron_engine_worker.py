"""Rank program of the megatron rollout engine tests (run through ``spawn_ranks``).

    python tests/megatron_engine_worker.py <json spec>

Every rank builds a tiny ``spec["preset"]`` policy in ``spec["layout"]`` (layout-independent init: the same
weights at every layout) and generates the same prompts with ``rollout/megatron_engine.MegatronEngine``:

- ``plain``: temperature 1, many stop ids (most samples stop early), routing captured;
- ``filtered``: temperature 0.7, top-k 50, top-p 0.9, no stop (every sample runs to max_new_tokens);
- ``single``: the first prompt alone (at EP2 one data-parallel group idles in lock step).

With ``spec["check"]`` (world 1) the worker also scores the samples with the learner: its training forward's
log-probs (``compute_logprobs``) against the ``plain`` sampling log-probs, the learner's own routing
(``score_with_routing``) against the captured one, and the log-softmax of the filtered distribution of a
plain full forward against the ``filtered`` log-probs, and one prompt's samples alone against the same samples
in a batch with a shorter and a longer prompt (``padding_check``). Rank 0 writes ``spec["out"]`` (json).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STOP_IDS = list(range(3, 60))  # ~11% of the vocabulary: most samples stop within max_new_tokens


def build(spec: dict):
    from r1mega.platform.distributed import init_model_parallel, init_process_group
    from r1mega.train.parallel_check import Layout

    init_process_group(timeout_minutes=3)
    parallel = Layout.parse(spec["layout"]).parallel_config(micro_batch_size=4)
    init_model_parallel(parallel, seed=1)
    from r1mega.config.presets import resolve_model
    from r1mega.config.schema import ModelConfig, OptimizerConfig
    from r1mega.train.model_setup import build_training_model

    model_cfg = resolve_model(ModelConfig(preset=spec["preset"], size="tiny", precision="fp32", seq_length=64))
    return build_training_model(model_cfg, parallel, OptimizerConfig(), total_steps=1), model_cfg


def main(spec: dict) -> None:
    import torch
    import torch.distributed as dist

    tm, model_cfg = build(spec)
    from r1mega.rollout import SamplingSpec
    from r1mega.rollout.megatron_engine import MegatronEngine

    # prefill_tokens=40: a batch's prompts are prefilled in groups of a few rows (more groups at world 1 than
    # per data-parallel group at EP2, the groups' counts evened out by dummy forwards under lock step)
    engine = MegatronEngine(tm.module, tm.config, model_cfg.vocab_size, return_routed_experts=True, prefill_tokens=40)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(60, model_cfg.vocab_size, (int(n),), generator=gen).tolist()
               for n in torch.randint(4, 12, (spec["prompts"],), generator=gen)]
    new = spec["max_new_tokens"]
    plain = engine.generate(prompts, 3, SamplingSpec(max_new_tokens=new, seed=11, stop_token_ids=STOP_IDS))
    filtered = engine.generate(prompts, 3, SamplingSpec(max_new_tokens=new, seed=12, temperature=0.7, top_k=50,
                                                        top_p=0.9))
    # one prompt: at EP2 the other data-parallel group has nothing to generate and answers every forward
    single = engine.generate(prompts[:1], 3, SamplingSpec(max_new_tokens=new, seed=13, stop_token_ids=STOP_IDS))
    # long prompts on one data-parallel group, short ones on the other (round robin at EP2): the long ones need
    # more prefill forwards, so the other group answers some with dummy forwards while its batch is under way
    staggered = engine.generate([prompts[0] + prompts[1], [7, 8, 9, 10]] * 2, 3,
                                SamplingSpec(max_new_tokens=new, seed=14, stop_token_ids=STOP_IDS))
    flat = {name: [g for row in rows for g in row]
            for name, rows in (("plain", plain), ("filtered", filtered), ("single", single), ("staggered", staggered))}
    report = {name: {"tokens": [g.token_ids for g in gens], "logprobs": [g.logprobs for g in gens],
                     "finish": [g.finish_reason for g in gens], "prompts": [g.prompt_index for g in gens]}
              for name, gens in flat.items()}
    report["plain"]["routes"] = [g.routed_experts.tolist() for g in flat["plain"]]
    if spec.get("check"):
        report["check"] = check(tm, model_cfg, flat)
        report["check"].update(padding_check(engine, prompts[0], new))
    if dist.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


def padding_check(engine, prompt: list, new: int) -> dict:
    """``prompt`` generated alone and between a shorter and a longer prompt (its own seed in both): the padding
    and the rows beside it (which stop at other steps and are dropped from the batch) must not change it."""
    import torch

    from r1mega.rollout import SamplingSpec

    longer = torch.randint(60, 200, (len(prompt) + 9,), generator=torch.Generator().manual_seed(8)).tolist()
    alone = engine.generate([prompt], 4, SamplingSpec(max_new_tokens=new, prompt_seeds=(21,),
                                                      stop_token_ids=STOP_IDS))[0]
    mixed = engine.generate([prompt[:2], prompt, longer], 4, SamplingSpec(
        max_new_tokens=new, prompt_seeds=(22, 21, 23), stop_token_ids=STOP_IDS))[1]
    lp = max(abs(a - b) for x, y in zip(alone, mixed) for a, b in zip(x.logprobs, y.logprobs))
    return {"padding_same_tokens": [g.token_ids for g in alone] == [g.token_ids for g in mixed],
            "padding_same_routes": all(torch.equal(x.routed_experts, y.routed_experts) for x, y in zip(alone, mixed)),
            "padding_logp_max_abs": lp, "padding_lengths": [len(g.token_ids) for g in alone]}


def _batch(gens):
    from r1mega.train.grpo import build_batch

    return build_batch(gens, pad_id=0)


def check(tm, model_cfg, flat: dict) -> dict:
    """World 1: the engine's samples scored by the learner (see the module doc)."""
    import torch

    from r1mega.rl.learner import LearnerSettings, compute_logprobs, score_with_routing
    from r1mega.rollout.megatron_engine import filtered_logits

    settings = LearnerSettings(micro_batch_size=3, valid_vocab=model_cfg.vocab_size)
    gens = flat["plain"]
    batch = _batch(gens)
    learner = compute_logprobs(tm.ddp, tm.module, batch, settings)
    _, record = score_with_routing(tm.ddp, tm.module, batch, settings, gather_own=True)
    logp_err, route_diff, routed = 0.0, 0, 0
    for k, g in enumerate(gens):
        p, m = len(g.prompt_token_ids), len(g.token_ids)
        logp_err = max(logp_err, float((learner[k, p - 1: p - 1 + m] - torch.tensor(g.logprobs)).abs().max()))
        own = record.own[k, : p + m - 1].sort(-1).values
        mine = g.routed_experts.to(torch.long).sort(-1).values
        route_diff += int((own != mine).any(-1).sum())
        routed += own.shape[0] * own.shape[1]
    # the filtered samples: log-softmax of the tempered, top-k / top-p filtered logits of one full forward
    gens = flat["filtered"]
    batch = _batch(gens)
    tm.module.eval()
    with torch.no_grad():
        s = batch.tokens.size(1)
        pos = torch.arange(s).unsqueeze(0).expand_as(batch.tokens)
        mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)
        logits = tm.module(batch.tokens, pos, mask)[..., : model_cfg.vocab_size].float()
    tm.module.train()
    filt_err, outside = 0.0, 0
    for k, g in enumerate(gens):
        p, m = len(g.prompt_token_ids), len(g.token_ids)
        proc = filtered_logits(logits[k, p - 1: p - 1 + m], 0.7, 50, 0.9)
        lp = torch.log_softmax(proc.double(), -1).gather(-1, torch.tensor(g.token_ids).unsqueeze(-1)).squeeze(-1)
        outside += int((~torch.isfinite(lp)).sum())
        filt_err = max(filt_err, float((lp - torch.tensor(g.logprobs, dtype=torch.float64)).abs().max()))
    return {"learner_logp_max_abs": logp_err, "routing_positions_differing": route_diff, "routing_positions": routed,
            "filtered_logp_max_abs": filt_err, "sampled_outside_filter": outside}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(json.loads(sys.argv[1]))
