"""Context parallelism: megatron's load-balanced layout, the local-spec CP attention (K/V all-gathered over
the CP group, dK/dV reduce-scattered back), and whole training steps under cp2 layouts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import r1mega.models  # noqa: F401  (readies megatron for this machine)
from r1mega.models.context_parallel import gathered_index, segment_of, token_index
from r1mega.platform.spawn import spawn_ranks


def test_load_balanced_layout_per_segment():
    # one sequence of 8 over cp2: 4 chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert token_index([0, 8], 2, 0).tolist() == [0, 1, 6, 7]
    assert token_index([0, 8], 2, 1).tolist() == [2, 3, 4, 5]
    # packed: every segment on its own (a 4-token segment gives one token per chunk)
    assert token_index([0, 8, 12], 2, 1).tolist() == [2, 3, 4, 5, 9, 10]
    assert gathered_index([0, 4], 2).tolist() == [0, 3, 1, 2]
    assert segment_of(torch.tensor([0, 7, 8, 11]), [0, 8, 12]).tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="pad every sequence to a multiple of 2\\*cp"):
        token_index([0, 6], 2, 0)


def _attention_errors(tmp_path, break_reduce: bool) -> dict:
    out = tmp_path / "result.json"
    spec = json.dumps({"out": str(out), "break_reduce": break_reduce})
    spawn_ranks([str(Path(__file__).parent / "cp_attention_worker.py"), spec], 2, timeout_s=120, name="cp-attention")
    result = json.loads(out.read_text())
    print(json.dumps(result), file=sys.stderr)
    return result


@pytest.mark.timeout(180)
def test_cp_attention_equals_one_process_padded_and_packed(tmp_path):
    """cp2: outputs and dQ/dK/dV on each rank's positions equal full-sequence attention (GQA; a padded
    batch of 2 rows, and a packed row of 4 segments)."""
    for case, errs in _attention_errors(tmp_path, break_reduce=False).items():
        for name in ("out", "dq", "dk", "dv"):
            assert errs[name] < 1e-5, (case, name, errs)


@pytest.mark.timeout(180)
def test_unreduced_kv_gradient_is_caught(tmp_path):
    """A gather whose backward only splits (megatron's ``gather`` mapping) leaves each rank with its own
    queries' share of dK/dV: the comparison must fail on dK and dV, not on the outputs or dQ."""
    for case, errs in _attention_errors(tmp_path, break_reduce=True).items():
        assert errs["out"] < 1e-5 and errs["dq"] < 1e-5, (case, errs)
        assert errs["dk"] > 0.05 * errs["scale"] and errs["dv"] > 0.05 * errs["scale"], (case, errs)
