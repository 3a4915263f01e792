"""Ahead-of-time build of the C++ (and, with CUDA, the CUDA) ops: ``python -m r1mega.kernels.build``.

Exit status 0 when the ops built and loaded, 1 otherwise (with the compiler's reason); the
extension cache then serves every later process without compiling.
"""

from __future__ import annotations

import sys
import time

from r1mega.kernels.extension import load_ops


def main() -> int:
    t0 = time.monotonic()
    state = load_ops(verbose="-v" in sys.argv)
    if state["available"]:
        kind = "C++ + CUDA" if state["cuda"] else "C++ (CPU)"
        print(f"r1mega kernels: {kind} ops ready ({time.monotonic() - t0:.1f} s)")
        return 0
    print(f"r1mega kernels: not built, the pure-torch fallback will run ({state['error']})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
