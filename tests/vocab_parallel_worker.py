"""Worker: TP2 chunked log-probs/entropy vs the full-vocabulary reference (argv: out [impl])."""

import json
import os
import sys

import torch
import torch.distributed as dist

from r1mega.rl.vocab_parallel import VocabShard, logprob_and_entropy, naive_logprob_and_entropy

dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
                        rank=int(os.environ["RANK"]), world_size=2)
rank = dist.get_rank()
torch.manual_seed(0)  # same full tensors on both ranks
T, H, V, VALID = 29, 12, 64, 60  # the last 4 ids are vocabulary padding
hidden = torch.randn(T, H, dtype=torch.float64)
weight = torch.randn(V, H, dtype=torch.float64)
target = torch.randint(0, VALID, (T,))
g_lp, g_ent = torch.randn(T, dtype=torch.float64), torch.randn(T, dtype=torch.float64)

ref_h, ref_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
lp_ref, ent_ref = naive_logprob_and_entropy(ref_h, ref_w, target, temperature=0.8, valid_vocab=VALID)
(lp_ref * g_lp + ent_ref * g_ent).sum().backward()

half = V // 2
h = hidden.clone().requires_grad_()
w_shard = weight[rank * half:(rank + 1) * half].clone().requires_grad_()
lp, ent = logprob_and_entropy(h, w_shard, target, VocabShard(rank * half, (rank + 1) * half, dist.group.WORLD, VALID),
                              temperature=0.8, chunk_size=8, impl=sys.argv[2] if len(sys.argv) > 2 else "auto")
(lp * g_lp + ent * g_ent).sum().backward()
grad_h = h.grad.clone()
dist.all_reduce(grad_h)  # each rank's hidden gradient is its vocabulary shard's part

err = {
    "logp": float((lp - lp_ref).abs().max()),
    "entropy": float((ent - ent_ref).abs().max()),
    "grad_hidden": float((grad_h - ref_h.grad).abs().max()),
    "grad_weight": float((w_shard.grad - ref_w.grad[rank * half:(rank + 1) * half]).abs().max()),
}
with open(f"{sys.argv[1]}.{rank}", "w") as f:
    json.dump(err, f)
dist.destroy_process_group()
# The results are written. Interpreter teardown after the torch path's distributed autograd aborts now and then
# with "terminate called without an active exception" (a native thread still joinable at exit; seen with torch
# 2.13 + gloo, also before this worker changed): leave without running native destructors.
os._exit(0)
