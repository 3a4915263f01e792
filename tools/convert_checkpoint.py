"""Convert checkpoints between r1mega (megatron dist checkpoint) and Hugging Face format.

    python tools/convert_checkpoint.py to-hf --ckpt runs/x/ckpt --out hf_out [--tokenizer DIR] [--fp8]
    python tools/convert_checkpoint.py from-hf --hf hf_dir --out runs/y/ckpt [--precision bf16] [--tp 2 --pp 2 --ep 2]

Same as ``r1mega convert ...``. ``to-hf`` runs on one process for a checkpoint of any layout;
``from-hf`` writes a weights-only checkpoint that loads in any layout (one process suffices; under
``torchrun --nproc-per-node N`` its shards are written in that layout, by N processes).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from r1mega.cli import main as cli_main

    return cli_main(["convert", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
