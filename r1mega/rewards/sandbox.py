"""Run an untrusted Python program in a subprocess sandbox; nothing it does may hurt the caller.

Layers, each independent of the others:

- a private filesystem view (``sandbox_fs``): a new mount namespace built by bubblewrap, else by
  ``unshare --mount`` and r1mega's own helper, where the program sees only read-only binds of what
  the interpreter needs, /dev/null, zero and urandom, its own /proc, and fresh size-capped tmpfs
  mounts as /tmp and as its working directory: no dataset, checkpoint or earlier program's file;
- rlimits set in the child before exec: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), file
  size (RLIMIT_FSIZE, which also caps stdout/stderr since they go to files), processes
  (RLIMIT_NPROC), no core dumps;
- a wall-clock timeout, then SIGKILL to the whole process group;
- new PID and IPC namespaces (and a network namespace with only a down loopback: no network),
  created with root or inside a new user namespace: the namespace's init dies with the run, taking
  every descendant, even ones that called ``setsid``, and SysV IPC objects with it;
- as root, ``setpriv`` switches to an unprivileged uid so RLIMIT_NPROC (ignored for root) stops
  fork bombs; no capability is kept (inheritable, ambient and bounding sets cleared, no_new_privs).

Which layers are available is probed once per process (``isolation()``); a missing layer is logged
once. ``reward.sandbox.require_isolation`` (default on Linux) turns a missing filesystem view into
an ``IsolationUnavailable`` error instead of a warning.

Expected outputs never enter the sandbox: stdout is compared by the caller. Assert-style tests
(``check``) reach the program's process on stdin, not as a file, and count only when the process
prints a per-run nonce after them (so ``sys.exit(0)`` before the asserts passes nothing); code in
the same process can still find them by introspection.
"""

from __future__ import annotations

import logging
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

from r1mega.config.schema import CodeSandboxConfig
from r1mega.platform.lifetime import exec_guard
from r1mega.rewards.sandbox_fs import (
    FILESYSTEMS,
    PROGRAM,
    WORKDIR,
    builder_available,
    bwrap_command,
    interpreter_view,
    setpriv,
    tmpfs_bytes,
    unshare_command,
)

log = logging.getLogger(__name__)

SANDBOX_UID_BASE = 200_000  # unprivileged uids used as root: base + pid % SANDBOX_UID_SPAN
SANDBOX_UID_SPAN = 50_000
# Creating and tearing down a network namespace occasionally takes several hundred ms (measured up to
# 0.8 s under load); the wall clock allows for it so a correct program is not failed for the kernel's time.
NAMESPACE_GRACE_S = 1.0
_SANDBOX_ERRORS = ("bwrap: ", "r1mega-sandbox: ", "setpriv: ", "unshare: ")  # the wrappers' own failures


class IsolationUnavailable(RuntimeError):
    """No private filesystem view here while ``reward.sandbox.require_isolation`` is on."""


@dataclass(frozen=True)
class Isolation:
    """How programs are isolated on this machine (see ``isolation()``)."""

    filesystem: str = ""  # private filesystem view built by "bwrap" or "unshare"; "": the host's
    namespaces: bool = False  # new PID + IPC namespaces (killing init kills all)
    network: bool = False  # ... and a network namespace (no network)
    user_namespace: bool = False  # ... created without root, inside a new user namespace
    drop_uid: bool = False  # runs as an unprivileged uid (RLIMIT_NPROC enforced)
    missing: str = field(default="", compare=False)  # why no filesystem view (for messages)

    @property
    def mode(self) -> str:
        parts = [self.filesystem, "user-namespace" if self.user_namespace else "namespaces" * self.namespaces,
                 "net" * self.network, "uid" * self.drop_uid]
        return "+".join(p for p in parts if p) or "none"

    def command(self, python_args: list[str], cfg: CodeSandboxConfig, uid: int, program: str,
                newroot: str) -> list[str]:
        """The full command running ``python_args`` (interpreter flags and script) under these layers."""
        if self.filesystem:
            view = interpreter_view(cfg.site_packages)
            argv = [view.python, *python_args]
            switch = uid if self.drop_uid else None
            size = tmpfs_bytes(cfg.memory_mb)
            if self.filesystem == "bwrap":
                return bwrap_command(view, program, size, self.network, self.user_namespace, switch) + argv
            return unshare_command(view, program, newroot, size, self.network, self.user_namespace, switch, argv)
        cmd: list[str] = []
        if self.namespaces:
            cmd += ["unshare", *(("--user", "--map-root-user") if self.user_namespace else ()), "--pid", "--ipc",
                    *(("--net",) if self.network else ()), "--fork", "--kill-child", "--"]
        if self.namespaces or self.drop_uid:
            cmd += setpriv(uid if self.drop_uid else None)
        return cmd + [sys.executable, *python_args]


