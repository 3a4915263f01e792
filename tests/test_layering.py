"""Dependencies point one way (docs/architecture.md): no package below ``train`` imports it, and the
bridge (checkpoint conversion included) never touches training state (DDP, optimizers, schedulers)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "r1mega"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_nothing_below_train_imports_it():
    offenders = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "train" or rel == Path("cli.py"):
            continue
        bad = sorted(n for n in _imports(path) if n == "r1mega.train" or n.startswith("r1mega.train."))
        if bad:
            offenders[str(rel)] = bad
    assert not offenders, offenders


def test_bridge_builds_no_training_state():
    training = ("megatron.core.distributed", "megatron.core.optimizer", "megatron.core.optimizer_param_scheduler")
    offenders = {}
    for path in (ROOT / "bridge").rglob("*.py"):
        bad = sorted(n for n in _imports(path) if n.startswith(training))
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert not offenders, offenders
