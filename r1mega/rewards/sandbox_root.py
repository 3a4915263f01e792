"""Build the sandbox's filesystem view inside a fresh mount namespace, then exec the program.

Run by ``unshare --mount ... python -I -S sandbox_root.py OPTIONS -- PROGRAM...`` where bubblewrap
is not installed (``sandbox_fs.unshare_command`` writes the options, see ``ARITY``). Stdlib only, no
r1mega import and no json (its import alone costs more than the mounts): it runs under ``-I -S``
before the host filesystem is detached, once per program. As (namespace) root it mounts an empty
tmpfs on ``newroot``, binds the listed host paths read-only, adds the device nodes, a fresh /proc
and two size-capped tmpfs (/tmp and the working directory), copies the program in, makes the root
read-only, ``pivot_root``s into it and detaches the host's tree; then execs ``exec`` (setpriv, which
drops every capability and, as real root, the uid). Exit status 125 and a ``r1mega-sandbox:``
message when the view cannot be built.
"""

import ctypes
import os
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
# statvfs f_flag bits a read-only remount of a bind must keep (locked in a user namespace) -> MS_ flags
_KEEP_FLAGS = {2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: 1024, 2048: 2048, 4096: 1 << 21}
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "ppc64": 203, "s390x": 217}
HELPER_FAILED = 125
# option -> number of values; --ro/--link/--dev repeat, the others are given once
ARITY = {"--newroot": 1, "--tmp-bytes": 1, "--workdir": 1, "--program": 2, "--ro": 1, "--link": 2, "--dev": 1}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source, target: str, fstype, flags: int, data=None) -> None:
    enc = [None if v is None else v.encode() for v in (source, target, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], flags, enc[3]), f"mount {source or fstype} on {target}")


def _bind_readonly(source: str, target: str) -> None:
    _mount(source, target, None, MS_BIND)
    kept = os.statvfs(target).f_flag
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
    for bit, ms in _KEEP_FLAGS.items():
        flags |= ms if kept & bit else 0
    _mount(None, target, None, flags)


def _mountpoint(path: str, directory: bool) -> None:
    """An empty directory or file at ``path`` (inside the new root) to mount on."""
    os.makedirs(path if directory else os.path.dirname(path), exist_ok=True)
    if not directory and not os.path.exists(path):
        open(path, "w").close()


def parse(args: list[str]) -> tuple[dict[str, list[list[str]]], list[str]]:
    """``(values per option, the argv to exec)`` from ``OPTIONS -- PROGRAM...``."""
    spec: dict[str, list[list[str]]] = {key: [] for key in ARITY}
    i = 0
    while args[i] != "--":
        n = ARITY[args[i]]
        spec[args[i]].append(args[i + 1: i + 1 + n])
        i += 1 + n
    return spec, args[i + 1:]


def build(spec: dict[str, list[list[str]]]) -> None:
    new, size, workdir = spec["--newroot"][0][0], spec["--tmp-bytes"][0][0], spec["--workdir"][0][0]
    os.umask(0o022)  # directories made above the binds (e.g. /root for /root/.pyenv) are world-searchable
    inside = lambda p: new + p  # noqa: E731
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    _mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for (path,) in spec["--ro"]:
        _mountpoint(inside(path), os.path.isdir(path))
        _bind_readonly(path, inside(path))
    for target, path in spec["--link"]:
        os.symlink(target, inside(path))
    for (dev,) in spec["--dev"]:
        _mountpoint(inside(dev), False)
        _mount(dev, inside(dev), None, MS_BIND)
    _mountpoint(inside("/proc"), True)
    _mount("proc", inside("/proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for path in ("/tmp", workdir):
        _mountpoint(inside(path), True)
        _mount("tmpfs", inside(path), "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=1777")
    source, dest = spec["--program"][0]
    with open(source, "rb") as f, open(inside(dest), "wb") as g:
        g.write(f.read())
    os.chmod(inside(dest), 0o644)
    _mount(None, new, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    machine = os.uname().machine
    if machine not in _PIVOT_ROOT:
        raise OSError(f"pivot_root: no syscall number known for {machine} (install bubblewrap)")
    os.chdir(new)
    _check(_libc.syscall(_PIVOT_ROOT[machine], b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "detach the host's root")
    os.chdir(workdir)


def main() -> None:
    spec, argv = parse(sys.argv[1:])
    try:
        build(spec)
    except OSError as exc:
        sys.stderr.write(f"r1mega-sandbox: cannot build the filesystem view: {exc}\n")
        sys.exit(HELPER_FAILED)
    try:
        os.execv(argv[0], argv)
    except OSError as exc:
        sys.stderr.write(f"r1mega-sandbox: cannot start {argv[0]}: {exc}\n")
        sys.exit(HELPER_FAILED)


if __name__ == "__main__":
    main()
