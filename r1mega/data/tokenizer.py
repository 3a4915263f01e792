"""Tokenizers from a sentencepiece model file or a Hugging Face ``tokenizer.json``, behind one interface.

``load_tokenizer(path)`` picks the kind from the path: ``*.model`` -> sentencepiece; ``*.json`` or
a directory holding ``tokenizer.json`` -> HF ``tokenizers`` (special tokens from a sibling
``tokenizer_config.json`` when present, else common names such as ``<s>``/``</s>``/``<pad>``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Protocol, Union

PathLike = Union[str, os.PathLike]

_BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>", "<｜begin▁of▁sentence｜>", "<|startoftext|>")
_EOS_NAMES = ("</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>", "<｜end▁of▁sentence｜>", "<|im_end|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: Optional[int]
    eos_id: int
    pad_id: int

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_to_id(self, token: str) -> Optional[int]: ...


def _with_specials(ids: list[int], bos: Optional[int], eos: Optional[int], add_bos: bool, add_eos: bool) -> list[int]:
    if add_bos and bos is not None:
        ids = [bos] + ids
    if add_eos and eos is not None:
        ids = ids + [eos]
    return ids


class SentencePieceTokenizer:
    """A sentencepiece ``.model``; pad falls back to eos when the model defines none."""

    def __init__(self, path: PathLike):
        import sentencepiece as spm

        self.path = str(path)
        self._sp = spm.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        eos = self._sp.eos_id()
        if eos < 0:
            raise ValueError(f"{path}: the sentencepiece model has no eos token; train it with eos_id >= 0")
        self.eos_id = eos
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else eos

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return _with_specials(self._sp.encode(text), self.bos_id, self.eos_id, add_bos, add_eos)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> Optional[int]:
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i


class HFTokenizer:
    """A Hugging Face ``tokenizers`` ``tokenizer.json`` (BPE, Unigram, WordPiece...)."""

    def __init__(self, path: PathLike, bos: Optional[str] = None, eos: Optional[str] = None,
                 pad: Optional[str] = None):
        from tokenizers import Tokenizer as _HF

        file = Path(path)
        if file.is_dir():
            file = file / "tokenizer.json"
        self.path = str(file)
        self._tok = _HF.from_file(self.path)
        config = _special_tokens_from_config(file.parent / "tokenizer_config.json")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._find(bos or config.get("bos_token"), _BOS_NAMES)
        eos_id = self._find(eos or config.get("eos_token"), _EOS_NAMES)
        if eos_id is None:
            raise ValueError(f"{self.path}: no end-of-sequence token found (tried {_EOS_NAMES}); "
                             f"pass eos= or add a tokenizer_config.json with 'eos_token'")
        self.eos_id = eos_id
        pad_id = self._find(pad or config.get("pad_token"), _PAD_NAMES)
        self.pad_id = pad_id if pad_id is not None else eos_id

    def _find(self, name: Optional[str], fallbacks: tuple[str, ...]) -> Optional[int]:
        for candidate in ((name,) if name else fallbacks):
            i = self._tok.token_to_id(candidate)
            if i is not None:
                return i
        return None

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return _with_specials(ids, self.bos_id, self.eos_id, add_bos, add_eos)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)


def _special_tokens_from_config(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    config = json.loads(path.read_text(encoding="utf-8"))
    out = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        value = config.get(key)
        if isinstance(value, dict):  # {"content": "<s>", ...}
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def load_tokenizer(path: PathLike) -> Tokenizer:
    """A tokenizer for ``path`` (``data.tokenizer``): sentencepiece ``.model`` or HF ``tokenizer.json``."""
    file = Path(path)
    if file.is_dir() and (file / "tokenizer.json").is_file():
        return HFTokenizer(file)
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer {str(path)!r} not found: give a sentencepiece .model file, a "
                                f"tokenizer.json, or a directory holding tokenizer.json")
    if file.suffix == ".json":
        return HFTokenizer(file)
    if file.suffix == ".model":
        return SentencePieceTokenizer(file)
    raise ValueError(f"tokenizer {str(path)!r}: unknown kind; expected *.model (sentencepiece) or *.json "
                     f"(Hugging Face tokenizers)")
