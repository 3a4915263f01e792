"""tools/bench_rollout.py: the balance part and the last line's format (``--no-engines``: no vLLM here)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_rollout.py"


def _tool():
    spec = importlib.util.spec_from_file_location("bench_rollout", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_last_line_reports_both_splits_and_no_made_up_wall_times(capsys):
    assert _tool().main(["--no-engines", "--dp", "4", "--prompts", "16", "--group", "8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert not any(line.startswith("engines=") for line in lines)  # no engine numbers without engines
    m = re.fullmatch(r"rollout_engines=\[1,2,4\] wall_s=skipped dp_imbalance_contiguous=(\S+) "
                     r"dp_imbalance_balanced=(\S+)", lines[-1])
    assert m, lines[-1]
    contiguous, balanced = float(m.group(1)), float(m.group(2))
    assert 1.0 <= balanced <= 1.05 < contiguous


@pytest.mark.parametrize("argv,phrase", [(["--engines", "1,x"], "give engine counts like 1,2,4"),
                                         (["--engines", "0"], "give positive engine counts"),
                                         (["--dp", "3"], "must split over --dp 3")])
def test_bad_arguments_are_refused(argv, phrase, capsys):
    with pytest.raises(SystemExit):
        _tool().main(argv)
    assert phrase in capsys.readouterr().err


def test_peak_rss_counts_a_process_and_its_children():
    """The per-engine memory figure: VmHWM of the engine process plus its workers."""
    pytest.importorskip("psutil")
    alone = _tool().peak_rss_mib(os.getpid())
    assert alone > 20  # this interpreter with torch imported
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(200 << 20); time.sleep(30)"])
    try:
        deadline = time.monotonic() + 30
        while _tool().peak_rss_mib(os.getpid()) - alone < 150:
            assert time.monotonic() < deadline, "the child's 200 MiB never showed up"
            time.sleep(0.1)
    finally:
        child.kill()
        child.wait(timeout=30)
