"""Load an ``R1Config``: schema defaults <- YAML recipe <- ``key=value`` CLI overrides.

OmegaConf's own errors name a single key in its internal terms and stop at the first one. This
loader checks keys against the dataclass schema itself so every typo in a recipe is reported at once
with its section and a "did you mean", then lets OmegaConf enforce types one leaf at a time.
"""

from __future__ import annotations

import difflib
import functools
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from r1mega.config.errors import ConfigError
from r1mega.config.presets import resolve_model
from r1mega.config.schema import R1Config
from r1mega.config.validate import check_stage_token_budget, resolve_parallel, validate_config

PathLike = Union[str, os.PathLike]
Leaf = tuple[str, Any, Any]  # (dotted key, value, annotated field type)


# --------------------------------------------------------------------------- public API


def load_config(
    path: Optional[PathLike] = None,
    overrides: Sequence[str] = (),
    world_size: Optional[int] = None,
) -> R1Config:
    """Build, preset-resolve and validate a run config; raise ``ConfigError`` listing all problems.

    ``world_size`` enables the layout checks (tp*pp*dp, expert grid, batch divisibility); leave it
    ``None`` when the rank count is not known yet (e.g. when only inspecting a recipe).
    """
    cfg = _build(path, overrides)
    try:
        cfg.model = resolve_model(cfg.model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    cfg.parallel = resolve_parallel(cfg.parallel)
    validate_config(cfg, world_size)
    problems = []
    for stage in cfg.stages:
        try:
            found = check_stage_token_budget(stage_config(cfg, stage, world_size), stage.kind)
        except ConfigError as exc:
            found = exc.problems
        problems += [f"stage {stage.name!r}: {p}" for p in found]
    if problems:
        raise ConfigError(problems)
    return cfg


def stage_config(cfg: R1Config, stage, world_size: Optional[int] = None) -> R1Config:
    """The run config one stage sees: its ``overrides``, ``steps`` (-> trainer.steps) and ``lr``
    (-> optimizer.lr) applied to ``cfg``; validated. ``stages`` is emptied in the result."""
    base = OmegaConf.structured(replace(cfg, stages=[]))
    problems: list[str] = []
    for item in stage.overrides:
        parsed = _parse_override(item, problems)
        if parsed is not None:
            problems += _apply(base, parsed, f"stage override {item!r}")
    if problems:
        raise ConfigError(problems)
    out = OmegaConf.to_object(base)
    if stage.steps is not None:
        out.trainer.steps = stage.steps
    if stage.lr is not None:
        out.optimizer.lr = stage.lr
    validate_config(out, world_size)
    return out


def config_to_yaml(cfg: R1Config) -> str:
    """YAML for ``cfg`` that ``load_config`` reads back to an equal config (model fields resolved)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: R1Config, path: PathLike) -> Path:
    """Write the resolved config next to a run so it can be reproduced exactly; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(config_to_yaml(cfg))
    return out


# --------------------------------------------------------------------------- building


def _build(path: Optional[PathLike], overrides: Sequence[str]) -> R1Config:
    """Merge every source into the structured schema, then convert to real dataclasses."""
    if isinstance(overrides, str):
        overrides = [overrides]  # a lone "a=b" string would otherwise be iterated per character
    base = OmegaConf.structured(R1Config)
    problems: list[str] = []
    sources: list[tuple[str, dict]] = []
    if path is not None:
        sources.append((str(path), _read_yaml(path)))
    by_name: list[tuple[str, dict]] = []
    for item in overrides:
        parsed = _parse_override(item, problems)
        if parsed is not None and isinstance(parsed.get("stages"), Mapping):
            by_name.append((item, parsed["stages"]))  # stages.<name>.<key>=value: one stage of the recipe
        elif parsed is not None:
            sources.append((f"override {item!r}", parsed))
    for label, data in sources:
        problems += _apply(base, data, label)
    for item, data in by_name:
        problems += _apply_stage_override(base, item, data)
    if problems:
        raise ConfigError(problems)
    try:
        return OmegaConf.to_object(base)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"{key}: {_first_line(exc)}: fix the value or interpolation") from None


def _apply(base: DictConfig, data: Mapping, label: str) -> list[str]:
    """Assign each leaf of ``data`` into ``base``; unknown keys and bad types become problems."""
    leaves: list[Leaf] = []
    problems: list[str] = []
    _walk(data, R1Config, "", label, leaves, problems)
    for key, value, ftype in leaves:
        try:
            OmegaConf.update(base, key, value, merge=True)
        except OmegaConfBaseException as exc:
            problems.append(
                f"{key}={value!r} (in {label}) has the wrong type: expected {_type_name(ftype)}, "
                f"got {type(value).__name__} ({_first_line(exc)}); fix the value"
            )
    return problems


def _apply_stage_override(base: DictConfig, item: str, data: Mapping) -> list[str]:
    """``stages.<name>.<key>=value``: set one field of the recipe's stage called ``name``."""
    from r1mega.config.schema import StageConfig

    names = [str(st["name"]) for st in OmegaConf.to_container(base.stages)]
    problems: list[str] = []
    for name, fields_ in data.items():
        if str(name) not in names:
            problems.append(f"override {item!r}: the recipe has no stage {name!r} (its stages: "
                            f"{', '.join(names) or 'none'}); write stages.<stage name>.<key>=value")
            continue
        if not isinstance(fields_, Mapping):
            problems.append(f"override {item!r}: name a field of the stage, e.g. stages.{name}.steps=10")
            continue
        i = names.index(str(name))
        for key, value in fields_.items():
            if key not in _field_types(StageConfig):
                problems.append(_unknown_key(str(key), StageConfig, f"stages.{name}.", f"override {item!r}"))
                continue
            try:
                OmegaConf.update(base, f"stages.{i}.{key}", value, merge=True)
            except OmegaConfBaseException as exc:
                problems.append(f"override {item!r} has the wrong type: expected "
                                f"{_type_name(_field_types(StageConfig)[key])} ({_first_line(exc)}); fix the value")
    return problems


