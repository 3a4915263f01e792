"""Streaming JSONL reading and writing whose every error names ``file:line`` and says how to fix it.

A dataset with one bad line among millions should fail at that line with a message a user can act
on, not with a bare ``JSONDecodeError`` from deep inside a data loader, hours into a run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Optional, Union

PathLike = Union[str, os.PathLike]


class DataError(ValueError):
    """A problem in a data file; ``str()`` is ``path:line: what is wrong (and how to fix it)``."""

    def __init__(self, path: PathLike, line: Optional[int], problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


def read_jsonl(path: PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for each non-blank line; raise ``DataError`` on the first bad one.

    Lines are decoded one at a time (streaming, constant memory). An empty file is an error too: a
    run that silently trains on nothing is worse than one that stops.
    """
    file = Path(path)
    if not file.is_file():
        raise DataError(path, None, "is a directory, not a JSONL file" if file.is_dir()
                        else f"file does not exist (resolved to {file.resolve()}); check the path")
    records = 0
    last = 0
    with open(file, "rb") as f:
        for last, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(path, last, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                                            f"{exc.start + 1}); re-encode the file as UTF-8") from None
            if last == 1:
                text = text.removeprefix("\ufeff")  # tolerate a byte-order mark
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                hint = ("; the file looks like one JSON array: JSONL needs one object per line"
                        if last == 1 and text.lstrip().startswith("[") else
                        "; each line must be one complete JSON object (no line breaks inside a record)")
                raise DataError(path, last, f"invalid JSON: {exc.msg} at column {exc.colno}{hint}") from None
            if not isinstance(obj, dict):
                raise DataError(path, last, f"expected a JSON object {{...}}, got a {type(obj).__name__}; "
                                            f"write one object per line")
            records += 1
            yield last, obj
    if records == 0:
        raise DataError(path, max(last, 1), "the file has no records (empty or only blank lines); "
                                            "expected one JSON object per line")


def write_jsonl(path: PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write ``records`` one per line (UTF-8, atomically via a temp file); return how many."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, out)
    return n
