"""Code sandbox probes: a program sees no host file and no other sample's file, under bubblewrap and
under the ``unshare --mount`` builder, as root and as an unprivileged user.

Each probe (``tests/sandbox_probes.py``) tries one thing a reward-hacking or hostile program would:
read /etc/shadow, a 0600 file in a 0700 root directory, /root, the JSONL file holding the test cases;
write the host's /tmp; leave a file for the next sample; reach a local server; exhaust processes,
memory, CPU, output or /tmp. The control test runs the same probes without the filesystem view and
sees the leaks, so the probes can tell.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from dataclasses import replace

import pytest
from sandbox_probes import BLOCKED, LEAK_PROBES, LIMITS, Targets, run_probes, write_dataset

from r1mega.config import ConfigError, R1Config, validate_config
from r1mega.config.schema import CodeSandboxConfig, RewardConfig, RewardTermConfig
from r1mega.rewards import RewardComputer, RewardInput, get_reward, isolation, run_python
from r1mega.rewards import sandbox as sandbox_mod
from r1mega.rewards.compute import check_reward_config
from r1mega.rewards.sandbox import IsolationUnavailable
from r1mega.rewards.sandbox_fs import FILESYSTEMS, interpreter_view, parents

pytestmark = pytest.mark.timeout(300)
ROOT = os.geteuid() == 0
UNPRIVILEGED_UID = 199_999  # below the sandbox's own uid range


def _cfg(filesystem: str, **kw) -> CodeSandboxConfig:
    return CodeSandboxConfig(**LIMITS, filesystem=filesystem, **kw)


def _need(filesystem: str) -> None:
    iso = isolation(True, filesystem)
    if iso.filesystem != filesystem:
        pytest.skip(f"no {filesystem} filesystem view here: {iso.missing}")


@pytest.fixture(scope="module")
def targets():
    """A root-only secret, a world-readable dataset outside /tmp, a loopback server; removed afterwards."""
    base = "/var/tmp" if os.access("/var/tmp", os.W_OK) else None
    secret_dir = tempfile.mkdtemp(prefix="r1mega-secret-", dir=base)  # 0700, the caller's (root's)
    data_dir = tempfile.mkdtemp(prefix="r1mega-data-", dir=base)
    os.chmod(data_dir, 0o755)
    secret = os.path.join(secret_dir, "key")
    with open(os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write("TOP-SECRET")
    view = interpreter_view(False)
    in_root = [p for p in (*view.ro_binds, *parents(view.ro_binds)) if p.startswith("/root/")]
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    t = Targets(secret=secret, secret_text="TOP-SECRET", dataset=write_dataset(data_dir, "only-in-the-dataset"),
                dataset_marker="only-in-the-dataset", root_allowed=sorted({p.split("/")[2] for p in in_root}),
                port=server.getsockname()[1], tmp_name=f"r1mega-probe-{uuid.uuid4().hex[:12]}")
    try:
        yield t
    finally:
        server.close()
        shutil.rmtree(secret_dir, ignore_errors=True)
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.mark.parametrize("filesystem", FILESYSTEMS)
def test_probes_are_blocked(filesystem, targets):
    _need(filesystem)
    iso = isolation(True, filesystem)
    assert iso.mode.startswith(filesystem) and iso.namespaces and iso.network
    assert iso.drop_uid == ROOT and iso.user_namespace == (not ROOT)
    verdicts = run_probes(targets, _cfg(filesystem))
    assert verdicts == {name: BLOCKED for name in verdicts}, verdicts


@pytest.mark.parametrize("filesystem", FILESYSTEMS)
def test_the_interpreter_runs_unprivileged_without_capabilities(filesystem):
    """The same interpreter, as the sandbox uid with no capability, even where its prefix sits under a
    directory only root may enter (here: a pyenv under /root): the view's own directories above the
    bind are world-searchable."""
    _need(filesystem)
    prefix = os.path.realpath(sys.base_prefix)
    program = ("import os, sys\n"
               "caps = [l.split()[1] for l in open('/proc/self/status')\n"
               "        if l.startswith(('CapEff', 'CapPrm', 'CapBnd', 'CapInh', 'CapAmb'))]\n"
               "print(os.getuid(), sys.version == %r, sys.base_prefix, set(caps))\n"
               "print([oct(os.stat(p).st_mode & 0o777) for p in %r])" % (sys.version, parents((prefix,))))
    result = run_python(program, "", _cfg(filesystem))
    assert result.status == "ok", result
    first, second = result.stdout.splitlines()
    uid, same, base, caps = first.split(maxsplit=3)
    assert same == "True" and base == sys.base_prefix and caps == "{'0000000000000000'}"
    assert (int(uid) != 0) if ROOT else int(uid) in (0, os.getuid())  # in a user namespace: root of it, or the user
    assert all(int(mode, 8) & 0o005 == 0o005 for mode in ast.literal_eval(second)), second


def test_the_probes_see_leaks_without_the_filesystem_view(targets):
    """The control: the same probes, run as before the filesystem view existed, get through."""
    iso = isolation(True, "none")
    verdicts = run_probes(targets, _cfg("none", require_isolation=False), iso, list(LEAK_PROBES))
    leaked = {name for name, v in verdicts.items() if v.startswith("LEAK")}
    assert {"dataset", "host_tmp", "cross_sample"} <= leaked, verdicts
    if ROOT and not iso.drop_uid:  # root with no filesystem view reads anything
        assert {"etc_shadow", "root_only_file", "list_root"} <= leaked, verdicts
    assert verdicts["loopback"] == BLOCKED  # the network namespace, as before


def _unprivileged(cmd: list[str], reach: tuple[str, ...] = ()) -> list[str]:
    """``cmd`` as UNPRIVILEGED_UID with no capability. Where the interpreter, or a path of ``reach`` (the
    checkout), sits under a directory only root may enter (/root/.pyenv, a 0700 mktemp clone), a private
    mount namespace lays a tmpfs over that directory with the path bound back, as if it were installed for
    everyone."""
    drop = ["setpriv", f"--reuid={UNPRIVILEGED_UID}", f"--regid={UNPRIVILEGED_UID}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--"]
    pairs = []
    for path in (os.path.realpath(sys.base_prefix), *map(os.path.realpath, reach)):
        closed = [p for p in parents((path,)) if not os.stat(p).st_mode & 0o001]
        if closed:
            pairs += [path, closed[0]]
    if not pairs:
        return drop + cmd
    script = ('set -e; while [ "$1" != -- ]; do stage=$(mktemp -d); mount --bind "$1" "$stage"; '
              'mount -t tmpfs -o mode=0755 tmpfs "$2"; mkdir -p "$1"; mount --move "$stage" "$1"; '
              'rmdir "$stage" 2>/dev/null || true; shift 2; done; shift; exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *pairs, "--", *drop, *cmd]


@pytest.mark.parametrize("filesystem", FILESYSTEMS)
def test_probes_as_an_unprivileged_user(filesystem, targets):
    if not ROOT:
        pytest.skip("already unprivileged: test_probes_are_blocked runs the probes as this user")
    if not (shutil.which("setpriv") and shutil.which("unshare")):
        pytest.skip("no util-linux setpriv/unshare to run a process as an unprivileged user")
    _need(filesystem)
    spec = {"filesystem": filesystem, "secret": targets.secret, "secret_text": targets.secret_text,
            "root_allowed": targets.root_allowed, "port": targets.port, "tmp_name": targets.tmp_name + "-u"}
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = _unprivileged([sys.executable, os.path.join(here, "tests", "sandbox_probes.py"), json.dumps(spec)],
                        reach=(here,))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd="/",
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": here})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["uid"] == UNPRIVILEGED_UID
    assert report["verdicts"] == {name: BLOCKED for name in report["verdicts"]}, report


def test_a_program_that_reads_the_dataset_gets_no_reward(targets):
    """Reward hacking end to end: the program looks its answer up in the training file."""
    tests = [json.loads(line) for line in open(targets.dataset)][0]["tests"]
    cheat = (f"import json, sys\nx = sys.stdin.read()\nfor line in open({targets.dataset!r}):\n"
             f"    for t in json.loads(line)['tests']:\n        if t['input'] == x:\n            print(t['output'])\n")
    sample = RewardInput(f"<think>look it up</think><answer>```python\n{cheat}```</answer>", data_source="code",
                         tests=tests)
    score = lambda sb: get_reward("code").fn(sample, RewardConfig(sandbox=sb))  # noqa: E731
    assert score(_cfg("auto")) == 0.0
    assert score(_cfg("none", require_isolation=False)) == 1.0  # what the program got before


def test_assert_tests_are_not_in_the_programs_files():
    """Assert-style tests reach the process on stdin: the program's files hold only the program, and
    leaving before the tests ran (exit 0) passes nothing."""
    _need("bwrap") if shutil.which("bwrap") else _need("unshare")
    cfg = _cfg("auto")
    peek = "import os\nprint(sorted(os.listdir('.')), '+ 0' + ' ==' in open('main.py').read())"
    result = run_python(peek, "", cfg, check="assert 1 + 1 + 0 == 2")
    assert result.status == "ok" and result.stdout == "['main.py'] False\n", result
    assert run_python("def f():\n    return 3", "", cfg, check="assert f() == 3").status == "ok"
    assert run_python("def f():\n    return 4", "", cfg, check="assert f() == 3").status == "error"
    for leave in ("raise SystemExit(0)", "import os\nos._exit(0)"):
        assert run_python(leave, "", cfg, check="assert False").status == "error"


@pytest.fixture
def no_sandbox_tools(monkeypatch, tmp_path):
    """A PATH without bwrap, unshare or setpriv: no layer can be had; the probe cache is reset around it."""
    monkeypatch.setenv("PATH", str(tmp_path))
    sandbox_mod._isolation.cache_clear()
    yield
    sandbox_mod._isolation.cache_clear()


def test_require_isolation_refuses_code_without_a_filesystem_view(no_sandbox_tools, caplog):
    with caplog.at_level(logging.WARNING, logger="r1mega.rewards.sandbox"):
        iso, again = isolation(), isolation()
    assert iso == again and iso.mode == "none" and "not installed" in iso.missing
    assert sum("no private filesystem view" in r.getMessage() for r in caplog.records) == 1  # logged once
    cfg = RewardConfig(terms=[RewardTermConfig("code", 1.0)], num_workers=0, sandbox=_cfg("auto"))
    with pytest.raises(IsolationUnavailable, match="bubblewrap.*require_isolation=false"):
        RewardComputer(cfg)
    with pytest.raises(IsolationUnavailable):
        run_python("print(1)", "", cfg.sandbox)
    lax = replace(cfg.sandbox, require_isolation=False)
    assert run_python("print(1)", "", lax).stdout == "1\n"  # the warning path: scored, without the view


def test_sandbox_config_is_validated():
    for sandbox, words in ((CodeSandboxConfig(filesystem="chroot"), "reward.sandbox.filesystem='chroot'"),
                           (CodeSandboxConfig(filesystem="none"), "require_isolation=false")):
        with pytest.raises(ConfigError, match=words):
            check_reward_config(RewardConfig(sandbox=sandbox))
        cfg = R1Config()
        cfg.reward.sandbox = sandbox
        with pytest.raises(ConfigError, match=words):
            validate_config(cfg, world_size=1)
    check_reward_config(RewardConfig(sandbox=CodeSandboxConfig(filesystem="none", require_isolation=False)))
    assert CodeSandboxConfig().require_isolation == sys.platform.startswith("linux")
