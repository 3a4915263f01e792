"""Run an untrusted Python program in a subprocess sandbox; nothing it does may hurt the caller.

Layers, each independent of the others:

- rlimits set in the child before exec: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), file
  size (RLIMIT_FSIZE, which also caps stdout/stderr since they go to files), processes
  (RLIMIT_NPROC), no core dumps;
- a wall-clock timeout, then SIGKILL to the whole process group;
- when permitted (root, or unprivileged user namespaces), ``unshare --net --pid --fork
  --kill-child``: a network namespace with no interfaces but a down loopback (no network), and a PID
  namespace whose init is the program, so killing it kills every descendant, even ones that
  called ``setsid``;
- as root, ``setpriv`` switches to an unprivileged uid so RLIMIT_NPROC (ignored for root) stops
  fork bombs and the program can write only where any user can (its working directory, /tmp), not
  the trainer's files; if the interpreter is only readable by root (e.g. under /root), the uid keeps
  CAP_DAC_READ_SEARCH (read anything, write nothing more) and no other capability;
- a fresh temporary working directory, removed afterwards.

Which layers are available is probed once per process (``isolation()``); a missing network
namespace is logged as a warning once.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

from r1mega.config.schema import CodeSandboxConfig

log = logging.getLogger(__name__)

SANDBOX_UID_BASE = 200_000  # unprivileged uids used as root: base + pid % SANDBOX_UID_SPAN
SANDBOX_UID_SPAN = 50_000
_NS = ("--net", "--pid", "--fork", "--kill-child")
# Creating and tearing down a network namespace occasionally takes several hundred ms (measured up to
# 0.8 s under load); the wall clock allows for it so a correct program is not failed for the kernel's time.
NAMESPACE_GRACE_S = 1.0
_PR_SET_PDEATHSIG = 1
try:
    _LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:  # not glibc-like; the wall timeout still applies
    _LIBC = None


@dataclass(frozen=True)
class Isolation:
    """How programs are isolated on this machine (see ``isolation()``)."""

    namespaces: bool = False  # new network + PID namespaces (no network; killing init kills all)
    user_namespace: bool = False  # ... created without root, inside a new user namespace
    drop_uid: bool = False  # runs as an unprivileged uid (RLIMIT_NPROC enforced, no writes outside)
    keep_read_search: bool = False  # that uid keeps CAP_DAC_READ_SEARCH (to read the interpreter)

    @property
    def network(self) -> bool:
        return self.namespaces

    @property
    def mode(self) -> str:
        parts = [name for name, on in (("user-namespace" if self.user_namespace else "namespaces", self.namespaces),
                                       ("uid", self.drop_uid), ("read-search", self.keep_read_search)) if on]
        return "+".join(parts) or "none"

    def wrapper(self, uid: int) -> list[str]:
        cmd: list[str] = []
        if self.namespaces:
            cmd += ["unshare", *(("--user", "--map-root-user") if self.user_namespace else ()), *_NS]
            if not self.drop_uid:
                cmd.append("--")
        if self.drop_uid:
            caps = "-all,+dac_read_search" if self.keep_read_search else "-all"
            cmd += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", f"--inh-caps={caps}",
                    f"--bounding-set={caps}"]
            if self.keep_read_search:
                cmd.append("--ambient-caps=+dac_read_search")
            cmd.append("--")
        return cmd


@dataclass
class RunResult:
    status: str  # ok | error | timeout | memory | output_limit | sandbox_error
    returncode: Optional[int]
    stdout: str
    stderr: str
    wall_s: float


_PROBE = "import sys; print(sys.version, sys.base_prefix)"


def _probe(iso: Isolation, python: str) -> bool:
    """Whether ``python`` starts under ``iso`` *as the same interpreter* (an unprivileged uid that
    cannot read it may be handed another Python found by the system)."""
    cmd = iso.wrapper(_sandbox_uid()) + [python, "-I", "-S", "-c", _PROBE]
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and done.stdout.strip() == f"{sys.version} {sys.base_prefix}"


def isolation(want_network_isolation: bool = True) -> Isolation:
    """The strongest isolation this process can use for ``sys.executable`` (probed once per process)."""
    return _isolation(sys.executable, want_network_isolation)


@lru_cache(maxsize=4)
def _isolation(python: str, want_network_isolation: bool) -> Isolation:
    ns = want_network_isolation and shutil.which("unshare") is not None
    candidates: list[Isolation] = []
    if os.geteuid() == 0:
        uid_options = [(True, False), (True, True)] if shutil.which("setpriv") else []
        for namespaces in ([True, False] if ns else [False]):
            candidates += [Isolation(namespaces, False, drop, keep) for drop, keep in uid_options]
            candidates.append(Isolation(namespaces))
    elif ns:
        candidates.append(Isolation(True, user_namespace=True))
    chosen = next((iso for iso in candidates if _probe(iso, python)), Isolation())
    if want_network_isolation and not chosen.network:
        log.warning("code sandbox: cannot create a network namespace here (needs root or unprivileged user "
                    "namespaces, and util-linux 'unshare'); candidate programs run WITH network access")
    if os.geteuid() == 0 and not chosen.drop_uid:
        log.warning("code sandbox: cannot switch to an unprivileged uid (util-linux 'setpriv'), so RLIMIT_NPROC "
                    "is not enforced for root; fork bombs are bounded only by the timeout%s",
                    " and the PID namespace" if chosen.namespaces else "")
    log.info("code sandbox isolation: %s", chosen.mode)
    return chosen


def _sandbox_uid() -> int:
    return SANDBOX_UID_BASE + os.getpid() % SANDBOX_UID_SPAN


def _user_process_count() -> int:
    uid, n = os.getuid(), 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                n += os.stat(f"/proc/{entry}").st_uid == uid
            except OSError:
                pass
    return n


def _limits(cfg: CodeSandboxConfig, iso: Isolation) -> dict[int, tuple[int, int]]:
    cpu = max(1, int(-(-cfg.wall_timeout_s // 1)))
    nproc = cfg.max_processes
    if not iso.drop_uid and os.geteuid() != 0:  # the limit counts all of this user's processes
        nproc += _user_process_count()
    mem = cfg.memory_mb << 20
    return {
        resource.RLIMIT_CPU: (cpu, cpu + 1),
        resource.RLIMIT_AS: (mem, mem),
        resource.RLIMIT_FSIZE: (cfg.max_output_bytes, cfg.max_output_bytes),
        resource.RLIMIT_NPROC: (nproc, nproc),
        resource.RLIMIT_CORE: (0, 0),
    }


def _read_capped(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def run_python(source: str, stdin: str = "", cfg: Optional[CodeSandboxConfig] = None,
               iso: Optional[Isolation] = None) -> RunResult:
    """Run ``source`` with ``stdin`` under the sandbox; never raises for anything the program does."""
    cfg = cfg or CodeSandboxConfig()
    python = sys.executable
    iso = iso or isolation(cfg.network_isolation)
    uid = _sandbox_uid()
    root = tempfile.mkdtemp(prefix="r1mega-sandbox-")
    start = time.monotonic()
    try:
        work = os.path.join(root, "work")
        os.mkdir(work)
        prog = os.path.join(work, "main.py")
        with open(prog, "w", encoding="utf-8") as f:
            f.write(source)
        paths = {name: os.path.join(root, name) for name in ("stdin", "stdout", "stderr")}
        with open(paths["stdin"], "w", encoding="utf-8") as f:
            f.write(stdin)
        if iso.drop_uid:
            os.chmod(root, 0o711)
            os.chown(work, uid, uid)
            os.chmod(prog, 0o644)
        limits = _limits(cfg, iso)
        flags = ["-I"] if cfg.site_packages else ["-I", "-S"]
        cmd = iso.wrapper(uid) + [python, *flags, "main.py"]

        def preexec() -> None:  # runs in the child between fork and exec
            for kind, value in limits.items():
                resource.setrlimit(kind, value)
            if _LIBC is not None:  # die with the caller (e.g. a killed reward worker), taking the namespace
                _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

        with open(paths["stdin"], "rb") as fin, open(paths["stdout"], "wb") as fout, \
                open(paths["stderr"], "wb") as ferr:
            try:
                proc = subprocess.Popen(cmd, stdin=fin, stdout=fout, stderr=ferr, cwd=work, preexec_fn=preexec,
                                        start_new_session=True, close_fds=True,
                                        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work})
            except OSError as exc:
                return RunResult("sandbox_error", None, "", f"cannot start the sandbox: {exc}", 0.0)
            grace = NAMESPACE_GRACE_S if iso.namespaces else 0.0
            returncode, cpu_s, timed_out = _wait(proc, cfg.wall_timeout_s + grace)
        wall = time.monotonic() - start
        out_size = os.path.getsize(paths["stdout"])
        stdout = _read_capped(paths["stdout"], cfg.max_output_bytes)
        stderr = _read_capped(paths["stderr"], 64 << 10)
        cpu_killed = returncode != 0 and cpu_s >= limits[resource.RLIMIT_CPU][0] - 0.05
        status = _status(returncode, timed_out or cpu_killed, out_size, stderr, cfg)
        return RunResult(status, returncode, stdout, stderr, wall)
    except Exception as exc:  # the caller is a trainer; report, never raise
        return RunResult("sandbox_error", None, "", f"{type(exc).__name__}: {exc}", time.monotonic() - start)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _wait(proc: subprocess.Popen, wall_timeout_s: float) -> tuple[int, float, bool]:
    """Wait for the program; SIGKILL its process group at the deadline and afterwards (stragglers).

    Returns ``(exit code, CPU seconds of the program and its reaped children, timed out)``. Waits
    with ``wait4`` for the CPU time: exit signals do not survive ``unshare`` reliably.
    """
    fired = threading.Event()

    def kill() -> None:
        fired.set()
        _killpg(proc.pid)

    timer = threading.Timer(wall_timeout_s, kill)
    timer.daemon = True
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    _killpg(proc.pid)
    return proc.returncode, usage.ru_utime + usage.ru_stime, fired.is_set()


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _status(rc: int, timed_out: bool, out_size: int, stderr: str, cfg: CodeSandboxConfig) -> str:
    """Classify by evidence (time used, output size, the error text), not only by the exit status."""
    if timed_out or rc == -signal.SIGXCPU:
        return "timeout"
    if out_size >= cfg.max_output_bytes or rc == -signal.SIGXFSZ or "File too large" in stderr:
        return "output_limit"
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        return "memory"
    return "ok" if rc == 0 else "error"
