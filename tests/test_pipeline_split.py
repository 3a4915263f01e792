"""Uneven pipeline split: r1mega's validation accepts exactly the splits megatron builds correctly, and
the per-stage layer counts it reports are megatron's.

megatron's own functions are evaluated in this process without a process group:
``TransformerConfig.__post_init__`` (its checks), and ``get_num_layers_to_build`` /
``get_transformer_layer_offset`` with the pipeline rank passed explicitly.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from r1mega.config import ConfigError, load_config
from r1mega.config.pipeline_split import split_problem, stage_layers
from r1mega.config.schema import ModelConfig, ParallelConfig, R1Config
from r1mega.config.validate import validate_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _megatron():
    from r1mega.platform.megatron_compat import ensure_megatron

    ensure_megatron()
    import torch

    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    return torch, TransformerConfig, get_num_layers_to_build, get_transformer_layer_offset


def megatron_split(num_layers: int, pp: int, first, last) -> list[range] | None:
    """The layer ranges megatron builds on each pipeline rank, or None when it refuses the split or
    builds something other than ``num_layers`` layers with the configured first/last stage sizes."""
    torch, TransformerConfig, layers_to_build, layer_offset = _megatron()
    try:
        config = TransformerConfig(num_layers=num_layers, hidden_size=8, num_attention_heads=1,
                                   pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                                   num_layers_in_first_pipeline_stage=first,
                                   num_layers_in_last_pipeline_stage=last)
        ranges = [range(layer_offset(config, pp_rank=r), layer_offset(config, pp_rank=r)
                        + layers_to_build(config, pp_rank=r)) for r in range(pp)]
    except (ValueError, AssertionError):
        return None
    covered = [i for r in ranges for i in r]
    if covered != list(range(num_layers)) or any(len(r) < 1 for r in ranges):
        return None  # accepted, but not a split of the model (overlaps, gaps, empty stages)
    if (first is not None and len(ranges[0]) != first) or (last is not None and len(ranges[-1]) != last):
        return None  # accepted, but a configured stage size is silently not what is built
    return ranges


def _r1mega_accepts(num_layers: int, pp: int, first, last) -> bool:
    cfg = R1Config(model=ModelConfig(preset="qwen3", num_layers=num_layers),
                   parallel=ParallelConfig(pp=pp, num_layers_in_first_pipeline_stage=first,
                                           num_layers_in_last_pipeline_stage=last))
    try:
        validate_config(cfg, world_size=pp)
    except ConfigError as e:
        assert "pipeline" in str(e) or "parallel.pp" in str(e), str(e)  # nothing else is wrong
        return False
    return True


EDGE = [None, -1, 0, 1, 2, 3, 4, 6, 9]
GRID = list(itertools.product(range(1, 10), range(1, 5), EDGE, EDGE))  # layers, pp, first, last


def test_validation_agrees_with_megatron_on_every_small_split():
    """Every (num_layers <= 9, pp <= 4, first, last) incl. zero, negative and oversized edges."""
    disagree, accepted = [], 0
    for num_layers, pp, first, last in GRID:
        built = megatron_split(num_layers, pp, first, last)
        ours = split_problem(num_layers, pp, first, last) is None
        if ours != (built is not None):
            disagree.append((num_layers, pp, first, last, built))
        elif ours:
            accepted += 1
            if stage_layers(num_layers, pp, first, last) != [len(r) for r in built]:
                disagree.append((num_layers, pp, first, last, built))
    assert not disagree, disagree[:10]
    assert 50 < accepted < len(GRID) // 2  # both answers occur often
    # the whole validation (not just the helper) gives the same answers
    for case in [(5, 2, 2, None), (5, 2, 2, 3), (5, 2, 3, 3), (5, 1, 5, None), (5, 1, 2, 3), (7, 3, None, None),
                 (7, 3, 1, 2), (7, 4, 1, None), (4, 3, 0, None), (4, 2, None, -1)]:
        assert _r1mega_accepts(*case) == (megatron_split(*case) is not None), case


def test_deepseek_v3_671b_recipe_split_is_megatrons():
    cfg = load_config(CONFIGS / "r1_deepseek_v3_671b.yaml", world_size=1024)  # validates
    p = cfg.parallel
    model = ModelConfig(preset="deepseek_v3", size="671b")
    from r1mega.config.presets import resolve_model

    num_layers = resolve_model(model).num_layers
    built = megatron_split(num_layers, p.pp, p.num_layers_in_first_pipeline_stage,
                           p.num_layers_in_last_pipeline_stage)
    assert built is not None
    ours = stage_layers(num_layers, p.pp, p.num_layers_in_first_pipeline_stage, p.num_layers_in_last_pipeline_stage)
    assert ours == [len(r) for r in built] == [3] + [4] * 14 + [2]
    # the three dense layers (first_k_dense_replace=3) are exactly the first stage
    assert list(built[0]) == [0, 1, 2]


@pytest.mark.parametrize("overrides,megatron_builds,phrases", [
    # the recipe without its uneven split: 61 layers do not divide over 16 stages
    (["parallel.num_layers_in_first_pipeline_stage=null", "parallel.num_layers_in_last_pipeline_stage=null"],
     False, ["model.num_layers=61 is not divisible by parallel.pp=16", "split unevenly",
             "parallel.num_layers_in_first_pipeline_stage=3 parallel.num_layers_in_last_pipeline_stage=2"]),
    (["parallel.num_layers_in_last_pipeline_stage=3"], False,
     ["55 middle layers do not divide over 14 middle pipeline stages",
      "parallel.num_layers_in_first_pipeline_stage=3 parallel.num_layers_in_last_pipeline_stage=2"]),
    (["parallel.num_layers_in_first_pipeline_stage=0"], False, ["must be larger than 0"]),
    (["parallel.num_layers_in_first_pipeline_stage=1", "parallel.num_layers_in_last_pipeline_stage=4"], True, []),
    (["parallel.num_layers_in_first_pipeline_stage=null"], False,
     ["59 middle layers do not divide over 15 middle pipeline stages",
      "set parallel.num_layers_in_last_pipeline_stage=1"]),
])
def test_deepseek_v3_671b_variants(overrides, megatron_builds, phrases):
    """Variants of the 671B recipe: validation refuses exactly what megatron would not build, and says
    which values would work."""
    path = CONFIGS / "r1_deepseek_v3_671b.yaml"
    try:
        load_config(path, overrides, world_size=1024)
        error = ""
    except ConfigError as e:
        error = str(e)
    values = dict(first=3, last=2)
    for o in overrides:
        key, value = o.split("=")
        values[key.rsplit("_", 3)[-3]] = None if value == "null" else int(value)
    assert (megatron_split(61, 16, values["first"], values["last"]) is not None) == megatron_builds
    assert (error == "") == megatron_builds, error
    for phrase in phrases:
        assert phrase in error, error


def test_pp1_with_a_split_says_to_unset_it():
    cfg = R1Config(model=ModelConfig(preset="qwen3", num_layers=5),
                   parallel=ParallelConfig(pp=1, num_layers_in_first_pipeline_stage=2,
                                           num_layers_in_last_pipeline_stage=3))
    with pytest.raises(ConfigError, match="unset parallel.num_layers_in_first_pipeline_stage and "
                                          "parallel.num_layers_in_last_pipeline_stage"):
        validate_config(cfg, world_size=1)


def test_policy_config_hands_the_recipe_split_to_megatron():
    """r1mega's TransformerConfig for the 671B recipe carries the split: megatron builds 3 + 14x4 + 2."""
    _megatron()
    from r1mega.models.policy import pipeline_stage_layers, transformer_config

    cfg = load_config(CONFIGS / "r1_deepseek_v3_671b.yaml", world_size=1024)
    config = transformer_config(cfg.model, cfg.parallel)
    assert pipeline_stage_layers(config) == [3] + [4] * 14 + [2]
    # the dense layers (moe_layer_freq 0) are the first stage's
    assert list(config.moe_layer_freq[:4]) == [0, 0, 0, 1]
