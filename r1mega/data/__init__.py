"""Datasets, tokenizers, chat templates and synthetic verifiable tasks.

Submodules import lazily-heavy libraries (sentencepiece, tokenizers) only when used, so importing
``r1mega.data`` stays cheap.
"""

from r1mega.data.dataset import Example, PromptDataset, example_from_record, iter_examples, load_examples
from r1mega.data.jsonl import DataError, read_jsonl, write_jsonl
from r1mega.data.templates import TEMPLATES, ChatTemplate, get_template, render_prompt
from r1mega.data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "TEMPLATES",
    "ChatTemplate",
    "DataError",
    "Example",
    "HFTokenizer",
    "PromptDataset",
    "SentencePieceTokenizer",
    "Tokenizer",
    "example_from_record",
    "get_template",
    "iter_examples",
    "load_examples",
    "load_tokenizer",
    "read_jsonl",
    "render_prompt",
    "write_jsonl",
]
