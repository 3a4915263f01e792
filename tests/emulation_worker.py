"""Worker for test_cpu_emulation: exercises the emulated gloo collectives on 2 ranks."""

import json
import os
import sys

from r1mega.platform import cpu_emulation

cpu_emulation.install()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
                        rank=int(os.environ["RANK"]), world_size=2)
rank = dist.get_rank()
out = {}

# uneven all_gather: rank r contributes r+1 rows filled with r
parts = [torch.empty(n + 1, 2) for n in range(2)]
dist.all_gather(parts, torch.full((rank + 1, 2), float(rank)))
out["all_gather"] = [p.tolist() for p in parts]

# uneven all_to_all_single: rank r sends (r+1)*(peer+1) rows of value 10*r+peer to peer
send_sizes = [(rank + 1) * (p + 1) for p in range(2)]
recv_sizes = [(p + 1) * (rank + 1) for p in range(2)]
inp = torch.cat([torch.full((n, 1), 10.0 * rank + p) for p, n in enumerate(send_sizes)])
res = torch.empty(sum(recv_sizes), 1)
dist.all_to_all_single(res, inp, recv_sizes, send_sizes)
out["all_to_all"] = res.flatten().tolist()

# reduce_scatter with a list (gloo has none natively)
target = torch.empty(2)
dist.reduce_scatter(target, [torch.tensor([1.0, 2.0]) * (rank + 1), torch.tensor([3.0, 4.0]) * (rank + 1)])
out["reduce_scatter"] = target.tolist()

# flat all_gather_into_tensor and reduce_scatter_tensor (megatron's grad/param buffers), inside a
# coalescing manager as megatron issues them
buf = torch.zeros(4)
shard = torch.tensor([1.0, 2.0]) + 10 * rank
grads = torch.arange(4.0) * (rank + 1)
mine = torch.empty(2)
with dist._coalescing_manager(None, async_ops=True) as cm:
    dist.all_gather_into_tensor(buf, shard)
    dist.reduce_scatter_tensor(mine, grads)
cm.wait()
out["all_gather_into_tensor"] = buf.tolist()
out["reduce_scatter_tensor"] = mine.tolist()

# CUDA-placed allocations land on the CPU; .type() reports a "CUDA" tensor as megatron expects
t = torch.empty(3, device="cuda")
out["device"] = str(t.device)
out["type"] = t.type()
out["current_device"] = str(torch.cuda.current_device())

# every tensor-placing function and method (found from the ATen schemas), a CUDA device in any form
placed = {
    "zeros_like": torch.zeros_like(t, device="cuda:0"),
    "arange": torch.arange(4, device=torch.device("cuda")),
    "randn": torch.randn(2, device=0),
    "tensor": torch.tensor([1.0], device="cuda"),
    "full": torch.full((2,), 1.0, device="cuda", pin_memory=True),
    "new_zeros": t.new_zeros(2, device="cuda"),
    "new_tensor": t.new_tensor([1.0], device="cuda"),
    "to": t.to("cuda"),
    "to_device_kw": t.to(device="cuda", dtype=torch.float64),
    "cuda": t.cuda(),
    "module_cuda": next(torch.nn.Linear(2, 2).cuda().parameters()),
    "module_to": next(torch.nn.Linear(2, 2).to("cuda").parameters()),
}
out["placed"] = {k: str(v.device) for k, v in placed.items()}
# a device context still places the factories it wraps (transformers builds models under the meta device)
with torch.device("meta"):
    out["meta_context"] = sorted({str(x.device) for x in (torch.tensor([1.0]), torch.zeros(2), torch.arange(3),
                                                          torch.nn.Linear(2, 2).weight)})
# ...without a torch-function mode, whose Python hook every other torch call would pay
out["function_modes"] = torch._C._len_torch_function_stack()
out["to_dtype"] = str(t.to(torch.float16).dtype)
out["type_cast"] = t.type(torch.float64).type()


def fused(x):
    return x * 2


# torch.compile hands functions back as they are (megatron's jit_fuser), in both of its call forms, and
# importing megatron through r1mega loads neither dynamo nor inductor (about 1.3 s of every rank's start)
import r1mega.models  # noqa: E402,F401

out["compile_eager"] = [torch.compile(fused) is fused, torch.compile(mode="max-autotune-no-cudagraphs")(fused) is fused]
out["compilers_imported"] = sorted(m for m in ("torch._dynamo", "torch._inductor") if m in sys.modules)

with open(sys.argv[1] + f".{rank}", "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
