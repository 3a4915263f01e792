"""Worker for test_context_parallel: SDPAttention under cp2 (padded rows and packed THD segments) against
one-process attention on the full sequences: outputs and dQ/dK/dV on this rank's positions.

argv: a JSON spec {"out": path, "break_reduce": bool}. ``break_reduce`` replaces the K/V gather's backward
by a plain split (no reduce-scatter over CP), as megatron's ``gather`` backward would do: the test must
then see wrong dK/dV.
"""

import json
import os
import sys

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import r1mega.models  # noqa: F401  (readies megatron for this machine)
from r1mega.models import context_parallel  # noqa: E402
from r1mega.models.local_layers import SDPAttention  # noqa: E402

from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

spec = json.loads(sys.argv[1])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
                        rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
rank, cp = dist.get_rank(), dist.get_world_size()
group = dist.new_group(list(range(cp)))

if spec["break_reduce"]:
    def split_only(ctx, grad):
        size = dist.get_world_size(ctx.group)
        return grad.chunk(size)[dist.get_rank(ctx.group)].contiguous(), None

    context_parallel.GatherFromContextParallel.backward = staticmethod(split_only)


class _PG:
    class tp:
        @staticmethod
        def size():
            return 1

    cp = group


def attention(cp_size: int, keep_gathered: bool = False) -> SDPAttention:
    """``keep_gathered``: megatron's recompute is on, so the CP core keeps its gathered K/V (no checkpoint)."""
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=8,
                               attention_dropout=0.0, context_parallel_size=cp_size,
                               recompute_granularity="selective" if keep_gathered else None)
    return SDPAttention(config, 1, AttnMaskType.causal, "self", pg_collection=_PG)


results = {}
for case, bounds, keep in (("padded", [0, 16], False), ("packed", [0, 8, 12, 20, 24], False),
                           ("packed, K/V kept", [0, 8, 12, 20, 24], True)):
    total = bounds[-1]
    gen = torch.Generator().manual_seed(3)
    b = 2 if case == "padded" else 1
    case_packed = case != "padded"
    q, k, v = torch.randn(total, b, 4, 8, generator=gen), torch.randn(total, b, 2, 8, generator=gen), \
        torch.randn(total, b, 2, 8, generator=gen)
    g = torch.randn(total, b, 32, generator=gen)
    if case_packed:  # thd: [t, h, d]
        q, k, v, g = q[:, 0], k[:, 0], v[:, 0], g[:, 0]
    cu = torch.tensor(bounds, dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=8, max_seqlen_kv=8) \
        if case_packed else None
    # one process: the full sequences
    ref = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    ref_out = attention(1)(*ref, None, packed_seq_params=params)
    ref_out.backward(g)
    # cp ranks: this rank's positions, fed the same upstream gradient as the reference on them
    idx = context_parallel.token_index(bounds, cp, rank)
    mine = [x[idx].detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = attention(cp, keep)(*mine, None, packed_seq_params=params)
    out.backward(g[idx])
    results[case] = {
        "out": float((out - ref_out[idx]).abs().max()),
        "dq": float((mine[0].grad - ref[0].grad[idx]).abs().max()),
        "dk": float((mine[1].grad - ref[1].grad[idx]).abs().max()),
        "dv": float((mine[2].grad - ref[2].grad[idx]).abs().max()),
        "scale": float(ref[1].grad.abs().max()),
    }

if rank == 0:
    with open(spec["out"], "w") as f:
        json.dump(results, f)
dist.destroy_process_group()
