"""Tokenizers: both kinds are trained offline into tmp_path (the tool's code) and round-trip exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from r1mega.data import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from r1mega.data.tokenizer_training import TAGS, demo_corpus, train_hf_bpe, train_sentencepiece

REPO = Path(__file__).resolve().parents[1]
TEXTS = [
    "12+34= <think> add the digits </think> <answer> 46 </answer>",
    "  leading spaces,\ttabs\nand newlines\n\n",
    "Ünïcödé: 数学 答案 — π ≈ 3.14159; emoji 🙂 outside the training corpus ∮",
    "\\boxed{\\frac{1}{2}} <｜User｜>hi<｜Assistant｜><think>\n",
    "",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    corpus = demo_corpus(300, seed=1)
    return {"sp": train_sentencepiece(corpus, root / "sp", vocab_size=400),
            "hf": train_hf_bpe(corpus, root / "hf", vocab_size=400)}


@pytest.mark.parametrize("kind", ["sp", "hf"])
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(trained, kind, text):
    tok = load_tokenizer(trained[kind])
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("kind,cls", [("sp", SentencePieceTokenizer), ("hf", HFTokenizer)])
def test_specials_and_tags(trained, kind, cls):
    tok = load_tokenizer(trained[kind])
    assert isinstance(tok, cls)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    ids = tok.encode("1+1", add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    for tag in TAGS:  # each R1 tag is one token
        assert tok.encode(tag) == [tok.token_to_id(tag)]
    assert tok.token_to_id("definitely-not-a-token") is None
    assert len(tok.encode(TEXTS[0])) < len(TEXTS[0]) / 2  # it learned merges, not characters


def test_hf_directory_and_config(trained, tmp_path):
    directory = trained["hf"].parent
    assert isinstance(load_tokenizer(directory), HFTokenizer)
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</think>"}}))
    assert load_tokenizer(directory).eos_id == load_tokenizer(directory).token_to_id("</think>")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ValueError, match="unknown kind"):
        load_tokenizer(tmp_path / "vocab.txt")


@pytest.mark.timeout(120)
def test_train_tokenizer_tool(tmp_path):
    for kind, out in (("sp", tmp_path / "tool_sp"), ("hf", tmp_path / "tool_hf")):
        done = subprocess.run([sys.executable, str(REPO / "tools" / "train_tokenizer.py"), "--kind", kind,
                               "--out", str(out), "--lines", "200", "--vocab-size", "400"],
                              capture_output=True, text=True, timeout=100)
        assert done.returncode == 0, done.stderr
        assert "round_trip=ok" in done.stdout
