"""What a run reads: its tokenizer (or the demo's, trained on the task) and each stage's examples."""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from r1mega.config import ConfigError, R1Config
from r1mega.data.tasks import is_synthetic, synthetic_examples

R1_MARKERS = ("<｜User｜>", "<｜Assistant｜>")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def stage_examples(spec: str, seed: int, need_reference: bool = True):
    """A ``synthetic:<task>`` spec's training split, or a JSONL file's examples."""
    from r1mega.data.dataset import load_examples

    return synthetic_examples(spec, "train", seed) if is_synthetic(spec) else load_examples(spec, need_reference)


def build_tokenizer(out_dir: Path, examples, vocab_size: int) -> Path:
    """Train a byte-level BPE (individual digits; specials, R1 tags and chat markers atomic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from r1mega.data.tokenizer_training import SPECIALS, TAGS
    from r1mega.train.sft import r1_completion, render

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*SPECIALS, *TAGS, *R1_MARKERS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([render(e.prompt) + r1_completion(e.prompt, e.answer) for e in examples], trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=1))
    return out_dir


def run_tokenizer(cfg: R1Config, out: Path):
    """``(tokenizer, its directory)``: ``data.tokenizer`` (a distilled student: its teacher's); for an
    all-synthetic CPU recipe without one, a BPE trained on the task (kept in ``<out>/tokenizer``, so a
    resumed run reuses it)."""
    from r1mega.config.paths import tokenizer_problems
    from r1mega.data.tokenizer import HFTokenizer, load_tokenizer

    teacher_hf = cfg.distill.teacher_hf if any(s.kind == "distill" for s in cfg.stages) else None
    if cfg.data.tokenizer or teacher_hf:
        tok_path = Path(cfg.data.tokenizer or teacher_hf)
        return load_tokenizer(tok_path), (tok_path if tok_path.is_dir() else tok_path.parent)
    if problems := tokenizer_problems(cfg):
        raise ConfigError(problems)
    specs = [s.data for s in cfg.stages if s.data] + [p for p in (cfg.data.train_path, cfg.data.eval_path) if p]
    tok_dir = out / "tokenizer"
    if _rank() == 0 and not (tok_dir / "tokenizer.json").is_file():
        build_tokenizer(tok_dir, stage_examples(specs[0], cfg.data.seed), cfg.model.vocab_size)
    if dist.is_initialized():
        dist.barrier()
    tok = HFTokenizer(tok_dir)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}: "
                          f"raise model.vocab_size")
    return tok, tok_dir
