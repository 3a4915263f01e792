"""Build (once, cached) and load r1mega's C++/CUDA ops from ``csrc/``; decide which path runs.

The ops are compiled with ``torch.utils.cpp_extension.load`` on first use (or ahead of time by
``python -m r1mega.kernels.build``, which ``scripts/setup.sh`` runs) into torch's extension cache
(``TORCH_EXTENSIONS_DIR``, see :func:`build_directory`), keyed by a hash of the sources, so later
processes only load the shared library. The CUDA sources are added when torch has CUDA and ``nvcc`` is present.

``R1MEGA_KERNELS`` picks the path: ``auto`` (default: the compiled ops when they build, else the
pure-torch fallback, with a warning saying why), ``torch`` (always the fallback) or ``ext`` (the
compiled ops or an error). Whichever path runs is logged once per process.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent.parent.parent / "csrc"
CPU_SOURCES = ("fused_logprob_cpu.cpp",)
CUDA_SOURCES = ("fused_logprob_cuda.cu",)
MODES = ("auto", "torch", "ext")

_lock = threading.Lock()
_state: dict = {}
_logged: set = set()


class KernelBuildError(RuntimeError):
    """The compiled ops were required (``R1MEGA_KERNELS=ext``) but could not be built or loaded."""


def mode() -> str:
    value = os.environ.get("R1MEGA_KERNELS", "auto").strip().lower()
    if value not in MODES:
        raise ValueError(f"R1MEGA_KERNELS={value!r} is not one of {MODES}; unset it or pick one of those")
    return value


def _cuda_buildable() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.cuda.is_available() and torch.version.cuda is not None and CUDA_HOME is not None


def _cpu_vector_flags() -> list[str]:
    """AVX2/FMA when this CPU has them, so the fused loops vectorise (the cache is per machine:
    the flags are part of the build's hash, and a CPU without them gets a portable build)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= flags else []


def build_directory(name: str) -> Path:
    """Where ``name`` is compiled: under torch's extension root (``TORCH_EXTENSIONS_DIR``), per Python
    and torch version, since a library built against one torch does not load into another."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    version = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}"
    return root / "r1mega" / version / name


@contextlib.contextmanager
def exclusive_build(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s build for this process, and clear a lock file left by a killed build.

    torch's builder marks a build with a ``lock`` file and waits, without a limit, for it to go away.
    A build killed mid-way leaves the file behind, and every later build then hangs. Builders here
    first take a kernel (``flock``) lock, which the kernel drops when its holder dies; whoever holds
    it knows that a ``lock`` file it finds is stale.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "r1mega-build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = directory / "lock"
            if stale.exists():
                log.warning("r1mega kernels: removing %s, left by a build that did not finish", stale)
                stale.unlink()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(verbose: bool = False) -> bool:
    """Compile/load the extension; returns whether CUDA kernels are included."""
    from torch.utils.cpp_extension import load

    if not CSRC.is_dir():
        raise FileNotFoundError(f"{CSRC} is missing: the C++ sources ship with the r1mega repository")
    with_cuda = _cuda_buildable()
    sources = [str(CSRC / s) for s in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    name = "r1mega_ops_cuda" if with_cuda else "r1mega_ops_cpu"
    vector = _cpu_vector_flags()
    name += "_avx2" if vector else ""
    directory = build_directory(name)
    with exclusive_build(directory):
        load(name=name, sources=sources, extra_cflags=["-O3", "-fopenmp", *vector], extra_ldflags=["-fopenmp"],
             extra_cuda_cflags=["-O3"], extra_include_paths=[str(CSRC)], with_cuda=with_cuda, is_python_module=False,
             build_directory=str(directory), verbose=verbose)
    return with_cuda


def load_ops(verbose: bool = False) -> dict:
    """``{"available": bool, "cuda": bool, "error": str | None}``; builds at most once per process."""
    with _lock:
        if not _state:
            if mode() == "torch":
                _state.update(available=False, cuda=False, error="R1MEGA_KERNELS=torch")
            else:
                try:
                    cuda = _build(verbose)
                    _state.update(available=True, cuda=cuda, error=None)
                except Exception as exc:  # compiler missing, headers mismatch, ...
                    _state.update(available=False, cuda=False, error=f"{type(exc).__name__}: {exc}".strip())
                    if mode() == "ext":
                        raise KernelBuildError(
                            f"R1MEGA_KERNELS=ext but the C++ ops in {CSRC} did not build: {_state['error']}. "
                            "Install a C++ compiler and ninja (and nvcc for CUDA), or set R1MEGA_KERNELS=auto"
                        ) from exc
        return dict(_state)


def ops_for(device: torch.device) -> bool:
    """Whether the compiled ops serve tensors on ``device`` (logs the chosen path once per device type)."""
    state = load_ops()
    usable = state["available"] and (device.type == "cpu" or (device.type == "cuda" and state["cuda"]))
    if mode() == "ext" and not usable:
        raise KernelBuildError(f"R1MEGA_KERNELS=ext but the compiled ops do not cover {device.type} tensors")
    if device.type not in _logged:
        _logged.add(device.type)
        if usable:
            log.info("r1mega kernels: compiled %s ops from csrc/ serve %s tensors",
                     "C++/CUDA" if state["cuda"] else "C++", device.type)
        else:
            why = state["error"] or f"no {device.type} build"
            level = logging.INFO if why == "R1MEGA_KERNELS=torch" else logging.WARNING
            log.log(level, "r1mega kernels: pure-torch fallback for %s tensors (%s)", device.type, why)
    return usable
