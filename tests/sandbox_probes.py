"""Hostile programs for the code sandbox's tests: each tries to reach a host file, another sample's
files or the network, or to exhaust a resource; ``run_probes`` judges what got through.

Also a driver, so the same probes run as another (unprivileged) user:

    python tests/sandbox_probes.py '{"filesystem": "bwrap", "secret": "/path", ...}'   # prints JSON

A verdict is ``"blocked"`` or a string starting with ``LEAK`` / ``WRONG`` saying what went wrong.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional

from r1mega.config.schema import CodeSandboxConfig
from r1mega.rewards.sandbox import Isolation, RunResult, run_python

LIMITS = dict(wall_timeout_s=0.5, memory_mb=256, max_output_bytes=64 << 10, max_processes=16)
BLOCKED = "blocked"
SLOW_WALL_S = 10.0  # wall limit of the runs that test what is visible, not the clock


@dataclass
class Targets:
    """Host things the probes go after (made by the test; the driver adds its own dataset)."""

    secret: str = ""  # a 0600 file in a 0700 directory, both root's
    secret_text: str = ""
    dataset: str = ""  # the JSONL file holding the test cases
    dataset_marker: str = ""  # an expected output that is only in the dataset
    root_allowed: list[str] = field(default_factory=list)  # /root entries the view may show (the interpreter's)
    port: int = 0  # a listening loopback server
    tmp_name: str = "r1mega-probe-x"  # a file name the probes write into /tmp


def _try(body: str) -> str:
    """Program text: run ``body`` (which prints LEAK ... on success) and print BLOCKED on OSError."""
    indented = "\n".join("    " + line for line in body.splitlines())
    return f"try:\n{indented}\nexcept OSError as e:\n    print({BLOCKED!r}, type(e).__name__)\n"


def _read(path: str, label: str) -> str:
    return _try(f"data = open({path!r}).read()\nprint('LEAK', {label!r}, data[:40].replace(chr(10), ' '))")


def _verdict(result: RunResult) -> str:
    if result.status != "ok":
        return f"WRONG status {result.status}: {result.stderr[-300:]}"
    return result.stdout.strip() if "LEAK" in result.stdout else BLOCKED


def _leak_checks(t: Targets, cfg: CodeSandboxConfig, iso: Optional[Isolation]) -> dict[str, Callable[[], str]]:
    slow = replace(cfg, wall_timeout_s=SLOW_WALL_S)  # these are not about time; a loaded machine is slow
    run = lambda source, stdin="": run_python(source, stdin, slow, iso)  # noqa: E731
    checks: dict[str, Callable[[], str]] = {
        "etc_shadow": lambda: _verdict(run(_read("/etc/shadow", "/etc/shadow"))),
        "root_only_file": lambda: _verdict(run(_read(t.secret, "0600 file in a 0700 root dir"))),
        "dataset": lambda: _verdict(run(_read(t.dataset, "the test cases"))),
        "list_root": lambda: _verdict(run(_try(
            f"extra = sorted(set(__import__('os').listdir('/root')) - set({t.root_allowed!r}))\n"
            f"print('LEAK /root lists', extra) if extra else print({BLOCKED!r})"))),
        "loopback": lambda: _verdict(run(_try(
            f"__import__('socket').create_connection(('127.0.0.1', {t.port}), timeout=1)\n"
            f"print('LEAK connected to a local server')"))),
    }

    def host_tmp() -> str:
        host = os.path.join("/tmp", t.tmp_name)
        result = run(_try(f"open('/tmp/{t.tmp_name}', 'w').write('x')\nprint('wrote')"))
        leaked = os.path.exists(host)
        if leaked:
            os.unlink(host)
        return f"LEAK the host's {host} was written" if leaked else (
            BLOCKED if result.stdout.startswith("wrote") else f"WRONG {result}")

    def cross_sample() -> str:
        places = [f"/tmp/{t.tmp_name}-ab", f"{t.tmp_name}-ab", f"/dev/shm/{t.tmp_name}-ab"]
        writer = "".join(_try(f"open({p!r}, 'w').write('from A')\nprint('wrote', {p!r})") for p in places)
        wrote = run(writer)
        reader = "".join(_read(p, f"sample A's {p}") for p in places)
        verdict = _verdict(run(reader))
        for p in places:  # where the view is the host's, clean up what A left
            if os.path.isabs(p) and os.path.exists(p):
                os.unlink(p)
        return verdict if "wrote" in wrote.stdout else f"WRONG sample A wrote nothing: {wrote}"

    checks["host_tmp"] = host_tmp
    checks["cross_sample"] = cross_sample
    return checks


def _resource_checks(cfg: CodeSandboxConfig, iso: Optional[Isolation]) -> dict[str, Callable[[], str]]:
    """The bombs keep their old outcomes under the filesystem view, and the sandbox still works after."""
    def expect(source: str, *statuses: str, wall_s: Optional[float] = None) -> Callable[[], str]:
        def check() -> str:
            result = run_python(source, "", replace(cfg, wall_timeout_s=wall_s or cfg.wall_timeout_s), iso)
            after = run_python("print('still fine')", "", replace(cfg, wall_timeout_s=SLOW_WALL_S), iso)
            if result.status not in statuses or len(result.stdout) > cfg.max_output_bytes:
                return f"WRONG {statuses} expected, got {result.status}: {result.stderr[-200:]}"
            return BLOCKED if after.stdout == "still fine\n" else f"WRONG sandbox broken after: {after}"
        return check

    def tmpfs_fill() -> str:  # tmpfs pages escape RLIMIT_AS: /tmp is capped at half the memory limit
        chunk = cfg.max_output_bytes - 1  # RLIMIT_FSIZE caps each file
        source = (f"n = 0\ntry:\n    while True:\n        open(f'/tmp/f{{n}}', 'wb').write(b'x' * {chunk})\n"
                  f"        n += 1\nexcept OSError as e:\n    print(n * {chunk}, e.errno)\n")
        result = run_python(source, "", replace(cfg, wall_timeout_s=SLOW_WALL_S), iso)
        written, errno = (result.stdout.split() + ["-1", "?"])[:2]
        if result.status != "ok" or errno != "28" or not 0 < int(written) <= (cfg.memory_mb // 2) << 20:
            return f"WRONG /tmp not capped: {result.status} wrote {written} bytes, errno {errno} {result.stderr[-200:]}"
        return BLOCKED

    return {
        "fork_bomb": expect("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                            "timeout"),
        "memory_bomb": expect("x = []\nwhile True:\n    x.append(' ' * 10**6)", "memory", wall_s=SLOW_WALL_S),
        "busy_loop": expect("while True:\n    pass", "timeout"),
        "huge_output": expect("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", "output_limit",
                              wall_s=SLOW_WALL_S),
        "tmpfs_fill": tmpfs_fill,
    }


def run_probes(t: Targets, cfg: CodeSandboxConfig, iso: Optional[Isolation] = None,
               names: Optional[list[str]] = None) -> dict[str, str]:
    """``{probe: verdict}`` for the named probes (all by default)."""
    checks = {**_leak_checks(t, cfg, iso), **_resource_checks(cfg, iso)}
    return {name: checks[name]() for name in (names or checks)}


LEAK_PROBES = ("etc_shadow", "root_only_file", "dataset", "list_root", "loopback", "host_tmp", "cross_sample")


def write_dataset(directory: str, marker: str) -> str:
    """A world-readable JSONL training file whose code sample's tests hold ``marker`` as an expected output."""
    path = os.path.join(directory, "train.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"prompt": "add", "data_source": "code",
                            "tests": [{"input": "1 2\n", "output": marker}]}) + "\n")
    os.chmod(path, 0o644)
    return path


def main() -> None:
    """Driver: run the probes as this process's user; ``argv[1]``: Targets fields + filesystem + names."""
    spec = json.loads(sys.argv[1])
    fs, names = spec.pop("filesystem"), spec.pop("names", None)
    targets = Targets(**spec)
    with tempfile.TemporaryDirectory() as data, socket.socket() as server:
        targets.dataset_marker = "only-in-the-dataset"
        targets.dataset = write_dataset(data, targets.dataset_marker)
        if not targets.port:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            targets.port = server.getsockname()[1]
        cfg = CodeSandboxConfig(**LIMITS, filesystem=fs)
        print(json.dumps({"uid": os.getuid(), "verdicts": run_probes(targets, cfg, names=names),
                          "targets": asdict(targets)}))


if __name__ == "__main__":
    main()
