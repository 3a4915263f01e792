"""Run configuration: typed schema, model presets, YAML/CLI loading and validation.

Import-light on purpose (no torch, no megatron) so a recipe can be checked before any process
group or accelerator is touched.
"""

from r1mega.config.errors import ConfigError
from r1mega.config.loader import config_to_yaml, load_config, save_config, stage_config
from r1mega.config.presets import PRESETS, resolve_model
from r1mega.config.schema import (
    BenchmarkConfig,
    CheckpointConfig,
    DataConfig,
    DistillConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    ModelRewardConfig,
    OptimizerConfig,
    ParallelConfig,
    R1Config,
    RewardConfig,
    RewardTermConfig,
    RLConfig,
    RolloutConfig,
    StageConfig,
    TrainerConfig,
)
from r1mega.config.validate import check_stage_list, derived_dp, effective_sequence_parallel, validate_config

__all__ = [
    "BenchmarkConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "EvalConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PRESETS",
    "ParallelConfig",
    "R1Config",
    "RewardConfig",
    "ModelRewardConfig",
    "RewardTermConfig",
    "RLConfig",
    "RolloutConfig",
    "StageConfig",
    "TrainerConfig",
    "config_to_yaml",
    "check_stage_list",
    "derived_dp",
    "effective_sequence_parallel",
    "load_config",
    "resolve_model",
    "save_config",
    "stage_config",
    "validate_config",
]
