"""Filesystem side of checkpoints: atomic commit, the ``latest`` pointer, pruning, resolution.

Layout of a checkpoint root::

    <root>/step_000010/        committed checkpoints (meta.json inside marks them complete)
    <root>/step_000020/
    <root>/latest              text file: the name of the newest committed step directory
    <root>/.tmp_step_000030_<nonce>/   a save in progress (or one that crashed): never read

Commit protocol (rank 0, after every rank has written its shards into the temp dir and a barrier):
fsync every file and the temp dir, ``rename`` it to ``step_<n>`` (atomic on POSIX), fsync the root,
then write ``latest`` to a temp file, fsync and ``os.replace`` it. A crash at any point before the
rename leaves the previous ``step_*`` and ``latest`` untouched; the stale temp dir is removed by the
next save.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from r1mega.ckpt.errors import CheckpointNotFoundError, IncompleteCheckpointError, SimulatedCrash

log = logging.getLogger(__name__)

META_FILE = "meta.json"
LATEST_FILE = "latest"
TMP_PREFIX = ".tmp_step_"
_STEP_DIR = re.compile(r"^step_(\d+)$")
FAULT_ENV = "R1MEGA_CKPT_FAULT"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def tmp_dir_name(step: int) -> str:
    return f"{TMP_PREFIX}{step:06d}_{uuid.uuid4().hex[:10]}"


def fault_point(name: str) -> None:
    """Raise :class:`SimulatedCrash` here when ``R1MEGA_CKPT_FAULT`` names this point (tests only)."""
    if os.environ.get(FAULT_ENV) == name:
        raise SimulatedCrash(f"simulated crash at checkpoint fault point {name!r} ({FAULT_ENV}={name})")


def fsync_path(path: Path) -> None:
    """fsync one file or directory (directories: makes renames/creations inside durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_path(Path(dirpath, name))
        fsync_path(Path(dirpath))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a sibling temp file, fsync it, then ``os.replace`` it onto ``path``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:10]}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def remove_stale_tmp_dirs(root: Path) -> list[Path]:
    """Delete temp dirs of saves that never committed (call only while no save is running)."""
    removed = []
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith(TMP_PREFIX) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    if removed:
        log.warning("removed %d unfinished checkpoint temp dir(s) in %s: %s", len(removed), root,
                    ", ".join(p.name for p in removed))
    return removed


def commit(tmp: Path, root: Path, step: int) -> Path:
    """Make the fully written ``tmp`` the checkpoint ``step_<n>`` and point ``latest`` at it."""
    final = root / step_dir_name(step)
    fsync_tree(tmp)
    fault_point("before_rename")
    if final.exists():  # re-saving a step (e.g. after a restart): swap, then drop the old copy
        trash = root / f".trash_{final.name}_{uuid.uuid4().hex[:10]}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_path(root)
    fault_point("before_latest")
    write_text_atomic(root / LATEST_FILE, final.name + "\n")
    return final


def link_tree(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> bool:
    """Give every file under ``src`` (but the top-level names in ``skip``) a second name under ``dst``.

    Hard links: the bytes exist once and stay as long as either name does, so pruning one name
    never breaks the other. Where the filesystem has no hard links the files are copied (logged);
    returns whether they were linked.
    """
    linked = True
    for dirpath, _, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in filenames:
            if rel == Path(".") and name in skip:
                continue
            target = dst / rel / name
            if linked:
                try:
                    os.link(Path(dirpath, name), target)
                    continue
                except OSError as e:
                    log.warning("no hard links from %s to %s (%s): copying the checkpoint's files instead",
                                src, dst, e)
                    linked = False
            shutil.copy2(Path(dirpath, name), target)
    return linked


def committed_steps(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint under ``root``, oldest first."""
    found = []
    if root.is_dir():
        for entry in root.iterdir():
            m = _STEP_DIR.match(entry.name)
            if m and (entry / META_FILE).is_file():
                found.append((int(m[1]), entry))
    return sorted(found)


def read_latest(root: Path) -> Path | None:
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    return root / pointer.read_text().strip()


def prune(root: Path, keep_last: int, protect: tuple[Path, ...] | list[Path] = ()) -> list[Path]:
    """Delete all but the newest ``keep_last`` committed checkpoints; never the one ``latest`` names,
    nor any in ``protect`` (e.g. the checkpoints a finished stage's done.json points at)."""
    if keep_last <= 0:
        return []
    kept = {Path(p).resolve() for p in protect}
    latest = read_latest(root)
    if latest is not None:
        kept.add(latest.resolve())
    steps = committed_steps(root)
    removed = []
    for _, path in steps[: max(0, len(steps) - keep_last)]:
        if path.resolve() in kept:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def resolve_checkpoint_dir(root_or_dir: str | Path) -> Path:
    """The step directory to load: ``root_or_dir`` itself if it is one, else what ``latest`` names.

    Raises :class:`CheckpointNotFoundError` / :class:`IncompleteCheckpointError` with the fix.
    """
    path = Path(root_or_dir)
    if not path.exists():
        raise CheckpointNotFoundError(
            f"checkpoint path {path} does not exist: pass a checkpoint root (the save directory, with a "
            f"'{LATEST_FILE}' file) or one of its step_* directories")
    if not path.is_dir():
        raise CheckpointNotFoundError(f"checkpoint path {path} is not a directory: pass a checkpoint root "
                                      "or one of its step_* directories")
    if _STEP_DIR.match(path.name) or (path / META_FILE).exists() or (path / "metadata.json").exists():
        step_dir = path
    else:
        latest = read_latest(path)
        if latest is None:
            steps = committed_steps(path)
            hint = (f"; complete checkpoints found there: {', '.join(p.name for _, p in steps)} - pass one "
                    f"of them explicitly, e.g. {steps[-1][1]}" if steps else
                    "; it holds no complete step_* checkpoint either (wrong directory, or no save finished)")
            raise CheckpointNotFoundError(f"checkpoint root {path} has no '{LATEST_FILE}' file{hint}")
        if not latest.is_dir():
            raise CheckpointNotFoundError(
                f"{path / LATEST_FILE} names {latest.name}, which does not exist (deleted by hand?): "
                f"pass an existing step_* directory of {path} explicitly")
        step_dir = latest
    if not (step_dir / META_FILE).is_file():
        raise IncompleteCheckpointError(
            f"checkpoint {step_dir} is incomplete: it has no {META_FILE}, so its save never committed "
            f"(crashed mid-write, or not an r1mega checkpoint). Load an earlier complete step_* directory "
            f"or the checkpoint root (its '{LATEST_FILE}' names the last committed one)")
    return step_dir
