"""Rank program for the conversion tests (run through ``r1mega.platform.spawn.spawn_ranks``).

    python tests/convert_worker.py <json spec>

``mode``:
* ``fp8``: a transformers-made DeepSeek-V3 ``src`` -> ``from_hf`` -> ``to_hf --fp8`` (``fp8``) ->
  ``from_hf`` -> ``to_hf`` (``back``); then ``fp8_rect`` (written by the test with rectangular tiles)
  -> ``from_hf`` -> ``to_hf`` (``back_rect``). The test compares ``back*`` with ``src``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fp8(spec: dict) -> None:
    from r1mega.bridge.convert import from_hf, to_hf

    root = Path(spec["root"])
    from_hf(root / "src", root / "ckpt_a")
    to_hf(root / "ckpt_a", root / "fp8", fp8=True, progress=False)
    from_hf(root / "fp8", root / "ckpt_b")
    to_hf(root / "ckpt_b", root / "back", progress=False)
    from_hf(root / "fp8_rect", root / "ckpt_c")
    to_hf(root / "ckpt_c", root / "back_rect", progress=False)


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    {"fp8": fp8}[spec["mode"]](spec)
