"""Distributed checkpoints: reshard round trip, resume == uninterrupted training, atomic commit, errors.

Every megatron run is a fresh set of gloo processes with a timeout (``tests/ckpt_worker.py``).
Scenario (N = 2 steps, then M = 2 more; cosine LR with warmup, so the scheduler matters too):

* A   tp2ep2 (4 procs): N + M steps uninterrupted, state gathered after N.
* AS  tp2ep2: N steps, save.                       (the checkpoint everyone loads)
* B   pp2:    load AS, M steps.                    tp2ep2 -> pp2
* C   ep2:    load AS, 1 step, save, 1 step.       tp2ep2 -> ep2
* D   1 proc: load C, 1 step.                      ep2 -> 1
After each load the gathered full parameters *and* Adam moments / fp32 master params equal the
saved ones bit for bit; the continued losses and final parameters equal the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from ckpt_worker import Job, run_job

from r1mega.ckpt import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    load_checkpoint,
)

N, M = 2, 2
TIMEOUT_S = 240
LOSS_RTOL = 1e-5
PARAM_TOL = 1e-3  # relative to the size of the parameter update over the continued steps (as parallel_check)
STATE_KEYS = ("model", "optim.param", "optim.exp_avg", "optim.exp_avg_sq")


def _train(steps: int) -> dict:
    return {"op": "train", "steps": steps}


def _assert_bit_identical(saved: dict, loaded: dict, what: str) -> None:
    for key in STATE_KEYS:
        assert saved[key].keys() == loaded[key].keys(), f"{what} {key}: parameter sets differ"
        for name, tensor in saved[key].items():
            assert torch.equal(tensor, loaded[key][name]), (
                f"{what}: {key} of {name} differs after load (max |diff| "
                f"{float((tensor - loaded[key][name]).abs().max()):.3e})")


def _loss_rel(got: float, ref: float) -> float:
    return abs(got - ref) / abs(ref)


def _param_err(final: dict, ref_final: dict, ref_start: dict) -> float:
    """Max over parameters of |final - ref_final| / |ref_final - ref_start| (ref update size)."""
    worst = 0.0
    for name, ref in ref_final.items():
        update = (ref - ref_start[name]).norm()
        if update > 0:
            worst = max(worst, float((final[name] - ref).norm() / update))
    return worst


def _gather(tag: str) -> dict:
    return {"op": "gather", "tag": tag}


def _rng(tag: str) -> dict:
    return {"op": "rng", "tag": tag}


def _load(path) -> dict:
    return {"op": "load", "path": str(path)}


def _save(root) -> dict:
    return {"op": "save", "root": str(root)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpt")
    root_as, root_c = base / "as", base / "c"
    jobs = {
        "A": Job("tp2ep2", [_train(N), _gather("n"), _train(M), _gather("final")]),
        "AS": Job("tp2ep2", [_train(N), _gather("saved"), _save(root_as), _rng("after_save")]),
        "B": Job("pp2", [_load(root_as), _gather("loaded"), _train(M), _gather("final"),
                         # negative control: the same resume without the optimizer state
                         {"op": "build"}, {**_load(root_as), "load_optimizer": False}, _train(M)]),
        "C": Job("ep2", [_load(root_as), _rng("after_load"), _gather("loaded"), _train(1), _gather("saved"),
                         _save(root_c), _rng("after_save"), _train(1), _gather("final")]),
        "D": Job("1", [_load(root_c), _rng("after_load"), _gather("loaded"), _train(1), _gather("final")]),
    }
    out = {"roots": {"as": root_as, "c": root_c}}
    for name, job in jobs.items():  # in order: later jobs load earlier jobs' checkpoints
        out[name] = run_job(job, TIMEOUT_S, f"{name} {job.layout}")
    return out


@pytest.mark.timeout(600)
def test_saved_state_is_the_uninterrupted_state(runs):
    """Same layout, same data: the run that saves is at the same state as the uninterrupted one."""
    _assert_bit_identical(runs["A"]["gathered"]["n"], runs["AS"]["gathered"]["saved"], "AS vs A")
    save = runs["AS"]["saves"][0]
    assert save["step"] == N and save["path"].endswith(f"step_{N:06d}")
    print(f"save tp2ep2 (4 procs): {save['seconds']:.2f}s")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("target", ["B", "C"])
def test_reshard_restores_model_and_optimizer_bit_identical(runs, target):
    loaded = runs[target]["loads"][0]
    assert loaded["step"] == N and not loaded["same_layout"]
    _assert_bit_identical(runs["AS"]["gathered"]["saved"], runs[target]["gathered"]["loaded"],
                          f"tp2ep2 -> {target}")
    print(f"load tp2ep2 -> {target}: {loaded['seconds']:.2f}s")


@pytest.mark.timeout(600)
def test_continued_training_equals_uninterrupted_tp2ep2_to_pp2(runs):
    a, b = runs["A"], runs["B"]
    resumed = b["loss_log"][:M]  # [step, loss] (b["losses"] also holds the negative control's)
    loss_errs = [_loss_rel(loss, a["losses"][s]) for s, loss in resumed]
    param_err = _param_err(b["gathered"]["final"]["model"], a["gathered"]["final"]["model"],
                           a["gathered"]["n"]["model"])
    print(f"tp2ep2 -> pp2: loss rel errs {loss_errs}, param err (rel. to update) {param_err:.2e}")
    assert [s for s, _ in resumed] == list(range(N, N + M))
    assert max(loss_errs) < LOSS_RTOL
    assert param_err < PARAM_TOL
    # The comparison is sensitive to the optimizer state: resuming with fresh Adam moments (model,
    # scheduler and step restored) gives a visibly different loss after the first update.
    fresh_step, fresh_loss = b["loss_log"][M + 1]
    assert fresh_step == N + 1
    print(f"without optimizer state: loss rel err {_loss_rel(fresh_loss, a['losses'][N + 1]):.2e}")
    assert _loss_rel(fresh_loss, a["losses"][N + 1]) > 100 * LOSS_RTOL


@pytest.mark.timeout(600)
def test_continued_training_equals_uninterrupted_ep2_to_single_process(runs):
    a, c, d = runs["A"], runs["C"], runs["D"]
    _assert_bit_identical(c["gathered"]["saved"], d["gathered"]["loaded"], "ep2 -> 1")
    assert d["loads"][0]["step"] == N + 1
    loss_errs = [_loss_rel(c["losses"][N], a["losses"][N]), _loss_rel(d["losses"][N + 1], a["losses"][N + 1]),
                 _loss_rel(d["losses"][N + 1], c["losses"][N + 1])]
    ref_final, ref_start = a["gathered"]["final"]["model"], a["gathered"]["n"]["model"]
    param_err = max(_param_err(run["gathered"]["final"]["model"], ref_final, ref_start) for run in (c, d))
    print(f"tp2ep2 -> ep2 -> 1: loss rel errs {loss_errs}, param err (rel. to update) {param_err:.2e}")
    assert max(loss_errs) < LOSS_RTOL
    assert param_err < PARAM_TOL


@pytest.mark.slow  # resharding itself is covered with the distributed optimizer above
@pytest.mark.timeout(600)
def test_reshard_without_distributed_optimizer_tp2_to_pp2(tmp_path):
    """The plain (non-distributed) optimizer goes through megatron's own optimizer state dict."""
    root = tmp_path / "plain"
    saver = run_job(Job("tp2", [_train(N), _gather("saved"), _save(root)], use_distributed_optimizer=False),
                    TIMEOUT_S, "plain tp2 save")
    loader = run_job(Job("pp2", [_load(root), _gather("loaded")], use_distributed_optimizer=False),
                     TIMEOUT_S, "plain pp2 load")
    _assert_bit_identical(saver["gathered"]["saved"], loader["gathered"]["loaded"], "plain tp2 -> pp2")
    assert loader["loads"][0]["step"] == N


