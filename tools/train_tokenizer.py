#!/usr/bin/env python
"""Train a small tokenizer offline, for tests and the demo (no network, seconds on a laptop).

    python tools/train_tokenizer.py --kind sp --out runs/tok/sp --vocab-size 512
    python tools/train_tokenizer.py --kind hf --out runs/tok/hf --input corpus.txt

Without ``--input`` the corpus is generated from the synthetic tasks in the R1 template. Prints the
written path, the vocabulary size and a round-trip check; ``data.tokenizer`` accepts the path.
"""

from __future__ import annotations

import argparse
import sys

from r1mega.data.tokenizer import load_tokenizer
from r1mega.data.tokenizer_training import demo_corpus, train_hf_bpe, train_sentencepiece


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("sp", "hf"), required=True,
                        help="sp: sentencepiece .model; hf: Hugging Face byte-level BPE tokenizer.json")
    parser.add_argument("--out", required=True, help="sp: model prefix (writes <out>.model); hf: directory or .json")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--input", help="UTF-8 text file, one example per line (default: synthetic corpus)")
    parser.add_argument("--lines", type=int, default=2000, help="synthetic corpus size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    text = args.input if args.input else demo_corpus(args.lines, args.seed)
    if args.kind == "sp":
        path = train_sentencepiece(text, args.out, args.vocab_size)
    else:
        path = train_hf_bpe(text, args.out, args.vocab_size)
    tok = load_tokenizer(path)
    probe = "12+34= <think> add the digits </think> <answer> 46 </answer>"
    ids = tok.encode(probe)
    ok = tok.decode(ids) == probe
    print(f"{path}: vocab_size={tok.vocab_size} bos={tok.bos_id} eos={tok.eos_id} pad={tok.pad_id} "
          f"round_trip={'ok' if ok else 'FAILED'} ({len(ids)} tokens for {len(probe)} chars)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
