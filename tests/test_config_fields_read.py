"""No dead options: every field of every config dataclass (``r1mega/config/schema.py``) is read by code
outside ``r1mega/config``.

A read is an attribute load ``<anything>.<field>`` or ``getattr(<anything>, "<field>")`` anywhere in
r1mega's other modules (the AST, so comments and strings do not count). Validation alone is not a
reader: an option that validates and then does nothing is exactly what this catches.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import r1mega.config.schema as schema

PKG = Path(__file__).resolve().parent.parent / "r1mega"

# Fields read by name through a loop (a tuple of names and getattr), so no literal attribute access
# exists: (class, field) -> the module that holds the name as a string. The test checks the string is
# still there. Keep this short; prefer plain attribute reads.
READ_BY_NAME: dict[tuple[str, str], str] = {
    # vllm_engine.engine_kwargs: {n: getattr(rollout, n) for n in names} -> VLLMEngine(**kwargs)
    ("RolloutConfig", "enforce_eager"): "rollout/vllm_engine.py",
    ("RolloutConfig", "max_model_len"): "rollout/vllm_engine.py",
    ("RolloutConfig", "gpu_memory_utilization"): "rollout/vllm_engine.py",
    ("RolloutConfig", "kv_cache_gib"): "rollout/vllm_engine.py",
    ("RolloutConfig", "enable_prefix_caching"): "rollout/vllm_engine.py",
}


def config_fields(module=schema) -> list[tuple[str, str]]:
    """(class, field) of every dataclass defined in ``module``."""
    return [(cls.__name__, f.name) for cls in vars(module).values()
            if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == module.__name__
            for f in dataclasses.fields(cls)]


def names_read(source: str) -> set[str]:
    """Attribute names loaded in ``source``, plus literal names passed to ``getattr``."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            out.add(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
            out.add(node.args[1].value)
    return out


def reads_outside_config() -> set[str]:
    out: set[str] = set()
    for path in PKG.rglob("*.py"):
        if path.relative_to(PKG).parts[0] != "config":
            out |= names_read(path.read_text(encoding="utf-8"))
    return out


def unread(fields: list[tuple[str, str]], reads: set[str]) -> set[tuple[str, str]]:
    return {(cls, name) for cls, name in fields if name not in reads and (cls, name) not in READ_BY_NAME}


def test_every_config_field_has_a_reader():
    fields = config_fields()
    missing = unread(fields, reads_outside_config())
    assert not missing, ("config fields nothing outside r1mega/config reads (wire each one into the code it "
                         "configures, or delete it): " + ", ".join(f"{c}.{n}" for c, n in sorted(missing)))


def test_read_by_name_entries_are_still_read_there():
    fields = set(config_fields())
    for (cls, name), module in READ_BY_NAME.items():
        assert (cls, name) in fields, f"READ_BY_NAME: {cls}.{name} is not a config field"
        strings = {n.value for n in ast.walk(ast.parse((PKG / module).read_text(encoding="utf-8")))
                   if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert name in strings, f"READ_BY_NAME: r1mega/{module} no longer names {name!r}: find its reader or delete it"


def test_the_check_sees_reads_and_ignores_writes_and_strings():
    src = ("def f(cfg):\n    cfg.trainer.written = 1\n    x = cfg.rl.kl_coef\n    y = getattr(cfg.rl, 'eps')\n"
           "    # cfg.commented\n    return 'cfg.in_a_string', x, y\n")
    assert names_read(src) >= {"rl", "kl_coef", "eps", "trainer"}
    assert not names_read(src) & {"written", "commented", "in_a_string"}
