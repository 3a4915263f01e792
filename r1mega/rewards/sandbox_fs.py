"""The private filesystem view a sandboxed program sees, and the commands that build it.

A program scored by the code reward must not read the trainer's files (datasets holding the hidden
test cases, checkpoints, credentials) nor leave files for a later program. Each run gets a new mount
namespace whose root is an empty read-only tmpfs holding only:

- read-only binds of what the interpreter needs: ``/usr``, ``/lib*`` (or their merged-usr
  symlinks), the interpreter's prefix (and the venv when ``site_packages`` is on), and the few
  ``/etc`` files Python reads;
- ``/dev/null``, ``/dev/zero``, ``/dev/urandom`` and a fresh ``/proc`` of the program's own PID
  namespace;
- fresh size-capped tmpfs mounts as ``/tmp`` and as the working directory ``/sandbox``, which
  holds the program (``main.py``).

Binding the interpreter's prefix at its own path is what makes an interpreter under a directory
only root may enter (``/root/.pyenv``) usable by the unprivileged sandbox uid: the bind replaces
the path's parents with directories of the new root, so no capability is needed to reach it.

Two builders of the same view: bubblewrap (``bwrap``) where installed, else ``unshare --mount``
running ``sandbox_root.py``, a stdlib-only helper that does the mounts and ``pivot_root`` itself.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

WORKDIR = "/sandbox"  # the program's working directory (and HOME) inside the view
PROGRAM = "main.py"
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom")
ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime")  # what the loader and time.localtime read
_TOP_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
FILESYSTEMS = ("bwrap", "unshare")  # the builders, in order of preference
ROOT_HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_root.py")
# Dropping to the sandbox uid inside the view needs these for setpriv; it then drops every capability.
_UID_SWITCH_CAPS = "CAP_SETUID,CAP_SETGID,CAP_SETPCAP"


@dataclass(frozen=True)
class View:
    """What is visible inside the sandbox besides its two tmpfs mounts."""

    ro_binds: tuple[str, ...]  # host paths bound read-only at the same path
    symlinks: tuple[tuple[str, str], ...]  # (target, path) for top-level merged-usr links like /lib -> usr/lib
    python: str  # interpreter path, valid inside the view


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


@lru_cache(maxsize=4)
def interpreter_view(site_packages: bool) -> View:
    """The view for ``sys.executable``: with ``site_packages`` the venv's interpreter and packages,
    else the base interpreter alone (stdlib only: the venv and the project stay out of sight)."""
    binds: list[str] = ["/usr"]
    links: list[tuple[str, str]] = []
    for top in _TOP_DIRS:
        if os.path.islink(top):
            links.append((os.readlink(top), top))
        elif os.path.isdir(top):
            binds.append(top)
    # Stdlib only: the base interpreter itself (a venv's python, even a copied one, would need the venv).
    base = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    python = os.path.abspath(sys.executable) if site_packages else base
    prefixes = [sys.base_prefix, sys.base_exec_prefix, os.path.dirname(base),
                os.path.dirname(os.path.realpath(python))]
    if site_packages:
        prefixes += [sys.prefix, sys.exec_prefix]
    for path in [os.path.realpath(p) for p in prefixes] + [p for p in ETC_FILES if os.path.exists(p)]:
        if not _under(path, binds):
            binds = [b for b in binds if not _under(b, [path])] + [path]
    return View(tuple(binds), tuple(links), python)


def parents(paths: tuple[str, ...]) -> list[str]:
    """Directories to create (world-searchable) above ``paths``, parents first."""
    out: list[str] = []
    for path in paths:
        parent = os.path.dirname(path)
        chain = []
        while parent != "/" and parent not in out and not _under(parent, list(paths)):
            chain.append(parent)
            parent = os.path.dirname(parent)
        out += reversed(chain)
    return out


def tmpfs_bytes(memory_mb: int) -> int:
    """Size cap of each of /tmp and the working directory: together at most the memory limit (tmpfs
    pages are not counted by RLIMIT_AS)."""
    return max(1, memory_mb // 2) << 20


def bwrap_command(view: View, program: str, tmp_bytes: int, network: bool, user_namespace: bool,
                  uid: Optional[int]) -> list[str]:
    """``bwrap`` arguments up to the interpreter; ``uid`` (as root): switch to it inside, no capability kept."""
    cmd = ["bwrap", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent"]
    cmd += ["--unshare-net"] if network else []
    cmd += ["--unshare-user"] if user_namespace else []
    for path in parents(view.ro_binds):  # bwrap would copy the host's modes: /root stays 0700
        cmd += ["--perms", "0755", "--dir", path]
    for path in view.ro_binds:
        cmd += ["--ro-bind", path, path]
    for target, path in view.symlinks:
        cmd += ["--symlink", target, path]
    cmd += ["--dir", "/dev"]
    for dev in DEVICES:
        cmd += ["--dev-bind", dev, dev]
    cmd += ["--proc", "/proc"]
    for mount in ("/tmp", WORKDIR):
        cmd += ["--perms", "1777", "--size", str(tmp_bytes), "--tmpfs", mount]
    cmd += ["--ro-bind", program, f"{WORKDIR}/{PROGRAM}", "--remount-ro", "/", "--chdir", WORKDIR]
    if uid is not None:
        cmd += ["--cap-add", _UID_SWITCH_CAPS, "--", *setpriv(uid)]
    else:
        cmd.append("--")
    return cmd


def unshare_command(view: View, program: str, newroot: str, tmp_bytes: int, network: bool,
                    user_namespace: bool, uid: Optional[int], argv: list[str]) -> list[str]:
    """``unshare --mount`` + ``sandbox_root.py`` building the same view as ``bwrap_command``, then
    exec'ing ``argv`` (the interpreter's); ``newroot`` is an empty host directory to mount it on."""
    opts = ["--newroot", newroot, "--tmp-bytes", str(tmp_bytes), "--workdir", WORKDIR,
            "--program", program, f"{WORKDIR}/{PROGRAM}"]
    for path in view.ro_binds:
        opts += ["--ro", path]
    for target, path in view.symlinks:
        opts += ["--link", target, path]
    for dev in DEVICES:
        opts += ["--dev", dev]
    cmd = ["unshare", *(("--user", "--map-root-user") if user_namespace else ()), "--mount",
           "--propagation", "private", "--pid", "--ipc", "--uts", *(("--net",) if network else ()),
           "--fork", "--kill-child", "--"]
    return cmd + [os.path.realpath(sys.executable), "-I", "-S", ROOT_HELPER, *opts, "--", *setpriv(uid), *argv]


def setpriv(uid: Optional[int]) -> list[str]:
    """``setpriv`` keeping no capability (inheritable, ambient, bounding) and, with ``uid``, switching to it."""
    ids = [f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid is not None else []
    return [shutil.which("setpriv") or "setpriv", *ids, "--inh-caps=-all", "--bounding-set=-all",
            "--no-new-privs", "--"]


def builder_available(name: str) -> bool:
    """Whether the tools of builder ``name`` are installed (whether it works here is probed)."""
    tools = {"bwrap": ("bwrap", "setpriv"), "unshare": ("unshare", "setpriv")}[name]
    return all(shutil.which(t) for t in tools)
