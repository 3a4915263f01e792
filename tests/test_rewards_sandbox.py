"""Code reward sandbox: hostile programs get a reward of 0 and the test process (the trainer) lives on.

Covers timeout (busy loop and sleep), memory bomb, fork bomb, network access, huge output, crashes,
escape attempts and clean-up of the temporary working directory. The filesystem view's probes (host
files, other samples' files, as root and unprivileged) are in test_rewards_sandbox_probes.py.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import replace

import pytest

from r1mega.config.schema import CodeSandboxConfig, RewardConfig
from r1mega.rewards import RewardInput, extract_code, get_reward, isolation, run_python, run_tests
from r1mega.rewards.sandbox import SANDBOX_UID_BASE, SANDBOX_UID_SPAN, Isolation
from r1mega.rewards.sandbox_fs import WORKDIR

CFG = CodeSandboxConfig(wall_timeout_s=0.5, memory_mb=256, max_output_bytes=64 << 10, max_processes=16)
HOST_VIEW = replace(CFG, require_isolation=False)  # runs without the filesystem view (controls, degraded path)
ADD = "a, b = map(int, input().split())\nprint(a + b)\n"
ADD_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6"}]

pytestmark = pytest.mark.timeout(60)


def code_reward(program: str, tests=ADD_TESTS) -> float:
    response = f"<think>write it</think><answer>```python\n{program}\n```</answer>"
    return get_reward("code").fn(RewardInput(response, data_source="code", tests=tests), RewardConfig(sandbox=CFG))


def test_correct_and_partially_correct_programs():
    assert code_reward(ADD) == 1.0
    assert code_reward("a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)") == 0.5
    assert code_reward("print(0)") == 0.0


def test_assert_style_tests():
    program = "def add(a, b):\n    return a + b"
    assert code_reward(program, [{"assert": "assert add(1, 2) == 3"}, {"assert": "assert add(2, 2) == 5"}]) == 0.5


def test_no_program_or_syntax_error_scores_zero_without_running():
    fn = get_reward("code").fn
    assert fn(RewardInput("<think>x</think><answer>no code here</answer>", data_source="code",
                          tests=ADD_TESTS), RewardConfig(sandbox=CFG)) == 0.0
    score, statuses = run_tests("def broken(:\n", ADD_TESTS, CFG)
    assert score == 0.0 and statuses == {"syntax_error": 2}


def test_extract_code_prefers_the_last_fenced_block_of_the_answer():
    response = "<think>```python\nprint('draft')\n```</think>```py\nprint(1)\n```\nthen\n```python\nprint(2)\n```"
    assert extract_code(response) == "print(2)\n"
    assert extract_code("<think>x</think>print(3)") == "print(3)"  # unfenced but valid Python
    assert extract_code("<think>unfinished reasoning") is None


def test_busy_loop_and_sleep_time_out():
    for program in ("while True:\n    pass", "import time\ntime.sleep(60)"):
        t0 = time.monotonic()
        result = run_python(program, "", CFG)
        assert result.status == "timeout"
        assert time.monotonic() - t0 < CFG.wall_timeout_s + 3
    assert code_reward("while True:\n    pass") == 0.0


def test_timeout_skips_the_remaining_cases():
    t0 = time.monotonic()
    score, statuses = run_tests("import time\ntime.sleep(60)", ADD_TESTS * 3, CFG)
    assert score == 0.0 and statuses["timeout"] == 1 and statuses["skipped_after_timeout"] == 5
    assert time.monotonic() - t0 < 2 * CFG.wall_timeout_s + 3


def test_memory_bomb():
    slow = replace(CFG, wall_timeout_s=10.0)  # filling 256 MB takes a while on a loaded machine
    for program in ("x = bytearray(10**10)", "x = []\nwhile True:\n    x.append(' ' * 10**6)"):
        assert run_python(program, "", slow).status == "memory"
    assert code_reward("x = bytearray(10**10)\n" + ADD) == 0.0


def _live_sandbox_processes() -> list[int]:
    """Processes still running as a sandbox uid (zombies excluded: they are dead, awaiting reaping)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                uid = os.stat(f"/proc/{entry}").st_uid
                state = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if SANDBOX_UID_BASE <= uid < SANDBOX_UID_BASE + SANDBOX_UID_SPAN and state not in "ZX":
                out.append(int(entry))
    return out


def test_fork_bomb():
    iso = isolation()
    if os.geteuid() == 0 and not (iso.drop_uid or iso.namespaces):
        pytest.skip("no uid switch or PID namespace here: a fork bomb would run as root, unbounded")
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run_python(bomb, "", CFG)
    assert result.status == "timeout"
    assert code_reward(bomb + ADD) == 0.0
    if iso.drop_uid:
        deadline = time.monotonic() + 5
        while _live_sandbox_processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _live_sandbox_processes() == [], "fork bomb processes survived the sandbox"
    assert run_python("print('still fine')", "", CFG).stdout == "still fine\n"


def test_network_is_unreachable():
    if not isolation().network:
        pytest.skip("no network namespace on this machine (logged as a warning by the sandbox)")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    program = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
               f"    print('connected')\nexcept OSError as e:\n    print('blocked', type(e).__name__)\n")
    try:
        result = run_python(program, "", CFG)
        assert result.status == "ok" and result.stdout.startswith("blocked"), result
        # the same program outside the sandbox does connect: the test itself can tell the difference
        unsandboxed = run_python(program, "", HOST_VIEW, iso=Isolation())
        assert unsandboxed.stdout.startswith("connected")
    finally:
        server.close()


def test_huge_output_is_capped():
    slow = replace(CFG, wall_timeout_s=5.0)  # the cap, not the clock, must stop it (even on a loaded machine)
    for program in ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", "print('y' * 10**8)"):
        t0 = time.monotonic()
        result = run_python(program, "", slow)
        assert result.status == "output_limit", result
        assert len(result.stdout) <= CFG.max_output_bytes
        assert time.monotonic() - t0 < slow.wall_timeout_s
    assert code_reward("print('y' * 10**8)") == 0.0


def test_crashes():
    assert run_python("raise ValueError('boom')", "", CFG).status == "error"
    assert run_python("import ctypes\nctypes.string_at(0)", "", CFG).status == "error"  # segfault
    assert run_python("import os\nos.abort()", "", CFG).status == "error"
    assert code_reward("raise SystemExit(3)") == 0.0


def test_workdir_is_removed_and_outside_is_protected(tmp_path):
    program = (f"import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd())\n"
               f"try:\n    open({str(tmp_path / 'owned.txt')!r}, 'w').write('x')\n    print('wrote')\n"
               f"except OSError:\n    print('denied')\n")
    result = run_python(program, "", CFG)
    assert result.status == "ok", result
    workdir, outcome = result.stdout.split()
    if isolation().filesystem:  # a private tmpfs, gone with the mount namespace
        assert workdir == WORKDIR
    else:
        assert not os.path.exists(workdir)
    if isolation().drop_uid or isolation().filesystem:
        assert outcome == "denied" and not (tmp_path / "owned.txt").exists()


def test_degraded_isolation_still_limits_time_and_output():
    plain = Isolation()
    assert run_python(ADD, "2 3\n", HOST_VIEW, iso=plain).stdout == "5\n"
    assert run_python("while True:\n    pass", "", HOST_VIEW, iso=plain).status == "timeout"
    assert run_python("print('z' * 10**7)", "", HOST_VIEW, iso=plain).status == "output_limit"
