"""Resumable teacher generation: an interrupted run keeps what it wrote and continues from there.

Prompts are generated in fixed chunks of ``chunk_prompts`` (prompt ``i`` always belongs to chunk
``i // chunk_prompts``). Each finished chunk is appended to ``generations.jsonl`` (one record per
prompt: its index, prompt ids and the k generations with their token ids and top-k log-probs), fsynced,
and only then counted in ``manifest.json`` (written to a temp file and renamed), which also records the
committed byte size of the shard. A rerun truncates anything past that size (a chunk cut off by a
kill) and starts at the first uncommitted chunk. Prompt ``i`` samples with seed ``rollout.seed + i``
and every chunk is the same batch whether or not the run was interrupted, so interrupted + rerun
writes byte-identical records to an uninterrupted run, with no duplicates. The manifest also stores
the settings that determine the samples; a rerun with different ones is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional

SHARD = "generations.jsonl"
MANIFEST = "manifest.json"


class GenerationPaused(RuntimeError):
    """Generation stopped early on purpose (``distill.max_chunks``); rerunning the same command continues it."""


def prompts_digest(prompt_ids: Sequence[Sequence[int]]) -> str:
    """Identifies the prompt list (a changed data set or template must not resume an old shard)."""
    h = hashlib.sha256()
    for ids in prompt_ids:
        h.update(json.dumps(list(ids)).encode() + b"\n")
    return h.hexdigest()[:16]


class GenerationStore:
    """``<root>/generations.jsonl`` + ``<root>/manifest.json``; see the module docstring."""

    def __init__(self, root: Path, settings: dict):
        self.root, self.settings = Path(root), json.loads(json.dumps(settings))
        self.shard, self.manifest = self.root / SHARD, self.root / MANIFEST
        self.chunks_done, self.bytes = 0, 0

    def open(self) -> int:
        """Check the settings of an earlier run, drop an uncommitted tail; returns the committed chunks."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.manifest.exists():
            m = json.loads(self.manifest.read_text())
            if m["settings"] != self.settings:
                diff = sorted(k for k in set(m["settings"]) | set(self.settings)
                              if m["settings"].get(k) != self.settings.get(k))
                raise ValueError(f"{self.root} holds generations made with other settings (differing: {diff}): "
                                 f"restore those settings to resume, or delete {self.root} to start over")
            self.chunks_done, self.bytes = m["chunks_done"], m["bytes"]
        size = self.shard.stat().st_size if self.shard.exists() else 0
        if size < self.bytes:
            raise ValueError(f"{self.shard} has {size} bytes but {self.manifest} committed {self.bytes}: the shard "
                             f"was truncated or replaced; delete {self.root} to regenerate")
        if size > self.bytes:  # a chunk that was being written when the run stopped
            with open(self.shard, "r+b") as f:
                f.truncate(self.bytes)
        return self.chunks_done

    def commit(self, records: Sequence[dict]) -> None:
        """Append one chunk's records durably, then count it in the manifest (atomic rename)."""
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
        with open(self.shard, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.chunks_done += 1
        self.bytes += len(data)
        tmp = self.manifest.with_name(MANIFEST + ".tmp")
        tmp.write_text(json.dumps({"settings": self.settings, "chunks_done": self.chunks_done,
                                   "bytes": self.bytes}, indent=1))
        os.replace(tmp, self.manifest)

    def records(self) -> Iterator[dict]:
        with open(self.shard, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def generation_record(index: int, gens, decode: Callable[[list[int]], str], eos_id: Optional[int]) -> dict:
    """One prompt's stored record: per generation the text (EOS dropped), token ids and top-k log-probs."""
    out = []
    for g in gens:
        item = {"text": decode([t for t in g.token_ids if t != eos_id]), "token_ids": list(g.token_ids),
                "finish_reason": g.finish_reason}
        if g.top_ids is not None:
            item["teacher_top_ids"], item["teacher_top_logprobs"] = g.top_ids, g.top_logprobs
        out.append(item)
    return {"index": index, "prompt_token_ids": list(gens[0].prompt_token_ids) if gens else [], "generations": out}


def generate_resumable(engine, prompt_ids: Sequence[Sequence[int]], n: int, sampling, store: GenerationStore,
                       chunk_prompts: int, decode: Callable[[list[int]], str], eos_id: Optional[int],
                       max_chunks: int = 0) -> bool:
    """Generate the chunks ``store`` lacks (at most ``max_chunks`` this call; 0 = all); True when complete."""
    if sampling.seed is None:
        raise ValueError("resumable generation needs a fixed sampling seed: set rollout.seed (e.g. 0)")
    total = -(-len(prompt_ids) // chunk_prompts)
    new = 0
    for chunk in range(store.open(), total):
        if max_chunks and new >= max_chunks:
            return False
        start = chunk * chunk_prompts
        ids = prompt_ids[start: start + chunk_prompts]
        rows = engine.generate(ids, n, replace(sampling, seed=sampling.seed + start))  # prompt i: seed + i
        store.commit([generation_record(start + i, row, decode, eos_id) for i, row in enumerate(rows)])
        new += 1
    return True


def store_settings(teacher: str, n: int, sampling, chunk_prompts: int, prompt_ids) -> dict:
    """What determines the samples (a manifest with other values is not resumed)."""
    return {"teacher": teacher, "samples_per_prompt": n, "sampling": asdict(sampling),
            "chunk_prompts": chunk_prompts, "prompts": len(prompt_ids), "prompts_digest": prompts_digest(prompt_ids)}