@pytest.mark.timeout(600)
def test_rng_restored_from_rank0_when_layout_changes(runs):
    # python / numpy / torch-CPU streams continue exactly where the saving run's rank 0 left them
    assert runs["C"]["rng"]["after_load"] == runs["AS"]["rng"]["after_save"]
    assert runs["D"]["rng"]["after_load"] == runs["C"]["rng"]["after_save"]


@pytest.mark.timeout(600)
def test_meta_json_describes_the_checkpoint(runs):
    from r1mega.ckpt import read_meta

    meta = read_meta(runs["roots"]["as"] / f"step_{N:06d}")
    assert meta["step"] == N
    assert {k: meta["layout"][k] for k in ("tp", "pp", "ep", "etp", "dp", "world_size")} == \
        {"tp": 2, "pp": 1, "ep": 2, "etp": 2, "dp": 2, "world_size": 4}
    assert meta["model"]["preset"] == "qwen3_moe" and meta["model"]["size"] == "tiny"
    assert meta["optimizer"]["sharding_type"] == "fully_reshardable"
    assert meta["extra"] == {"consumed_samples": N * 4}
    assert meta["r1mega_version"] and meta["time"]
    assert (runs["roots"]["as"] / "latest").read_text().strip() == f"step_{N:06d}"


# ----------------------------------------------------------------------------- atomic commit + errors


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt1") / "root"
    actions = [
        _train(1), {"op": "save", "root": str(root), "keep_last": 2}, _gather("step1"), _rng("after_save1"),
        _train(1),
        # crash after every shard and meta.json are written, before the rename
        {"op": "save", "root": str(root), "keep_last": 2, "fault": "before_rename",
         "expect_error": "SimulatedCrash", "tag": "crash"},
        {"op": "listdir", "root": str(root), "tag": "after_crash"},
        {"op": "build"},  # a fresh process' model: resume from what is on disk
        _load(root), _rng("after_load1"), _gather("loaded"),
        _train(1), {"op": "save", "root": str(root), "keep_last": 2},
        {"op": "listdir", "root": str(root), "tag": "after_resave"},
        _train(1), {"op": "save", "root": str(root), "keep_last": 2},
        {"op": "listdir", "root": str(root), "tag": "final"},
        {"op": "build", "model": {"num_layers": 3}},
        {"op": "load", "path": str(root), "expect_error": "CheckpointMismatchError", "tag": "num_layers"},
        {"op": "build", "model": {"moe_ffn_hidden_size": 48}},
        {"op": "load", "path": str(root), "strict": False, "expect_error": "CheckpointMismatchError",
         "tag": "shape"},
    ]
    return root, run_job(Job("1", actions), TIMEOUT_S, "single-process checkpoint scenario")


