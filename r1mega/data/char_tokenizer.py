"""A character-level tokenizer over a fixed alphabet: no files, no training, fully deterministic.

Used by the synthetic tasks of the CPU demo and tests, where a learned subword vocabulary would only
add set-up time. Ids 0..2 are reserved: pad, bos, eos.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PAD, BOS, EOS = 0, 1, 2


@dataclass
class CharTokenizer:
    alphabet: str
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self):
        if len(set(self.alphabet)) != len(self.alphabet):
            raise ValueError(f"alphabet {self.alphabet!r} repeats characters")
        self._index = {c: i + 3 for i, c in enumerate(self.alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 3

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the tokenizer alphabet {self.alphabet!r}") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.alphabet[i - 3] for i in ids if i >= 3)
