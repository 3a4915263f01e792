"""Padding-free packing: same loss and gradients as padded micro-batches, under parallel layouts."""

from __future__ import annotations

import pytest
import torch

from r1mega.config.schema import ModelConfig
from r1mega.train.parallel_check import CheckSpec, Layout, compare, run_layout

TIMEOUT_S = 240


def test_pack_micro_batch_layout():
    from r1mega.rl.learner import LearnerBatch, pack_micro_batch

    tokens = torch.tensor([[5, 6, 7, 8, 0], [9, 10, 11, 0, 0]])
    mask = torch.tensor([[0.0, 1, 1, 0], [0, 1, 0, 0]])
    batch = LearnerBatch(tokens, mask, advantages=torch.tensor([1.0, -2.0]), lengths=torch.tensor([4, 3]))
    packed = pack_micro_batch(batch, mask * 0.5, multiple=4)
    # predicted positions: 3 for row 0, 2 for row 1 -> 5 tokens, padded to 8
    assert packed.inputs.tolist() == [[5, 6, 7, 9, 10, 0, 0, 0]]
    assert packed.batch.tokens[0, 1:6].tolist() == [6, 7, 8, 10, 11]  # labels
    assert packed.positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 0]]
    assert packed.params.cu_seqlens_q.tolist() == [0, 3, 5, 8]
    assert packed.batch.loss_mask.tolist() == [[0, 1, 1, 0, 1, 0, 0, 0]]
    assert packed.weights.tolist() == [[0, 0.5, 0.5, 0, 0.5, 0, 0, 0]]
    assert packed.batch.token_advantages.tolist() == [[1, 1, 1, -2, -2, 0, 0, 0]]


@pytest.mark.timeout(600)
def test_packed_grpo_matches_padded_under_layouts():
    # Padding tokens pass the router in the padded path; without aux loss they do not change gradients.
    model = ModelConfig(preset="qwen3_moe", moe_aux_loss_coeff=0.0)
    padded = run_layout(CheckSpec(model=model, objective="grpo"), Layout(), TIMEOUT_S)
    for layout in ["1", "tp2", "pp2"]:
        packed = run_layout(CheckSpec(model=model, objective="grpo", pack=True), Layout.parse(layout), TIMEOUT_S)
        loss_err, grad_err, param_err = compare(padded, packed)
        assert loss_err < 1e-5 and grad_err < 1e-4 and param_err < 2e-3, (layout, loss_err, grad_err, param_err)


@pytest.mark.timeout(300)
def test_packed_sft_matches_padded_for_mla_under_tp2():
    # expert-bias balancing counts padding tokens in the padded path, so it is off for this comparison
    model = ModelConfig(preset="deepseek_v3", moe_aux_loss_coeff=0.0, moe_router_enable_expert_bias=False)
    padded = run_layout(CheckSpec(model=model, objective="sft"), Layout(), TIMEOUT_S)
    packed = run_layout(CheckSpec(model=model, objective="sft", pack=True), Layout.parse("tp2"), TIMEOUT_S)
    loss_err, grad_err, param_err = compare(padded, packed)
    assert loss_err < 1e-5 and grad_err < 1e-4 and param_err < 2e-3, (loss_err, grad_err, param_err)
