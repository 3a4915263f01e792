"""Worker for test_cpu_emulation: the collectives of a one-process job, on 2 OpenMP threads."""

import json
import os
import sys

from r1mega.platform import cpu_emulation

cpu_emulation.install()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def gloo_threads() -> int:
    """Threads named after gloo's run loop: its workers, and any OpenMP pool one of them started."""
    return sum(open(f"/proc/self/task/{t}/comm").read().strip() == "pt_gloo_runloop"
               for t in os.listdir("/proc/self/task"))


torch.set_num_threads(2)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}", rank=0, world_size=1)
torch.ones(1 << 20).add_(1)  # the main thread's OpenMP pool exists before the count
before = gloo_threads()
big = torch.randn(1 << 20)
out = {}
got = torch.empty_like(big)
dist.all_gather_into_tensor(got, big)
out["all_gather_into_tensor"] = torch.equal(got, big)
got = torch.empty_like(big)
dist.reduce_scatter_tensor(got, big)
out["reduce_scatter_tensor"] = torch.equal(got, big)
parts = [torch.empty_like(big)]
dist.all_gather(parts, big)
out["all_gather"] = torch.equal(parts[0], big)
parts = [torch.empty_like(big)]
dist.gather(big, parts, dst=0)
out["gather"] = torch.equal(parts[0], big)
got = torch.empty_like(big)
dist.reduce_scatter(got, [big])
out["reduce_scatter"] = torch.equal(got, big)
payload = {"blob": bytes(range(256)) * 4096}  # 1 MiB pickled: torch gathers it as a byte tensor
objs = [None]
dist.all_gather_object(objs, payload)
out["all_gather_object"] = objs[0] == payload
objs = [None]
dist.gather_object(payload, objs, dst=0)
out["gather_object"] = objs[0] == payload
out["new_gloo_threads"] = gloo_threads() - before
dist.destroy_process_group()
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
