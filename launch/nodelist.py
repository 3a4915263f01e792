"""Expand a Slurm hostlist expression in pure Python (no ``scontrol`` needed).

``gpu-[01-03,07],login1`` -> ``["gpu-01", "gpu-02", "gpu-03", "gpu-07", "login1"]``. Several bracket
groups in one name expand as a product (``r[1-2]n[1-2]`` -> ``r1n1, r1n2, r2n1, r2n2``), zero padding
follows the range's first bound (``[08-10]`` -> ``08, 09, 10``) and a ``-step`` suffix is not part of
Slurm's syntax, so it is rejected. The generated sbatch script uses ``scontrol show hostnames``;
this helper is for tests, dry runs and machines without Slurm.
"""

from __future__ import annotations

import itertools


class NodelistError(ValueError):
    """A hostlist expression that Slurm would not accept."""


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise NodelistError(f"nested '[' in hostlist {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise NodelistError(f"unbalanced ']' in hostlist {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise NodelistError(f"unclosed '[' in hostlist {text!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range_list(body: str, expr: str) -> list[str]:
    """``01-03,07`` -> ``["01", "02", "03", "07"]``."""
    out: list[str] = []
    for item in body.split(","):
        item = item.strip()
        if not item:
            raise NodelistError(f"empty range in {expr!r}")
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise NodelistError(f"bad range {item!r} in {expr!r}: expected N or N-M with digits")
        if not sep:
            out.append(lo)
            continue
        start, stop = int(lo), int(hi)
        if stop < start:
            raise NodelistError(f"descending range {item!r} in {expr!r}")
        out.extend(str(n).zfill(len(lo)) for n in range(start, stop + 1))
    return out


def _expand_name(name: str, expr: str) -> list[str]:
    pieces: list[list[str]] = []
    rest = name
    while rest:
        i = rest.find("[")
        if i < 0:
            pieces.append([rest])
            break
        j = rest.find("]", i)
        if i:
            pieces.append([rest[:i]])
        pieces.append(_expand_range_list(rest[i + 1:j], expr))
        rest = rest[j + 1:]
    return ["".join(p) for p in itertools.product(*pieces)]


def expand_nodelist(expr: str) -> list[str]:
    """All host names of a Slurm hostlist expression, in Slurm's order (duplicates kept)."""
    expr = expr.strip()
    if not expr:
        raise NodelistError("empty hostlist")
    hosts: list[str] = []
    for name in _split_top_level(expr):
        hosts.extend(_expand_name(name, expr))
    return hosts


def first_host(expr: str) -> str:
    """The rendezvous host: the first node of the allocation (what ``scontrol ... | head -n1`` gives)."""
    return expand_nodelist(expr)[0]
