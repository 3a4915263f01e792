"""Grouped-GEMM experts (r1mega.models.grouped_experts) equal megatron's SequentialMLP."""

from __future__ import annotations

import pytest
import torch


def local_expert_spec() -> tuple[type, object]:
    """``(SequentialMLP class, MLPSubmodules)`` of megatron's local spec, on every supported version.

    0.16 returns the pair from ``LocalSpecProvider.grouped_mlp_modules(grouped_gemm, fp8)``; 0.19
    takes one argument and returns ``functools.partial(SequentialMLP, submodules=...)``.
    """
    import functools
    import inspect

    from megatron.core.models.backends import LocalSpecProvider

    provider = LocalSpecProvider()
    n_args = len(inspect.signature(provider.grouped_mlp_modules).parameters)
    built = provider.grouped_mlp_modules(*([False] * n_args))
    if isinstance(built, functools.partial):
        return built.func, built.keywords["submodules"]
    return built


def _expert_modules(num_experts=4, hidden=64, ffn=32):
    import torch.nn.functional as F

    from r1mega.models.grouped_experts import GroupedSequentialMLP

    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=4, num_moe_experts=num_experts,
                            moe_ffn_hidden_size=ffn, ffn_hidden_size=2 * ffn, gated_linear_unit=True,
                            activation_func=F.silu, add_bias_linear=False, bias_activation_fusion=False,
                            gradient_accumulation_fusion=False, moe_router_topk=2)
    cls, submodules = local_expert_spec()
    pgs = get_default_pg_collection()
    torch.manual_seed(0)
    seq = cls(num_experts, cfg, submodules, pg_collection=pgs)
    grouped = GroupedSequentialMLP(num_experts, cfg, submodules, pg_collection=pgs)
    grouped.load_state_dict(seq.state_dict())
    return seq, grouped


@pytest.mark.parametrize("counts", [[5, 0, 9, 2], [0, 0, 16, 0], [4, 4, 4, 4], [0, 0, 0, 0]])
def test_values_and_gradients_equal_sequential_mlp(single_process_megatron, counts):
    seq, grouped = _expert_modules()
    assert type(seq).__name__ == "SequentialMLP"
    assert [n for n, _ in seq.named_parameters()] == [n for n, _ in grouped.named_parameters()]
    g = torch.Generator().manual_seed(sum(counts) + 1)
    tokens = sum(counts)
    x = torch.randn(tokens, 64, generator=g)
    probs = torch.rand(tokens, generator=g)
    tpe = torch.tensor(counts)
    grad_out = torch.randn(tokens, 64, generator=g)
    results = []
    for module in (seq, grouped):
        xi, pi = x.clone().requires_grad_(), probs.clone().requires_grad_()
        out, bias = module(xi, tpe, pi)
        assert bias is None
        out.backward(grad_out)
        grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                 for n, p in module.named_parameters()}
        results.append((out.detach(), xi.grad, pi.grad, grads))
    (o1, x1, p1, g1), (o2, x2, p2, g2) = results
    assert torch.equal(o1, o2)
    assert torch.equal(x1, x2)
    assert torch.equal(p1, p2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name
    # an expert without tokens gets an exactly-zero gradient in both
    for e, c in enumerate(counts):
        if c == 0:
            assert not g2[f"local_experts.{e}.linear_fc1.weight"].any()


def test_unaligned_sizes_fall_back_to_the_loop(single_process_megatron):
    seq, grouped = _expert_modules(num_experts=3, hidden=64, ffn=6)  # 6 floats = 24 bytes per row
    x, tpe, probs = torch.randn(7, 64), torch.tensor([3, 0, 4]), torch.rand(7)
    assert grouped._fallback_reason(x) is not None
    assert torch.equal(seq(x, tpe, probs)[0], grouped(x, tpe, probs)[0])


def test_flag_swaps_experts_in_the_local_spec_only(single_process_megatron):
    from r1mega.models.grouped_experts import GroupedSequentialMLP
    from r1mega.models.layer_spec import build_block_spec

    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_moe_experts=4,
                            normalization="RMSNorm", moe_layer_freq=[0, 1])
    plain = build_block_spec(cfg, use_te=False).layer_specs[1].submodules.mlp.submodules.experts
    grouped = build_block_spec(cfg, use_te=False, grouped_experts=True).layer_specs[1].submodules.mlp.submodules
    assert plain.module is SequentialMLP
    assert grouped.experts.module is GroupedSequentialMLP


@pytest.mark.timeout(240)
def test_ep2_and_tp2_parity_and_equal_to_sequential_run():
    from r1mega.config.schema import ModelConfig
    from r1mega.train.parallel_check import CheckSpec, Layout, check_layouts, compare, format_table, run_layout

    spec = CheckSpec(model=ModelConfig(preset="qwen3_moe", moe_grouped_experts=True))
    grouped_ref = run_layout(spec, Layout(), timeout_s=120)
    reports = check_layouts(spec, [Layout.parse("ep2"), Layout.parse("tp2")], timeout_s=120, reference=grouped_ref)
    print(format_table("qwen3_moe tiny, grouped experts", reports))
    for r in reports[1:]:
        assert r.max_rel_err < 1e-3, r
    # the same (single-process) layout with megatron's SequentialMLP: same losses, gradients and updates
    sequential = run_layout(CheckSpec(model=ModelConfig(preset="qwen3_moe", moe_grouped_experts=False)), Layout(),
                            timeout_s=120)
    assert compare(sequential, grouped_ref) == (0.0, 0.0, 0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_experts_match_sequential_on_gpu(single_process_megatron):
    """bf16 on a GPU: torch._grouped_mm (cuBLAS grouped GEMM) vs the per-expert loop."""
    seq, grouped = _expert_modules(num_experts=8, hidden=256, ffn=128)
    seq, grouped = seq.cuda().bfloat16(), grouped.cuda().bfloat16()
    counts = torch.tensor([64, 0, 200, 8, 16, 0, 96, 128])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(int(counts.sum()), 256, generator=g).cuda().bfloat16()
    probs = torch.rand(int(counts.sum()), generator=g).cuda().bfloat16()
    grad_out = torch.randn_like(x)
    outs = []
    for module in (seq, grouped):
        xi = x.clone().requires_grad_()
        out, _ = module(xi, counts, probs)
        out.backward(grad_out)
        outs.append((out.float(), xi.grad.float(), module.local_experts[2].linear_fc1.weight.grad.float()))
    assert grouped._fallback_reason(x) is None
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
