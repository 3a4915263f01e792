"""Train small tokenizers offline (tests, the demo): sentencepiece BPE and an HF byte-level BPE.

Both keep the R1 tags (``<think>`` ...) as single tokens and round-trip any text exactly:
sentencepiece with identity normalisation and byte fallback, the HF one at the byte level.
``tools/train_tokenizer.py`` is the command-line front end.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Union

from r1mega.data.synthetic import addition_problems, arithmetic_problems, countdown_problems

PathLike = Union[str, os.PathLike]
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3 in both kinds
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def demo_corpus(lines: int = 500, seed: int = 0) -> list[str]:
    """R1-formatted text about the synthetic tasks, plus some prose and unicode, for training tests."""
    rng = random.Random(seed)
    math = arithmetic_problems(lines, 3, seed) + addition_problems(lines, 2, seed + 1)
    count = countdown_problems(max(1, lines // 4), seed + 2)
    words = ("first", "add", "the", "digits", "carry", "one", "then", "multiply", "so", "result", "is",
             "check", "again", "wait", "answer", "numbers", "target", "try", "subtract")
    out = []
    for i in range(lines):
        if i % 5 == 4:
            c = count[i % len(count)]
            out.append(f"{c.prompt} <think> {' '.join(rng.choices(words, k=8))} </think> <answer> {c.answer} "
                       f"</answer>")
        else:
            p = math[i % len(math)]
            out.append(f"{p.prompt} <think> {' '.join(rng.choices(words, k=10))} </think> <answer> {p.answer} "
                       f"</answer>")
    out += ["Ünïcödé text: 数学 答案 — π ≈ 3.14159, naïve café.", "\\boxed{\\frac{1}{2}} and $x^2$"]
    return out


def _lines(text: Union[Iterable[str], PathLike]) -> Iterator[str]:
    if isinstance(text, (str, os.PathLike)):
        with open(text, encoding="utf-8") as f:
            yield from (line.rstrip("\n") for line in f if line.strip())
    else:
        yield from (line for line in text if line.strip())


def train_sentencepiece(text: Union[Iterable[str], PathLike], out_prefix: PathLike, vocab_size: int = 512,
                        model_type: str = "bpe") -> Path:
    """Train ``<out_prefix>.model``; returns its path."""
    import sentencepiece as spm

    out = Path(out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(text), model_prefix=str(out), vocab_size=vocab_size, model_type=model_type,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, user_defined_symbols=list(TAGS),
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        split_digits=True, byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False,
        minloglevel=2, num_threads=1,
    )
    return out.with_suffix(".model") if out.suffix != ".model" else out


def train_hf_bpe(text: Union[Iterable[str], PathLike], out_path: PathLike, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE ``tokenizer.json`` (plus ``tokenizer_config.json`` beside it)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(out_path)
    if out.suffix != ".json":
        out = out / "tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS) + list(TAGS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_lines(text), trainer=trainer)
    tok.save(str(out))
    (out.parent / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=1))
    return out