@dataclass
class RunResult:
    status: str  # ok | error | timeout | memory | output_limit | sandbox_error
    returncode: Optional[int]
    stdout: str
    stderr: str
    wall_s: float


# Runs the program as __main__, then the assert-style check read from stdin (nonce line, then code);
# the nonce is printed only when both finished (a SystemExit(0) of the program still runs the check).
_BOOT = r"""import os, sys, types
def _boot(write=os.write):
    nonce, _, check = sys.stdin.read().partition("\n")
    check = compile(check, "<tests>", "exec")
    main = types.ModuleType("__main__")
    main.__file__ = "main.py"
    sys.modules["__main__"], sys.argv[:] = main, ["main.py"]
    with open("main.py", "rb") as f:
        program = compile(f.read(), "main.py", "exec")
    try:
        exec(program, main.__dict__)
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
    exec(check, main.__dict__)
    sys.stdout.flush()
    write(1, ("\n" + nonce + "\n").encode())
_boot()
"""


def _probe(iso: Isolation) -> tuple[bool, str]:
    """Whether the interpreter starts under ``iso`` *as the same interpreter* (an unprivileged uid that
    cannot read it may be handed another Python found by the system) and, with a filesystem view,
    whether a host directory is out of its sight. ``(ok, why not)``."""
    marker = tempfile.mkdtemp(prefix="r1mega-sandbox-probe-")
    try:
        source = "import os, sys; print(sys.version, sys.base_prefix, os.path.exists(sys.stdin.read()))"
        cfg = CodeSandboxConfig(wall_timeout_s=20.0, require_isolation=False)
        result = _run(source, marker, cfg, iso)
    finally:
        shutil.rmtree(marker, ignore_errors=True)
    want = f"{sys.version} {sys.base_prefix} {not iso.filesystem}"
    if result.status == "ok" and result.stdout.strip() == want:
        return True, ""
    return False, (result.stderr.strip().splitlines() or [f"{result.status}: {result.stdout.strip()!r}"])[-1]


def isolation(want_network_isolation: bool = True, filesystem: str = "auto") -> Isolation:
    """The strongest isolation this process can use for ``sys.executable`` (probed once per process).

    ``filesystem``: auto (bwrap, else unshare --mount) | bwrap | unshare | none (the host's view).
    """
    return _isolation(sys.executable, want_network_isolation, filesystem)


def _candidates(want_net: bool, filesystem: str) -> tuple[list[Isolation], list[str]]:
    """Layer combinations to probe, strongest first, and why a filesystem builder was not tried."""
    root = os.geteuid() == 0
    skipped: list[str] = []
    candidates: list[Isolation] = []
    for fs in FILESYSTEMS if filesystem == "auto" else () if filesystem == "none" else (filesystem,):
        if builder_available(fs):
            candidates.append(Isolation(fs, True, want_net, user_namespace=not root, drop_uid=root))
        else:
            skipped.append(f"{fs}: {'bwrap (package bubblewrap)' if fs == 'bwrap' else 'unshare'} or setpriv "
                           f"not installed")
    unshare, uid_switch = shutil.which("unshare") is not None, root and shutil.which("setpriv") is not None
    for ns in ([True, False] if unshare else [False]):
        if root:
            candidates += [Isolation("", ns, want_net and ns, drop_uid=True)] if uid_switch else []
            candidates += [Isolation("", ns, want_net and ns)] if ns else []
        elif ns:
            candidates.append(Isolation("", True, want_net, user_namespace=True))
    return candidates + [Isolation()], skipped


