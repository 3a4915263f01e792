"""One process: next-token training steps of the tiny DeepSeek-V3 with one MTP layer (tests/test_mtp.py).

    python tests/mtp_worker.py <json spec>   # {"out": path}

For ``mtp_loss_scale`` 0 and 0.3 (same init, same batch): the step's main loss, the gradient norm of
the MTP parameters and of the embedding; then a forward without labels in training mode (what the
RL/SFT learner does) with the scale > 0, whose error is recorded, and the routing-replay handle's
MoE layer count (the MTP layer's router is not one of them).
"""

from __future__ import annotations

import json
import sys

import torch


def main(spec: dict) -> None:
    import r1mega.models  # noqa: F401  (readies megatron)
    from r1mega.config.presets import resolve_model
    from r1mega.config.schema import ModelConfig, OptimizerConfig, ParallelConfig
    from r1mega.models.mtp import MTPLossUnavailable
    from r1mega.platform.distributed import init_model_parallel, init_process_group, shutdown
    from r1mega.train.lm_step import lm_train_step
    from r1mega.train.model_setup import build_training_model

    init_process_group(timeout_minutes=3)
    parallel = ParallelConfig()
    results = {}
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    for scale in (0.0, 0.3):
        init_model_parallel(parallel, seed=1)
        model_cfg = resolve_model(ModelConfig(preset="deepseek_v3", mtp_num_layers=1, mtp_loss_scale=scale))
        tm = build_training_model(model_cfg, parallel, OptimizerConfig(lr=0.0), total_steps=1)
        res = lm_train_step(tm, tokens, micro_batch_size=2)
        grads = {n: p.main_grad.float().norm().item() for n, p in tm.ddp.module.named_parameters()}
        results[str(scale)] = {
            "loss": res.loss,
            "mtp_grad": sum(v for n, v in grads.items() if n.startswith("mtp.")),
            "mtp_params": sum(1 for n in grads if n.startswith("mtp.")),
            "embedding_grad": grads["embedding.word_embeddings.weight"],
        }
        if scale > 0:
            tm.module.train()
            positions = torch.arange(16).unsqueeze(0).expand(2, 16)
            try:
                tm.module(tokens[:, :-1], positions, None)
                results["no_labels_error"] = None
            except MTPLossUnavailable as e:
                results["no_labels_error"] = str(e)
            from r1mega.models.routing_replay import RoutingReplay, moe_layer_numbers

            results["replay_layers"] = [RoutingReplay(tm.module, tm.config).num_moe_layers,
                                        len(moe_layer_numbers(tm.config))]
    json.dump(results, open(spec["out"], "w"))
    shutdown()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
