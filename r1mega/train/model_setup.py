"""Policy + megatron DDP + megatron optimizer + LR scheduler for this rank, built from a config."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1mega.config.schema import ModelConfig, OptimizerConfig, ParallelConfig
from r1mega.models.policy import PolicyStage, build_policy
from r1mega.models.sharding import init_layout_invariant

from megatron.core.distributed import (  # noqa: E402
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,  # noqa: E402
)
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig  # noqa: E402
from megatron.core.optimizer import get_megatron_optimizer  # noqa: E402
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402


@dataclass
class TrainingModel:
    """Everything a training step needs on this rank."""

    stage: PolicyStage
    ddp: DistributedDataParallel
    optimizer: object  # megatron MegatronOptimizer / ChainedOptimizer
    scheduler: OptimizerParamScheduler

    @property
    def module(self) -> torch.nn.Module:
        """The unwrapped GPTModel chunk (parameter names without the DDP prefix)."""
        return self.stage.model

    @property
    def config(self):
        return self.stage.config


def build_training_model(model: ModelConfig, parallel: ParallelConfig, optim: OptimizerConfig,
                         total_steps: int) -> TrainingModel:
    """Build this rank's stage with layout-independent init, wrapped for training."""
    stage = build_policy(model, parallel)
    init_layout_invariant(stage.model, stage.config, model.seed)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,
        bucket_size=None,
    )
    ddp = DistributedDataParallel(config=stage.config, ddp_config=ddp_config, module=stage.model)
    optimizer = get_megatron_optimizer(
        MegatronOptimizerConfig(
            optimizer=optim.name,
            lr=optim.lr,
            min_lr=optim.min_lr,
            weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1,
            adam_beta2=optim.adam_beta2,
            adam_eps=optim.adam_eps,
            clip_grad=optim.clip_grad,
            bf16=stage.config.bf16,
            params_dtype=stage.config.params_dtype,
            use_distributed_optimizer=parallel.use_distributed_optimizer,
        ),
        [ddp],
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.warmup_steps else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=max(total_steps, optim.warmup_steps + 1),
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
    stage.config.finalize_model_grads_func = finalize_model_grads
    stage.config.grad_scale_func = optimizer.scale_loss
    return TrainingModel(stage=stage, ddp=ddp, optimizer=optimizer, scheduler=scheduler)