@lru_cache(maxsize=8)
def _isolation(python: str, want_network_isolation: bool, filesystem: str) -> Isolation:
    candidates, why = _candidates(want_network_isolation, filesystem)
    chosen = Isolation()
    for iso in candidates:
        ok, reason = _probe(iso)
        if ok:
            chosen = iso
            break
        if iso.filesystem:
            why.append(f"{iso.filesystem}: {reason}")
    if filesystem == "none":
        why.append("reward.sandbox.filesystem=none")
    if not chosen.filesystem:
        chosen = Isolation(chosen.filesystem, chosen.namespaces, chosen.network, chosen.user_namespace,
                           chosen.drop_uid, missing="; ".join(why))
        log.warning("code sandbox: no private filesystem view (%s); candidate programs can read every host "
                    "file their uid can, including datasets with the expected outputs%s", chosen.missing,
                    "" if filesystem == "none" else ". Install bubblewrap (apt-get install bubblewrap) or allow "
                    "user namespaces")
    elif why:
        log.warning("code sandbox: filesystem view built by %s, not %s (%s)", chosen.filesystem,
                    " or ".join(f for f in FILESYSTEMS if f != chosen.filesystem), "; ".join(why))
    if want_network_isolation and not chosen.network:
        log.warning("code sandbox: cannot create a network namespace here (needs root or unprivileged user "
                    "namespaces, and util-linux 'unshare'); candidate programs run WITH network access")
    if os.geteuid() == 0 and not chosen.drop_uid:
        log.warning("code sandbox: cannot run the interpreter as an unprivileged uid (util-linux 'setpriv' "
                    "missing, or the interpreter readable only by root and no filesystem view), so RLIMIT_NPROC "
                    "is not enforced for root; fork bombs are bounded only by the timeout%s",
                    " and the PID namespace" if chosen.namespaces else "")
    log.info("code sandbox isolation: %s", chosen.mode)
    return chosen


def require_isolation(iso: Isolation, cfg: CodeSandboxConfig) -> None:
    """Raise ``IsolationUnavailable`` when ``cfg`` requires a filesystem view that ``iso`` lacks."""
    if cfg.require_isolation and not iso.filesystem:
        raise IsolationUnavailable(
            f"code sandbox: reward.sandbox.require_isolation is on but programs would see the host's files "
            f"({iso.missing or 'isolation ' + iso.mode}). Install bubblewrap (apt-get install bubblewrap; "
            f"scripts/setup.sh does it as root), or run where user namespaces are allowed (root, or "
            f"unprivileged user namespaces) for the unshare --mount fallback; or set "
            f"reward.sandbox.require_isolation=false to score code without it")


def checked_isolation(cfg: CodeSandboxConfig) -> Isolation:
    """``isolation()`` for ``cfg``, refused (``IsolationUnavailable``) when it lacks a required layer."""
    iso = isolation(cfg.network_isolation, cfg.filesystem)
    require_isolation(iso, cfg)
    return iso


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
               iso: Optional[Isolation] = None, check: Optional[str] = None) -> RunResult:
    """Run ``source`` with ``stdin`` under the sandbox; never raises for anything the program does.

    ``check``: Python run after the program in its namespace (assert-style tests; ``stdin`` must be
    empty): status ``ok`` only if it ran to the end. Raises ``IsolationUnavailable`` (the machine's
    fault, not the program's) when ``cfg.require_isolation`` and there is no filesystem view.
    """
    cfg = cfg or CodeSandboxConfig()
    iso = iso or isolation(cfg.network_isolation, cfg.filesystem)
    require_isolation(iso, cfg)
    if check is not None and stdin:
        raise ValueError("run_python: a check reads stdin itself; pass stdin='' with check")
    return _run(source, stdin, cfg, iso, check)


