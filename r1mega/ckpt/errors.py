"""Checkpoint errors: each message names the path and says what to do about it."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """Base class of every r1mega checkpoint error."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The directory, the ``latest`` pointer or the step it names does not exist."""


class IncompleteCheckpointError(CheckpointError):
    """A step directory without ``meta.json``: its save never committed (crash mid-write)."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint was saved from a model with a different architecture or parameter shapes."""


class SimulatedCrash(CheckpointError):
    """Raised at a fault point when ``R1MEGA_CKPT_FAULT`` names it (tests of the atomic protocol)."""