def _walk(data: Mapping, cls: type, prefix: str, label: str, leaves: list[Leaf],
          problems: list[str]) -> None:
    """Split ``data`` into leaves along the schema ``cls``, reporting keys the schema lacks."""
    hints = _field_types(cls)
    for raw_key, value in data.items():
        key, dotted = str(raw_key), f"{prefix}{raw_key}"
        if key not in hints:
            problems.append(_unknown_key(key, cls, prefix, label))
            continue
        ftype = hints[key]
        if is_dataclass(ftype):
            if isinstance(value, Mapping):
                _walk(value, ftype, f"{dotted}.", label, leaves, problems)
            else:
                problems.append(
                    f"{dotted} (in {label}) is a section but got {value!r}: give it a mapping of "
                    f"its keys ({', '.join(_field_types(ftype))})"
                )
            continue
        if _list_items_ok(value, ftype, dotted, label, problems):
            leaves.append((dotted, value, ftype))


def _list_items_ok(value: Any, ftype: Any, dotted: str, label: str, problems: list[str]) -> bool:
    """Lists of dataclasses (reward.terms) get the same unknown-key check for each item."""
    elem = _list_element_type(ftype)
    if elem is None or not is_dataclass(elem) or not isinstance(value, list):
        return True
    before = len(problems)
    for i, item in enumerate(value):
        if isinstance(item, Mapping):
            _walk(item, elem, f"{dotted}[{i}].", label, [], problems)
    return len(problems) == before


# --------------------------------------------------------------------------- sources


def _read_yaml(path: PathLike) -> dict:
    """Parse a recipe; missing files and YAML syntax errors name the file and the line."""
    file = Path(path)
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "does not exist"
        raise ConfigError(f"config file {str(path)!r} {what} (resolved to {file.resolve()}): "
                          f"check the path")
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from None
    try:
        node = OmegaConf.create(text)  # OmegaConf's YAML loader: reads 1e-6 as a float, unlike PyYAML
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_problem(str(path), text, exc)) from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {_first_line(exc)}: fix the YAML") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, "
                          f"parallel:, ...), not a {type(node).__name__}")
    return OmegaConf.to_container(node, resolve=False)


def _yaml_problem(path: str, text: str, exc: yaml.YAMLError) -> str:
    """One line: file, line, column, the offending source line and PyYAML's reason."""
    mark = getattr(exc, "problem_mark", None)
    reason = getattr(exc, "problem", None) or _first_line(exc)
    if mark is None:
        return f"{path}: malformed YAML: {reason}: fix the YAML syntax"
    lines = text.splitlines()
    source = lines[mark.line].strip() if mark.line < len(lines) else ""
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    opened = f" ({context} opened at line {start.line + 1})" if context and start else ""
    return (f"{path}: malformed YAML at line {mark.line + 1}, column {mark.column + 1} "
            f"({source!r}): {reason}{opened}: fix the YAML syntax")


def _parse_override(item: str, problems: list[str]) -> Optional[dict]:
    """``a.b=value`` -> nested dict, values typed by OmegaConf's grammar (2 -> int, null -> None)."""
    key, sep, _ = str(item).partition("=")
    key = key.strip()
    if not sep:
        problems.append(f"override {item!r} has no '=': write it as key=value, "
                        f"e.g. optimizer.lr=1e-6")
        return None
    if not key or not all(key.split(".")):
        problems.append(f"override {item!r} has an empty key: write it as section.key=value")
        return None
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        problems.append(f"override {item!r} cannot be parsed: {_first_line(exc)}")
        return None


# --------------------------------------------------------------------------- messages


def _unknown_key(key: str, cls: type, prefix: str, label: str) -> str:
    """Name the key and its section, and suggest the closest valid key (difflib)."""
    valid = list(_field_types(cls))
    section = prefix.rstrip(".") or None
    what = f"unknown key {key!r} in section {section!r}" if section else f"unknown section {key!r}"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        hint = f"did you mean {prefix + close[0]!r}?"
    elif section and (elsewhere := _section_of(key)):
        hint = f"did you mean {elsewhere + '.' + key!r}? ({key} belongs to section {elsewhere!r})"
    else:
        hint = f"valid {'keys' if section else 'sections'} are: {', '.join(valid)}"
    return f"{what} (in {label}): {hint}"


def _section_of(key: str) -> Optional[str]:
    """The top-level section that has a field named ``key``, for misplaced keys."""
    for section, ftype in _field_types(R1Config).items():
        if is_dataclass(ftype) and key in _field_types(ftype):
            return section
    return None


def _type_name(ftype: Any) -> str:
    """Human name of an annotation: ``Optional[int]`` -> 'int or null'."""
    args = typing.get_args(ftype)
    origin = typing.get_origin(ftype)
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names + (["null"] if type(None) in args else []))
    if origin is list:
        elem = args[0] if args else Any
        if is_dataclass(elem):
            inner = ", ".join(f"{k}: {_type_name(t)}" for k, t in _field_types(elem).items())
            return f"list of {{{inner}}}"
        return f"list of {_type_name(elem)}"
    if ftype is bool:
        return "bool (true/false)"
    return getattr(ftype, "__name__", str(ftype))


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's fields (the schema uses postponed annotations)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _list_element_type(ftype: Any) -> Any:
    if typing.get_origin(ftype) is list and typing.get_args(ftype):
        return typing.get_args(ftype)[0]
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
