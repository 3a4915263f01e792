"""Every file and directory a run config names, checked before any process group starts.

A missing data file or tokenizer should cost a second and one line naming the field, the path and
what to do, not a model-parallel set-up followed by a traceback from every rank. Torch-free, like all of
``r1mega.config``; the CLI calls :func:`check_paths` right after loading the config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from r1mega.config.errors import ConfigError
from r1mega.config.schema import R1Config

SYNTHETIC_PREFIX = "synthetic:"  # data specs generated in memory (r1mega.data.tasks), not files

_DATA = "a JSONL file (or synthetic:<task> for a generated CPU set)"
_HF_DIR = "a Hugging Face model directory (config.json + safetensors)"
_CHECKPOINT = "an r1mega checkpoint (its root or a step_* directory)"


def is_synthetic(spec: str) -> bool:
    return str(spec).startswith(SYNTHETIC_PREFIX)


def _problem(field: str, path: str, kind: str, what: str) -> Optional[str]:
    """Why ``path`` (of ``field``) cannot be used as ``kind`` (file | dir | tokenizer | hf), or ``None``."""
    p = Path(path).expanduser()
    where = f"{field}={path}"
    if not p.exists():
        return f"{where} does not exist: point it at {what}"
    if kind == "file" and not p.is_file():
        return f"{where} is not a file: point it at {what}"
    if kind in ("dir", "hf") and not p.is_dir():
        return f"{where} is not a directory: point it at {what}"
    if kind == "tokenizer" and p.is_dir():
        if not (p / "tokenizer.json").is_file():
            return f"{where} has no tokenizer.json: point it at {what}"
        p = p / "tokenizer.json"
    if kind == "hf" and not (p / "config.json").is_file():
        return f"{where} has no config.json: point it at {what}"
    if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
        return f"{where} is not readable by this user: fix its permissions or copy it somewhere readable"
    return None


def _named(cfg: R1Config) -> list[tuple[str, str, str, str]]:
    """(field, path, kind, what it should be) for each path the config sets."""
    out = []
    for field, spec in (("data.train_path", cfg.data.train_path), ("data.eval_path", cfg.data.eval_path),
                        *((f"stages[{i}].data", st.data) for i, st in enumerate(cfg.stages))):
        if spec and not is_synthetic(spec):
            out.append((field, spec, "file", _DATA))
    if cfg.data.tokenizer:
        out.append(("data.tokenizer", cfg.data.tokenizer, "tokenizer",
                    "the model's tokenizer.json, its directory, or a sentencepiece .model file"))
    if cfg.checkpoint.load_dir:
        out.append(("checkpoint.load_dir", cfg.checkpoint.load_dir, "dir", _CHECKPOINT))
    if cfg.checkpoint.resume not in ("auto", "none", ""):  # anything else is a checkpoint path
        out.append(("checkpoint.resume", cfg.checkpoint.resume, "dir",
                    f"{_CHECKPOINT}, or use auto (latest in checkpoint.save_dir) or none"))
    d = cfg.distill
    if d.teacher_hf:
        out.append(("distill.teacher_hf", d.teacher_hf, "hf", _HF_DIR))
    if d.teacher_checkpoint:
        out.append(("distill.teacher_checkpoint", d.teacher_checkpoint, "dir", _CHECKPOINT))
    if d.teacher_config:
        out.append(("distill.teacher_config", d.teacher_config, "file",
                    "the recipe YAML whose model: section built the teacher"))
    for i, b in enumerate(cfg.eval.benchmarks):
        if b.path:
            out.append((f"eval.benchmarks[{i}].path", b.path, "file", "a local .jsonl or .json benchmark file"))
    for i, m in enumerate(cfg.reward.models):
        if m.path:
            out.append((f"reward.models[{i}].path", m.path, "hf",
                        _HF_DIR + (" serving the judge" if m.kind == "judge" else ", a *ForSequenceClassification")))
    return out


def path_problems(cfg: R1Config) -> list[str]:
    """One line per path the config names that is missing or unreadable, plus judges a reward term uses
    that name no model (the trainer starts each judge's engine from its path)."""
    out = [p for field, path, kind, what in _named(cfg) if (p := _problem(field, path, kind, what))]
    used = {t.name for t in cfg.reward.terms}
    out += [f"reward.models[{i}] (judge {m.name!r}) has no path: set it to the HF model directory that serves "
            f"the judge" for i, m in enumerate(cfg.reward.models)
            if m.kind == "judge" and m.name in used and not m.path]
    return out


def tokenizer_problems(cfg: R1Config) -> list[str]:
    """A training run needs ``data.tokenizer``, except a distilled student (the teacher HF directory's) and
    an all-synthetic CPU recipe (the demo's BPE is trained on the task)."""
    if cfg.data.tokenizer or (cfg.distill.teacher_hf and any(s.kind == "distill" for s in cfg.stages)):
        return []
    specs = [s.data for s in cfg.stages if s.data] + [p for p in (cfg.data.train_path, cfg.data.eval_path) if p]
    if specs and all(is_synthetic(s) for s in specs):
        return []
    real = [s for s in specs if not is_synthetic(s)]
    return ["data.tokenizer is not set: point it at the model's tokenizer (tokenizer.json or its directory); "
            "only all-synthetic CPU recipes may leave it unset" + (f" (this one reads {real[0]})" if real else "")]


def check_paths(cfg: R1Config, training: bool = False) -> None:
    """Raise ``ConfigError`` listing every unusable path (and, for a ``training`` run, a missing tokenizer)."""
    problems = path_problems(cfg) + (tokenizer_problems(cfg) if training else [])
    if problems:
        raise ConfigError(problems)
