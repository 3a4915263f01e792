"""One rank of tests/test_resilience.py's two-process check: a stop signal received by one rank and
a rollout failure on one rank's engine both reach every rank at the same step (no rank left waiting)."""

from __future__ import annotations

import json
import os
import signal
import sys


def main(out_dir: str) -> None:
    import torch.distributed as dist

    from r1mega.platform.distributed import init_process_group
    from r1mega.train.resilience import StopSignal
    from r1mega.train.weight_sync import RolloutFailure, raise_any

    env = init_process_group(timeout_minutes=1)
    result = {}
    with StopSignal() as stop:
        result["before"] = stop.agreed()
        if env.rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        result["after"] = stop.agreed()
    result["handler_restored"] = signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL

    try:  # rank 0's engine failed; rank 1's did not
        raise_any("grpo step 7: rollout engine 0 failed in generate: boom" if env.rank == 0 else None)
        result["failure"] = None
    except RolloutFailure as e:
        result["failure"] = str(e)
    raise_any(None)  # the group is still usable
    result["next"] = "fine"
    with open(os.path.join(out_dir, f"rank{env.rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