def _run(source: str, stdin: str, cfg: CodeSandboxConfig, iso: Isolation, check: Optional[str] = None) -> RunResult:
    uid = _sandbox_uid()
    root = tempfile.mkdtemp(prefix="r1mega-sandbox-")
    start = time.monotonic()
    try:
        work = os.path.join(root, "work")
        os.mkdir(work)
        os.mkdir(os.path.join(root, "fs"))  # the unshare builder's mount point for the new root
        prog = os.path.join(work, PROGRAM)
        with open(prog, "w", encoding="utf-8") as f:
            f.write(source)
        nonce = secrets.token_hex(16) if check is not None else ""
        paths = {name: os.path.join(root, name) for name in ("stdin", "stdout", "stderr")}
        with open(paths["stdin"], "w", encoding="utf-8") as f:
            f.write(stdin if check is None else nonce + "\n" + check)
        if iso.drop_uid and not iso.filesystem:  # the program works in the host's directory
            os.chmod(root, 0o711)
            os.chown(work, uid, uid)
            os.chmod(prog, 0o644)
        limits = _limits(cfg, iso)
        flags = ["-I"] if cfg.site_packages else ["-I", "-S"]
        script = [PROGRAM] if check is None else ["-c", _BOOT]
        cmd = iso.command([*flags, *script], cfg, uid, prog, os.path.join(root, "fs"))

        def set_limits() -> None:  # runs in the child between fork and exec
            for kind, value in limits.items():
                resource.setrlimit(kind, value)

        home = WORKDIR if iso.filesystem else work
        with open(paths["stdin"], "rb") as fin, open(paths["stdout"], "wb") as fout, \
                open(paths["stderr"], "wb") as ferr:
            try:
                # dies with the caller (e.g. a killed reward worker), taking the namespace with it
                proc = subprocess.Popen(cmd, stdin=fin, stdout=fout, stderr=ferr, cwd=work,
                                        preexec_fn=exec_guard(set_limits),
                                        start_new_session=True, close_fds=True,
                                        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home})
            except OSError as exc:
                return RunResult("sandbox_error", None, "", f"cannot start the sandbox: {exc}", 0.0)
            grace = NAMESPACE_GRACE_S if iso.namespaces else 0.0
            returncode, cpu_s, timed_out = _wait(proc, cfg.wall_timeout_s + grace)
        if iso.filesystem == "bwrap" and returncode > 128:  # bwrap reports a signal death as 128 + signal
            returncode = 128 - returncode
        wall = time.monotonic() - start
        out_size = os.path.getsize(paths["stdout"])
        stdout = _read_capped(paths["stdout"], cfg.max_output_bytes)
        stderr = _read_capped(paths["stderr"], 64 << 10)
        cpu_killed = returncode != 0 and cpu_s >= limits[resource.RLIMIT_CPU][0] - 0.05
        status = _status(returncode, timed_out or cpu_killed, out_size, stderr, cfg)
        if check is not None:
            stdout, ran = _strip_nonce(stdout, nonce)
            if status == "ok" and not ran:
                status = "error"  # the process ended (os._exit, exec, ...) before its tests ran to the end
        return RunResult(status, returncode, stdout, stderr, wall)
    except Exception as exc:  # the caller is a trainer; report, never raise
        return RunResult("sandbox_error", None, "", f"{type(exc).__name__}: {exc}", time.monotonic() - start)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _strip_nonce(stdout: str, nonce: str) -> tuple[str, bool]:
    """The program's own output and whether the boot script printed the nonce as its last line."""
    tail = "\n" + nonce + "\n"
    return (stdout[: -len(tail)], True) if stdout.endswith(tail) else (stdout, False)


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
    if rc != 0 and stderr.startswith(_SANDBOX_ERRORS):
        return "sandbox_error"
    if out_size >= cfg.max_output_bytes or rc == -signal.SIGXFSZ or "File too large" in stderr:
        return "output_limit"
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        return "memory"
    return "ok" if rc == 0 else "error"
