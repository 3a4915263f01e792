"""The CPU emulation's gloo collectives and CUDA stand-ins, checked on 2 real processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1mega.platform.spawn import spawn_ranks

WORKER = Path(__file__).with_name("emulation_worker.py")
ALONE_WORKER = Path(__file__).with_name("gloo_alone_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("emu") / "out"
    spawn_ranks([str(WORKER), str(out)], world_size=2, timeout_s=120, name="emulation")
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]


@pytest.mark.timeout(180)
def test_uneven_all_gather(results):
    for r in results:
        assert r["all_gather"] == [[[0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]]


@pytest.mark.timeout(180)
def test_uneven_all_to_all_single(results):
    # rank 0 receives 1 row from itself (value 0) and 2 rows from rank 1 (value 10)
    assert results[0]["all_to_all"] == [0.0, 10.0, 10.0]
    # rank 1 receives 2 rows from rank 0 (value 1) and 4 rows from itself (value 11)
    assert results[1]["all_to_all"] == [1.0, 1.0, 11.0, 11.0, 11.0, 11.0]


@pytest.mark.timeout(180)
def test_reduce_scatter_list(results):
    assert results[0]["reduce_scatter"] == [3.0, 6.0]
    assert results[1]["reduce_scatter"] == [9.0, 12.0]


@pytest.mark.timeout(180)
def test_buffer_collectives_inside_coalescing_manager(results):
    for r in results:
        assert r["all_gather_into_tensor"] == [1.0, 2.0, 11.0, 12.0]
    assert results[0]["reduce_scatter_tensor"] == [0.0, 3.0]
    assert results[1]["reduce_scatter_tensor"] == [6.0, 9.0]


@pytest.mark.timeout(180)
def test_cuda_allocations_redirected(results):
    assert results[0]["device"] == "cpu"
    assert results[0]["type"] == "torch.cuda.FloatTensor"
    assert results[0]["current_device"] == "cpu"


@pytest.mark.timeout(180)
def test_every_way_of_placing_a_tensor_on_cuda_lands_on_the_cpu(results):
    assert results[0]["placed"] == {k: "cpu" for k in results[0]["placed"]} and len(results[0]["placed"]) == 12
    assert results[0]["function_modes"] == 0
    assert results[0]["meta_context"] == ["meta"]
    assert results[0]["to_dtype"] == "torch.float16"  # .to(dtype) is still a cast
    assert results[0]["type_cast"] == "torch.cuda.DoubleTensor"  # .type(dtype) casts, .type() names it "CUDA"


@pytest.mark.timeout(180)
def test_compile_runs_eagerly_without_importing_dynamo(results):
    assert results[0]["compile_eager"] == [True, True]
    assert results[0]["compilers_imported"] == []


@pytest.mark.timeout(120)
def test_collectives_of_a_one_process_job_stay_in_the_calling_thread(tmp_path):
    # gloo makes a collective's copies in its own thread; at 2 OpenMP threads that thread's first large
    # copy started a second OpenMP pool, which made libgomp throttle the spin-wait of every pool (the
    # learner step of a one-process run was a quarter slower). Over a group of one they are copies here.
    out = tmp_path / "alone.json"
    spawn_ranks([str(ALONE_WORKER), str(out)], world_size=1, timeout_s=90, name="gloo-alone")
    got = json.loads(out.read_text())
    assert got.pop("new_gloo_threads") == 0
    assert got == {k: True for k in got} and len(got) == 7, got