@pytest.mark.timeout(600)
def test_crash_mid_write_keeps_previous_checkpoint(single):
    root, res = single
    assert "SimulatedCrash" in res["errors"]["crash"]
    listing = res["listings"]["after_crash"]
    assert listing["latest"] == "step_000001"
    assert "step_000001" in listing["entries"] and "step_000002" not in listing["entries"]
    assert any(e.startswith(".tmp_step_000002_") for e in listing["entries"]), listing
    # the previous checkpoint loads (latest is followed, the temp dir ignored) with every bit intact
    assert res["loads"][0]["step"] == 1 and res["loads"][0]["path"].endswith("step_000001")
    _assert_bit_identical(res["gathered"]["step1"], res["gathered"]["loaded"], "after crash")
    assert res["rng"]["after_load1"] == res["rng"]["after_save1"]  # same layout: exact RNG streams
    # resumed training repeats the step the crashed run took
    log = res["loss_log"]
    assert log[1][0] == log[2][0] == 1 and log[1][1] == log[2][1]


@pytest.mark.timeout(600)
def test_next_save_cleans_temp_dir_and_keep_last_prunes(single):
    root, res = single
    after = res["listings"]["after_resave"]
    assert after["latest"] == "step_000002"
    assert not any(e.startswith(".tmp") for e in after["entries"]), after
    final = res["listings"]["final"]
    assert final == {"entries": ["latest", "step_000002", "step_000003"], "latest": "step_000003"}


@pytest.mark.timeout(600)
def test_architecture_mismatch_is_reported_clearly(single):
    _, res = single
    msg = res["errors"]["num_layers"]
    assert "does not match this model's architecture" in msg
    assert "num_layers is 2 in the checkpoint but 3 in this model" in msg
    assert "parameter decoder.layers.2." in msg and "is not in the checkpoint" in msg
    assert "preset=qwen3_moe size=tiny" in msg and "meta.json" in msg
    shape = res["errors"]["shape"]  # a shape difference fails even with strict=False
    assert "moe_ffn_hidden_size is 32 in the checkpoint but 48 in this model" in shape
    assert "has shape (64, 32) in the checkpoint but (64, 48) in this model" in shape


