"""The dependency direction of docs/architecture.md, checked on every import of every r1mega module.

The code imports lazily a lot (inside functions, to keep megatron/vLLM out of light paths), so the
check walks each module's whole AST: module-level imports, imports inside functions, ``TYPE_CHECKING``
blocks and ``importlib.import_module("r1mega....")`` with a literal name all count, for layering and
for cycles alike. A lazy import still makes one module depend on the other (and a lazy cycle is one
refactor away from an import-time failure), so the cycle check is over that same graph of all imports.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "r1mega"

# Which r1mega parts each part may import (besides itself and the empty root package ``r1mega``). The
# table of docs/architecture.md ("Dependency direction"); keep the two equal. A dotted entry allows that
# one module only: rewards get the engine protocol, never the package that builds engines; model families
# declare their tensor names with the bridge's rule engine, never the bridge's streaming.
ALLOWED: dict[str, frozenset[str]] = {
    "config": frozenset(),
    "platform": frozenset({"config"}),
    "kernels": frozenset({"platform", "config"}),
    "models": frozenset({"bridge.rules", "platform", "config"}),
    "data": frozenset({"platform", "config"}),
    "ckpt": frozenset({"models", "platform", "config"}),
    "bridge": frozenset({"ckpt", "models", "kernels", "platform", "config"}),
    "rl": frozenset({"models", "kernels", "platform", "config"}),
    "rollout": frozenset({"bridge", "ckpt", "models", "kernels", "platform", "config"}),
    "rewards": frozenset({"data", "rollout.protocol", "platform", "config"}),
    "train": frozenset({"rollout", "bridge", "ckpt", "rl", "rewards", "data", "models", "kernels", "platform",
                        "config"}),
    "cli": frozenset({"train", "rollout", "bridge", "ckpt", "rl", "rewards", "data", "models", "kernels",
                      "platform", "config"}),
}
# Third-party packages a part must not import at all: config is read before any process group or
# accelerator exists (`r1mega train` validates a recipe in a second), so it stays torch- and megatron-free.
FORBIDDEN_THIRD_PARTY = {"config": frozenset({"torch", "megatron", "transformer_engine", "vllm", "transformers"})}



def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(name: str, source: str, is_package: bool, known: dict | frozenset) -> set[str]:
    """Every module ``source`` imports, anywhere in it: ``from a.b import c`` is ``a.b.c`` when that is
    a module in ``known``, else ``a.b``; relative imports are resolved against ``name``."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            out.add(node.args[0].value)
    return out


@cache
def graph() -> dict[str, frozenset[str]]:
    """r1mega module -> every r1mega module or third-party package it imports (third-party: top name)."""
    mods = modules()
    out = {}
    for name, path in mods.items():
        found = imports_of(name, path.read_text(encoding="utf-8"), path.name == "__init__.py", mods)
        out[name] = frozenset(t if t.startswith("r1mega") else t.split(".")[0] for t in found if t != name)
    return out


def part_of(module: str) -> str:
    """``r1mega.rl.learner`` -> ``rl``; ``r1mega.cli`` -> ``cli``; the root package -> ``""``."""
    return module.split(".")[1] if "." in module else ""


def allowed(importer: str, target: str) -> bool:
    src, dst = part_of(importer), part_of(target)
    if dst in ("", src):
        return True
    rules = ALLOWED[src]
    return dst in rules or any(target == f"r1mega.{r}" or target.startswith(f"r1mega.{r}.")
                               for r in rules if "." in r)


def layering_violations(g: dict[str, frozenset[str]]) -> set[tuple[str, str]]:
    bad = set()
    for importer, targets in g.items():
        part = part_of(importer)
        for target in targets:
            if target.startswith("r1mega"):
                if not allowed(importer, target):
                    bad.add((importer, target))
            elif target in FORBIDDEN_THIRD_PARTY.get(part, ()):
                bad.add((importer, target))
    return bad


def cycles(g: dict[str, frozenset[str]]) -> set[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    nodes = {m: sorted(t for t in ts if t in g) for m, ts in g.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()
    for root in nodes:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = len(index)
                stack.append(v)
                on_stack.add(v)
            if i < len(nodes[v]):
                work.append((v, i + 1))
                w = nodes[v][i]
                if w not in index:
                    work.append((w, 0))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.add(frozenset(comp))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return found


def test_every_part_has_a_rule():
    parts = {part_of(m) for m in modules()} - {""}
    assert parts == set(ALLOWED), f"give each part of r1mega a row in ALLOWED (and docs/architecture.md): " \
                                  f"missing {sorted(parts - set(ALLOWED))}, stale {sorted(set(ALLOWED) - parts)}"


def test_imports_follow_the_dependency_direction():
    bad = sorted(layering_violations(graph()))
    assert not bad, "imports against docs/architecture.md's dependency direction:\n" + "\n".join(
        f"  {a} imports {b} ({part_of(a)} may import {sorted(ALLOWED[part_of(a)])})" for a, b in bad)


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles (lazy imports included): " + "; ".join(" <-> ".join(sorted(c)) for c in found)


# ----------------------------------------------------------------------------- the checker itself


def _fake_graph(tmp_path: Path, files: dict[str, str]) -> dict[str, frozenset[str]]:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    mods = {module_name(p, tmp_path): p for p in tmp_path.rglob("*.py")}
    return {n: frozenset(t if t.startswith("r1mega") else t.split(".")[0]
                         for t in imports_of(n, p.read_text(), p.name == "__init__.py", mods) if t != n)
            for n, p in mods.items()}


def test_checker_sees_lazy_relative_and_dynamic_imports(tmp_path):
    g = _fake_graph(tmp_path, {
        "r1mega/__init__.py": "",
        "r1mega/platform/__init__.py": "",
        "r1mega/platform/a.py": "def f():\n    from r1mega.models import b\n",
        "r1mega/models/__init__.py": "",
        "r1mega/models/b.py": "from . import c\n",
        "r1mega/models/c.py": "import importlib\nX = importlib.import_module('r1mega.models.b')\n",
        "r1mega/rewards/__init__.py": "",
        "r1mega/rewards/d.py": "from r1mega.rollout.protocol import S\n"
                               "def g():\n    from r1mega.rollout import build_engine\n",
        "r1mega/rollout/__init__.py": "",
        "r1mega/rollout/protocol.py": "",
        "r1mega/config/__init__.py": "",
        "r1mega/config/e.py": "def h():\n    import torch.nn\n",
    })
    assert layering_violations(g) == {("r1mega.platform.a", "r1mega.models.b"),
                                      ("r1mega.rewards.d", "r1mega.rollout"),
                                      ("r1mega.config.e", "torch")}
    assert cycles(g) == {frozenset({"r1mega.models.b", "r1mega.models.c"})}


@pytest.mark.parametrize("target,ok", [("r1mega.rollout.protocol", True), ("r1mega.rollout", False),
                                       ("r1mega.rollout.vllm_engine", False), ("r1mega.rollout.protocolx", False),
                                       ("r1mega.data.templates", True), ("r1mega", True)])
def test_dotted_rules_allow_one_module(target, ok):
    assert allowed("r1mega.rewards.judge", target) is ok