def test_missing_directory_error(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_checkpoint(None, tmp_path / "nope")


@pytest.mark.timeout(600)
def test_no_latest_and_incomplete_checkpoint_errors(single, tmp_path):
    root, _ = single
    no_latest = tmp_path / "no_latest"
    shutil.copytree(root, no_latest)
    (no_latest / "latest").unlink()
    with pytest.raises(CheckpointNotFoundError, match="has no 'latest' file.*step_000003"):
        load_checkpoint(None, no_latest)

    incomplete = tmp_path / "incomplete"
    shutil.copytree(root, incomplete)
    (incomplete / "step_000003" / "meta.json").unlink()
    with pytest.raises(IncompleteCheckpointError, match="is incomplete: it has no meta.json"):
        load_checkpoint(None, incomplete)  # latest names the broken one
    with pytest.raises(IncompleteCheckpointError, match="never committed"):
        load_checkpoint(None, incomplete / "step_000003")

    (incomplete / "latest").write_text("step_000009\n")
    with pytest.raises(CheckpointNotFoundError, match="names step_000009, which does not exist"):
        load_checkpoint(None, incomplete)


def test_empty_root_error(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no complete step_\\* checkpoint"):
        load_checkpoint(None, tmp_path)


def test_mismatch_error_is_a_value_error():
    assert issubclass(CheckpointMismatchError, ValueError)


def test_writer_queue_process_starts_without_importing_torch():
    """The writer Manager is a spawned process that imports its initializer's module: that import must not pull
    torch (and with it megatron), or every run that checkpoints waits ~2 s for the Manager at its start."""
    import subprocess
    import sys

    code = ("import pickle, sys; import r1mega.platform.writer_queue as w; pickle.dumps(w._server_init); "
            "sys.exit(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')) != [])")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


# ----------------------------------------------------------------------------- spawn helper


def test_spawn_reports_failed_rank_and_stops_the_others():
    import time

    from r1mega.platform.spawn import SpawnError, spawn_ranks

    code = ("import os, sys, time\nif os.environ['RANK'] == '1':\n    print('boom on rank 1'); sys.exit(3)\n"
            "time.sleep(60)")
    t0 = time.monotonic()
    with pytest.raises(SpawnError, match="(?s)job x: rank 1 failed.*boom on rank 1"):
        spawn_ranks(["-c", code], 2, timeout_s=60, name="job x", fail_grace_s=1)
    assert time.monotonic() - t0 < 20  # the sleeping rank was killed, not waited for


def test_spawn_timeout_kills_every_rank():
    from r1mega.platform.spawn import SpawnTimeout, spawn_ranks

    with pytest.raises(SpawnTimeout, match="did not finish within 2s"):
        spawn_ranks(["-c", "import time; print('waiting', flush=True); time.sleep(60)"], 2, timeout_s=2)


# ----------------------------------------------------------------------------- atomic protocol (no megatron)


def _fake_tmp(root, step: int, payload: str):
    from r1mega.ckpt import atomic

    tmp = root / atomic.tmp_dir_name(step)
    tmp.mkdir(parents=True)
    (tmp / "shard").write_text(payload)
    (tmp / atomic.META_FILE).write_text("{}")
    return tmp


def test_commit_replaces_a_resaved_step_and_moves_latest(tmp_path):
    from r1mega.ckpt import atomic

    atomic.commit(_fake_tmp(tmp_path, 5, "old"), tmp_path, 5)
    atomic.commit(_fake_tmp(tmp_path, 5, "new"), tmp_path, 5)
    assert (tmp_path / "step_000005" / "shard").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000005"]
    assert atomic.resolve_checkpoint_dir(tmp_path) == tmp_path / "step_000005"


def test_crash_between_rename_and_latest_keeps_latest_valid(tmp_path, monkeypatch):
    from r1mega.ckpt import SimulatedCrash, atomic

    atomic.commit(_fake_tmp(tmp_path, 1, "one"), tmp_path, 1)
    monkeypatch.setenv(atomic.FAULT_ENV, "before_latest")
    with pytest.raises(SimulatedCrash):
        atomic.commit(_fake_tmp(tmp_path, 2, "two"), tmp_path, 2)
    # step_000002 is complete but uncommitted as 'latest': loads still get step 1
    assert atomic.resolve_checkpoint_dir(tmp_path) == tmp_path / "step_000001"
    assert [s for s, _ in atomic.committed_steps(tmp_path)] == [1, 2]


def test_prune_never_deletes_what_latest_names(tmp_path):
    from r1mega.ckpt import atomic

    for step in (1, 2, 3):
        atomic.commit(_fake_tmp(tmp_path, step, str(step)), tmp_path, step)
    atomic.write_text_atomic(tmp_path / atomic.LATEST_FILE, "step_000001\n")  # e.g. rolled back by hand
    atomic.prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000001", "step_000003"]
    assert atomic.remove_stale_tmp_dirs(tmp_path) == []
    stale = _fake_tmp(tmp_path, 4, "x")
    assert atomic.remove_stale_tmp_dirs(tmp_path) == [stale] and not stale.exists()


def test_keep_last_never_deletes_what_a_stage_names_and_a_linked_copy_outlives_its_source(tmp_path):
    """Pruning keeps the checkpoints finished stages' done.json name (Checkpointer.stage_checkpoints) and
    what ``latest`` names; a stage's hard-linked name of a periodic checkpoint survives that one's pruning."""
    from types import SimpleNamespace

    from r1mega.ckpt import atomic
    from r1mega.train.resilience import Checkpointer

    root, out = tmp_path / "checkpoints", tmp_path / "run"
    for step in (1, 2, 3):
        atomic.commit(_fake_tmp(root, step, str(step)), root, step)
    (out / "sft").mkdir(parents=True)
    (out / "sft" / "done.json").write_text(json.dumps({"checkpoint": str(root / "step_000001")}))
    (out / "rl").mkdir()
    (out / "rl" / "done.json").write_text(json.dumps({"checkpoint": None}))  # e.g. rejection sampling
    cfg = SimpleNamespace(checkpoint=SimpleNamespace(save_dir=str(root), save_interval=0, keep_last=1, resume="none"),
                          model=None, trainer=SimpleNamespace(output_dir=str(out)))
    protect = Checkpointer(cfg, None, out / "metrics.jsonl").stage_checkpoints()
    assert protect == (root / "step_000001",)
    atomic.prune(root, keep_last=1, protect=protect)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001", "step_000003"]

    stage_tmp = root / "sft" / atomic.tmp_dir_name(1)
    assert atomic.link_tree(root / "step_000003", stage_tmp, skip=(atomic.META_FILE,))
    (stage_tmp / atomic.META_FILE).write_text("{}")
    atomic.commit(stage_tmp, root / "sft", 1)
    assert os.stat(root / "sft" / "step_000001" / "shard").st_ino == os.stat(root / "step_000003" / "shard").st_ino
    atomic.commit(_fake_tmp(root, 4, "4"), root, 4)
    atomic.prune(root, keep_last=1)
    assert not (root / "step_000003").exists()
    assert (root / "sft" / "step_000001" / "shard").read_text() == "3"


# ----------------------------------------------------------------------------- uneven pipeline split

# DeepSeek-V3 with 5 layers, the first 3 dense: over pp2 as 2 + 3 layers the dense/MoE boundary falls
# inside the second stage.
UNEVEN_MODEL = {"preset": "deepseek_v3", "size": "tiny", "num_layers": 5, "first_k_dense_layers": 3}


@pytest.mark.slow  # three spawned jobs: ~45 s of CPU, 1-3 min on a busy machine
@pytest.mark.timeout(600)
def test_uneven_pipeline_checkpoint_loads_in_other_layouts(tmp_path):
    """Saved over pp2 as 2 + 3 layers, a checkpoint loads into one process and into a 3 + 2 split with
    model, Adam moments and fp32 master weights bit-identical, and the next step equals the saving run's.
    The 'dp_reshardable' optimizer format keeps per-rank buffers: another split must be refused."""
    from r1mega.ckpt import read_meta

    full, dp_only = tmp_path / "full", tmp_path / "dp"
    saver = run_job(Job("pp2first2", [_train(N), _gather("saved"), _save(full),
                                      {"op": "save", "root": str(dp_only), "sharding": "dp_reshardable"},
                                      _train(1), _gather("final")], model=UNEVEN_MODEL),
                    TIMEOUT_S, "uneven pp2 (2+3) save")
    meta = read_meta(full / f"step_{N:06d}")
    assert (meta["layout"]["num_layers_in_first_pipeline_stage"],
            meta["layout"]["num_layers_in_last_pipeline_stage"]) == (2, None)
    loaders = {
        "1": run_job(Job("1", [_load(full), _gather("loaded"), _train(1), _gather("final")], model=UNEVEN_MODEL),
                     TIMEOUT_S, "uneven -> 1 load"),
        "pp2last2": run_job(Job("pp2last2", [
            {**_load(dp_only), "expect_error": "CheckpointMismatchError", "tag": "dp"},
            _load(full), _gather("loaded"), _train(1), _gather("final")], model=UNEVEN_MODEL),
            TIMEOUT_S, "uneven 2+3 -> 3+2 load"),
    }
    ref_final, ref_saved = saver["gathered"]["final"]["model"], saver["gathered"]["saved"]["model"]
    for layout, run in loaders.items():
        _assert_bit_identical(saver["gathered"]["saved"], run["gathered"]["loaded"], f"pp2first2 -> {layout}")
        loss_err = _loss_rel(run["losses"][N], saver["losses"][N])
        param_err = _param_err(run["gathered"]["final"]["model"], ref_final, ref_saved)
        print(f"pp2first2 -> {layout}: next-step loss rel err {loss_err:.2e}, param err {param_err:.2e}")
        assert loss_err < LOSS_RTOL and param_err < PARAM_TOL
    assert "pipeline split" in loaders["pp2last2"]["errors"]["dp"]
