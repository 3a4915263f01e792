"""Save and load training state with megatron-core ``dist_checkpointing``, across layouts.

One checkpoint holds the model (``GPTModel.sharded_state_dict``), the optimizer (megatron's
``sharded_state_dict``; the distributed optimizer in the ``fully_reshardable`` format), the LR
scheduler, every rank's RNG streams, the step and a caller-defined ``extra`` dict (data position...).
Tensors are stored by their *global* shape and offset, so a checkpoint saved at TP2xEP2 loads at
PP2, EP2 or a single process: each rank reads exactly the slices its layout needs.

The write is atomic (see :mod:`r1mega.ckpt.atomic`): all ranks write into ``<root>/.tmp_step_<n>_<nonce>``
and rank 0 renames it to ``<root>/step_<n>`` and updates ``<root>/latest`` only after every rank
finished; a crash before that leaves the previous checkpoint and ``latest`` as they were.

Loading checks ``meta.json`` first (architecture fields and every parameter's full shape) so that a
checkpoint of another model fails with a message naming the parameter and both shapes instead of a
megatron stack trace. See docs/architecture.md, "Checkpoints".
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from r1mega.ckpt import atomic
from r1mega.ckpt.errors import CheckpointError, CheckpointMismatchError, IncompleteCheckpointError
from r1mega.ckpt.state import architecture, capture_rng, check_loadable, make_meta, restore_rng
from r1mega.platform.distributed import barrier, broadcast_from_rank0
from r1mega.platform.megatron_compat import ensure_megatron
from r1mega.platform.writer_queue import start_writer_queue

log = logging.getLogger(__name__)

# Distributed-optimizer format. 'fully_reshardable' stores exp_avg/exp_avg_sq/fp32 param per model
# parameter with the parameter's global shape, so TP/PP/EP/DP may all change between save and load.
# 'fully_sharded_model_space' (megatron's default in 0.16.1) relies on ShardedTensor.flattened_range,
# which 0.16.1's dist_checkpointing rejects; 'dp_reshardable' only allows a different DP size.
DEFAULT_OPTIM_SHARDING = "fully_reshardable"
_SHARDING_TYPES = ("fully_reshardable", "dp_reshardable")

_RNG_KEY = "rng_state"
# meta.json "contents": a training checkpoint (model, optimizer, scheduler, RNG) or model weights only
CONTENTS_TRAINING = "training"
CONTENTS_WEIGHTS = "weights"


# ----------------------------------------------------------------------------- helpers


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


_PP_SPLIT = ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage")
_MODEL_SHARDING = ("tp", "pp", "ep", "etp", *_PP_SPLIT)  # what decides which tensors a rank holds


def _layout(use_distributed_optimizer: bool | None, config=None) -> dict:
    from megatron.core import parallel_state as ps

    return {
        "world_size": _world(),
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(),
        "etp": ps.get_expert_tensor_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        # uneven pipeline split (None: even); another split puts other layers on each stage
        **{k: getattr(config, k, None) for k in _PP_SPLIT},
        "use_distributed_optimizer": use_distributed_optimizer,
    }


def _model_names(tm, model_cfg) -> dict:
    """meta.json's model identity: preset, size, precision and, as ``config``, every field of the
    r1mega ``ModelConfig`` as the run resolved it (conversion rebuilds the model from it; preset +
    size alone would lose the sizes a recipe set)."""
    cfg = model_cfg if model_cfg is not None else getattr(tm, "model_config", None) if tm is not None else None
    if cfg is None:
        return {"preset": None, "size": None}
    names = {"preset": getattr(cfg, "preset", None), "size": getattr(cfg, "size", None),
             "precision": getattr(cfg, "precision", None)}
    if dataclasses.is_dataclass(cfg):
        names["config"] = dataclasses.asdict(cfg)
    return names


def _param_shapes(module, config) -> dict[str, list[int]]:
    """Full (TP1/PP1/EP1) shape of every parameter of the whole model, on every rank. Collective."""
    from r1mega.models.sharding import shard_infos

    local = {i.canonical_name: list(i.full_shape) for i in shard_infos(module, config)}
    if _world() == 1:
        return dict(sorted(local.items()))
    parts = [None] * _world()
    dist.all_gather_object(parts, local)
    merged: dict[str, list[int]] = {}
    for part in parts:
        merged.update(part)
    return dict(sorted(merged.items()))


def _leaf_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _is_distributed_optimizer(opt) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(opt, DistributedOptimizer)


def _ensure_optimizer_state(optimizer) -> None:
    """Give a never-stepped optimizer its (zero) state, including torch Adam's ``step``.

    megatron's ``DistributedOptimizer.state_dict()`` reads ``step`` from every per-parameter state
    when torch's Adam is the inner optimizer (no TE/apex), and ``sharded_state_dict(is_loading=True)``
    calls it, so saving at step 0 or loading into a freshly built optimizer would fail. Zero
    moments with step 0 are exactly what torch's Adam starts from.
    """
    for leaf in _leaf_optimizers(optimizer):
        inner = getattr(leaf, "optimizer", None)
        if inner is None:
            continue
        if len(inner.state) == 0 and getattr(leaf, "init_state_fn", None) is not None:
            leaf.init_state_fn(inner, leaf.config)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            for group in inner.param_groups:
                for p in group["params"]:
                    st = inner.state[p]
                    if "exp_avg" in st and "step" not in st:
                        st["step"] = torch.tensor(0.0, dtype=torch.float32)


@contextlib.contextmanager
def _without_step_state(leaf):
    """Hide torch Adam's per-parameter ``step`` while megatron copies loaded parameter state
    (works around a megatron-core 0.16.1 bug without patching megatron).

    ``DistributedOptimizer._set_main_param_and_optimizer_states`` (megatron-core 0.16.1,
    ``optimizer/distrib_optimizer.py``) copies *every* key of the live per-parameter state from the
    loaded tensors, but the loaders drop ``step`` from those (it lives in the param groups): with
    torch's Adam that is ``KeyError: 'step'``. The step was already restored by ``load_state_dict``,
    so it is taken out for the copy and put back unchanged.
    """
    inner = leaf.optimizer
    saved = {}
    for p, st in inner.state.items():
        if isinstance(st, dict) and "step" in st:
            saved[p] = st.pop("step")
    try:
        yield
    finally:
        for p, step in saved.items():
            inner.state[p]["step"] = step


def _unshare_step_tensors(leaf) -> None:
    """Give every parameter its own Adam ``step`` tensor after a load.

    ``DistributedOptimizer.load_state_dict`` (megatron-core 0.16.1, ``optimizer/distrib_optimizer.py``,
    torch-Adam branch ``if not HAVE_APEX_OR_TE``) assigns *one* step tensor to every parameter's
    state; torch's Adam increments each parameter's step in place, so after one step the shared
    counter has advanced once per parameter (measured: 2 -> 51 for 49 parameters) and Adam's bias
    correction is wrong from then on. TE/apex FusedAdam keep the step in the param groups instead.
    """
    inner = getattr(leaf, "optimizer", None)
    if inner is None:
        return
    seen: set[int] = set()
    for st in inner.state.values():
        step = st.get("step") if isinstance(st, dict) else None
        if torch.is_tensor(step):
            if id(step) in seen:
                st["step"] = step.clone()
            seen.add(id(st["step"]))


def _saved_leaf_commons(loaded_opt: dict) -> list[dict]:
    """The saved optimizers' non-tensor states (param groups, sharding type), in saved order.

    ``dist_checkpointing.load`` returns the *saved* common state (rank 0's at save time) with the
    tensors requested by *this* layout merged in, and the number of chained optimizers depends on
    the layout (dense + expert optimizers when EP/expert-DP groups differ from the dense ones, one
    optimizer otherwise). A single saved optimizer has its common state at the top level; chained
    ones under integer keys.
    """
    if "optimizer" in loaded_opt:
        return [loaded_opt]
    return [loaded_opt[k] for k in sorted(k for k in loaded_opt if isinstance(k, int))
            if isinstance(loaded_opt[k], dict) and "optimizer" in loaded_opt[k]]


def _group_id(group: dict) -> dict:
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    return {k: group[k] if k in group else group.get(f"pre_{k}") for k in param_group_identifier_keys}


def _matching_param_groups(leaf, saved_groups: list[dict], step_dir: Path) -> list[dict]:
    """A saved param group (hyper-parameters + step) for each of ``leaf``'s param groups.

    Matched on megatron's identifying keys; ``is_expert_parallel`` may differ (expert parameters are
    "expert parallel" only when EP > 1, so an EP1 checkpoint has no such groups), in which case the
    saved group is relabelled with this run's value.
    """
    out = []
    for group in leaf.optimizer.param_groups:
        want = _group_id(group)
        exact = [g for g in saved_groups if _group_id(g) == want]
        loose = [g for g in saved_groups if all(v == want[k] for k, v in _group_id(g).items()
                                                 if k != "is_expert_parallel")]
        found = (exact or loose or [None])[0]
        if found is None:
            raise CheckpointMismatchError(
                f"checkpoint {step_dir} has no optimizer param group like {want} of this run (saved: "
                f"{[_group_id(g) for g in saved_groups]}): the weight-decay / lr multipliers changed "
                "since the save; load with load_optimizer=False to start the optimizer afresh")
        relabelled = dict(found)
        for k, v in want.items():
            key = k if k in found else (f"pre_{k}" if f"pre_{k}" in found else k)
            relabelled[key] = v
        out.append(relabelled)
    return out


def _load_distributed_optimizer_state(optimizer, loaded_opt: dict, step_dir: Path,
                                      pooled_groups: list[dict] = ()) -> None:
    """Restore every (chained) DistributedOptimizer from a fully reshardable checkpoint, whatever
    the optimizer structure was at save time (see :func:`_saved_leaf_commons`).

    The per-parameter tensors (fp32 param, exp_avg, exp_avg_sq) were requested in this layout's
    structure; the param groups (hyper-parameters and step) of all saved optimizers are pooled and
    megatron picks the matching ones by their identifying keys (wd_mult, lr_mult, is_expert_parallel...).
    """
    leaves = _leaf_optimizers(optimizer)
    commons = _saved_leaf_commons(loaded_opt)
    if not commons:
        raise CheckpointError(f"checkpoint {step_dir} has no optimizer state (saved without one?): "
                              "load with load_optimizer=False")
    kinds = {c.get("param_state_sharding_type") for c in commons}
    if len(kinds) != 1:
        raise CheckpointError(f"checkpoint {step_dir}: mixed optimizer sharding types {kinds}")
    kind = kinds.pop()
    saved_groups = [g for c in commons for g in c["optimizer"]["param_groups"]] + list(pooled_groups)
    grad_scaler = next((c["grad_scaler"] for c in commons if "grad_scaler" in c), None)
    for index, leaf in enumerate(leaves):
        if not _is_distributed_optimizer(leaf):
            raise CheckpointError(f"optimizer {index} is a {type(leaf).__name__}, expected the distributed "
                                  "optimizer (checkpoint and run disagree on use_distributed_optimizer)")
        param_state = loaded_opt["param_state"] if len(leaves) == 1 else loaded_opt[index]["param_state"]
        leaf_state = {"optimizer": {k: v for k, v in commons[0]["optimizer"].items() if k != "param_groups"}}
        leaf_state["optimizer"]["param_groups"] = _matching_param_groups(leaf, saved_groups, step_dir)
        if grad_scaler is not None:
            leaf_state["grad_scaler"] = grad_scaler
        leaf.load_state_dict(leaf_state)  # param groups, step, grad scaler
        loaders = {
            "fully_reshardable": leaf.load_parameter_state_from_fully_reshardable,
            "dp_reshardable": leaf.load_parameter_state_from_dp_reshardable,
        }
        if kind not in loaders:
            raise CheckpointError(f"checkpoint {step_dir}: unsupported distributed-optimizer sharding type "
                                  f"{kind!r} (r1mega saves {DEFAULT_OPTIM_SHARDING!r})")
        # no_grad: load_parameter_state_from_dp_reshardable (unlike the fully_reshardable loader)
        # lacks @torch.no_grad and copies into views of the fp32 parameters.
        with _without_step_state(leaf), torch.no_grad():
            loaders[kind](param_state)
        _unshare_step_tensors(leaf)
    if len(leaves) > 1 and hasattr(optimizer, "_synchronize_steps"):
        optimizer._synchronize_steps()


def _check_plain_optimizer_structure(optimizer, step_dir: Path, saved: int) -> None:
    """Without the distributed optimizer megatron's own load is used; it needs the same number of
    chained (dense / expert) optimizers as at save time."""
    leaves = _leaf_optimizers(optimizer)
    if saved != len(leaves):
        raise CheckpointMismatchError(
            f"checkpoint {step_dir} holds {saved} chained optimizer state(s), this layout builds "
            f"{len(leaves)}: without the distributed optimizer, optimizer state only reloads where the "
            "expert/dense optimizer split is the same; use parallel.use_distributed_optimizer=true "
            "(any layout) or load with load_optimizer=False")


def _load_plain_optimizer_state(optimizer, loaded_opt) -> None:
    optimizer.load_state_dict(loaded_opt)
    for leaf in _leaf_optimizers(optimizer):
        _unshare_step_tensors(leaf)


def _uses_dist_opt(tm) -> bool:
    return bool(tm.ddp.ddp_config.use_distributed_optimizer)


def _all_param_groups(optimizer) -> list[dict]:
    """Every rank's distinct optimizer param groups (without params), for the common state. Collective."""
    local = []
    for leaf in _leaf_optimizers(optimizer):
        for group in leaf.state_dict()["optimizer"]["param_groups"]:
            local.append({k: v for k, v in group.items() if k != "params"})
    parts = [local]
    if _world() > 1:
        parts = [None] * _world()
        dist.all_gather_object(parts, local)
    pooled, seen = [], []
    for group in (g for part in parts for g in part):
        gid = _group_id(group)
        if gid not in seen:
            seen.append(gid)
            pooled.append(group)
    return pooled


def _sharded_metadata(sharding_type: str) -> dict:
    # chained_optim_avoid_prefix: with a fully reshardable format the keys are the model's, so the
    # dense/expert optimizers of a ChainedOptimizer need no 'chained_<i>.' prefix.
    return {"distrib_optim_sharding_type": sharding_type, "chained_optim_avoid_prefix": True}


def _rng_object(world: int, offset: int, data, replica: int = 0):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(_RNG_KEY, data, (world,), (offset,), replica_id=replica)


# ----------------------------------------------------------------------------- save


def save_checkpoint(tm, root: str | Path, step: int, extra: dict | None = None, *,
                    keep_last: int | None = None, model_cfg=None, protect: tuple[Path, ...] = (),
                    optim_sharding_type: str = DEFAULT_OPTIM_SHARDING) -> Path:
    """Write ``<root>/step_<step:06d>/`` atomically on every rank (collective); returns its path.

    Saves model, optimizer, scheduler, RNG (per rank), ``step`` and ``extra`` (any values that
    ``torch.load(weights_only=True)`` accepts: numbers, strings, lists, dicts, tensors), plus
    ``meta.json``. ``keep_last`` > 0 deletes older checkpoints after the commit, but none in ``protect``.
    ``model_cfg`` (the
    r1mega ``ModelConfig``) adds preset/size and the whole resolved config to ``meta.json``.
    """
    ensure_megatron()
    from megatron.core import dist_checkpointing

    if optim_sharding_type not in _SHARDING_TYPES:
        raise ValueError(f"optim_sharding_type {optim_sharding_type!r}: use one of {_SHARDING_TYPES}")
    extra = dict(extra or {})
    check_loadable(extra)  # same on every rank: raises everywhere or nowhere

    def write(tmp: Path) -> dict | None:
        metadata = _sharded_metadata(optim_sharding_type)
        _ensure_optimizer_state(tm.optimizer)
        model_sd = tm.module.sharded_state_dict(metadata=metadata)
        state = {
            "model": model_sd,
            "optimizer": tm.optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=metadata),
            "scheduler": tm.scheduler.state_dict(),
            _RNG_KEY: _rng_object(_world(), _rank(), capture_rng()),
            "r1mega": {"step": int(step), "extra": extra},
        }
        if _uses_dist_opt(tm):
            # Rank 0's common state is what dist_checkpointing keeps; pool every rank's param groups so a
            # layout whose stages have other groups than rank 0's still finds its own on load.
            state["r1mega"]["optimizer_param_groups"] = _all_param_groups(tm.optimizer)
        layout = _layout(_uses_dist_opt(tm), tm.config)
        shapes = _param_shapes(tm.module, tm.config)
        start_writer_queue()
        dist_checkpointing.save(state, str(tmp))
        if _rank() != 0:
            return None
        optim_info = {"sharding_type": optim_sharding_type if layout["use_distributed_optimizer"] else None,
                      "num_optimizers": len(_leaf_optimizers(tm.optimizer))}
        return make_meta(step, layout, architecture(tm.config), shapes, _model_names(tm, model_cfg),
                         optim_info, extra, contents=CONTENTS_TRAINING)

    return atomic_save(root, step, write, keep_last=keep_last, protect=tuple(protect))


def link_checkpoint(src: str | Path, root: str | Path, step: int, *, keep_last: int | None = None) -> Path:
    """Commit the checkpoint ``src`` also as ``<root>/step_<step>`` without writing its bytes again
    (collective): its files are hard-linked (:func:`atomic.link_tree`), ``meta.json`` is a copy that
    records ``linked_from``. A stage's final checkpoint that a periodic save already wrote is named so."""
    src = atomic.resolve_checkpoint_dir(src)

    def write(tmp: Path) -> dict | None:
        if _rank() != 0:
            return None
        how = "hard links" if atomic.link_tree(src, tmp, skip=(atomic.META_FILE,)) else "copies"
        log.info("checkpoint %s: %s of %s", root, how, src)
        return {**read_meta(src), "linked_from": str(src)}

    return atomic_save(root, step, write, keep_last=keep_last)


def atomic_save(root: str | Path, step: int, write, *, keep_last: int | None = None,
                protect: tuple[Path, ...] = ()) -> Path:
    """The atomic commit around a distributed save (collective; see :mod:`r1mega.ckpt.atomic`).

    ``write(tmp_dir)`` saves the shards on every rank and returns ``meta.json``'s contents on rank 0.
    ``keep_last`` prunes older checkpoints of ``root`` but the ones in ``protect``.
    """
    t0 = time.perf_counter()
    root = Path(root)
    rank = _rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale_tmp_dirs(root)
        tmp = root / atomic.tmp_dir_name(step)
        tmp.mkdir()
    tmp = Path(broadcast_from_rank0(str(tmp) if rank == 0 else None))
    meta = write(tmp)
    atomic.fault_point("after_shards")
    if rank == 0:
        (tmp / atomic.META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    barrier()

    # Commit on rank 0; every rank learns the outcome (a failed commit must not leave the others
    # waiting in a barrier).
    outcome = None
    final = root / atomic.step_dir_name(step)
    if rank == 0:
        try:
            final = atomic.commit(tmp, root, step)
            if keep_last:
                for path in atomic.prune(root, keep_last, protect):
                    log.info("pruned old checkpoint %s", path)
        except BaseException as e:  # noqa: B036 - re-raised below after telling the other ranks
            outcome = f"{type(e).__name__}: {e}"
            broadcast_from_rank0(outcome)
            raise
    outcome = broadcast_from_rank0(outcome)
    if outcome is not None:
        raise CheckpointError(f"checkpoint save of step {step} to {root} failed on rank 0 ({outcome}); "
                              f"the previous checkpoint and {root / atomic.LATEST_FILE} are unchanged")
    if rank == 0:
        log.info("saved checkpoint %s (step %d, %.2fs)", final, step, time.perf_counter() - t0)
    return final


# ----------------------------------------------------------------------------- load


def read_meta(step_dir: Path) -> dict:
    path = Path(step_dir) / atomic.META_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise IncompleteCheckpointError(f"checkpoint {step_dir} has no {atomic.META_FILE}: its save never "
                                        "committed; load an earlier step_* directory") from None
    except json.JSONDecodeError as e:
        raise IncompleteCheckpointError(f"{path} is not valid JSON ({e}): the checkpoint is damaged; "
                                        "load an earlier step_* directory") from None


def check_compatible(meta: dict, tm, step_dir: Path, model_cfg=None, strict: bool = True) -> list[str]:
    """Compare the checkpoint's model with ``tm`` (collective); returns the differences.

    Raises :class:`CheckpointMismatchError` listing them (architecture fields, then each parameter
    with both shapes) when ``strict`` or when a shared parameter's shape differs.
    """
    saved_model = meta.get("model", {})
    saved_arch = saved_model.get("architecture", {})
    here_arch = architecture(tm.config)
    problems, fatal = [], False
    for name, here in here_arch.items():
        if name in saved_arch and saved_arch[name] != here:
            problems.append(f"{name} is {saved_arch[name]} in the checkpoint but {here} in this model")
    saved_shapes = saved_model.get("param_shapes", {})
    here_shapes = _param_shapes(tm.module, tm.config)
    tied = bool(getattr(tm.module, "share_embeddings_and_output_weights", False))
    skip = {"output_layer.weight"} if tied else set()
    for name in sorted(set(saved_shapes) | set(here_shapes)):
        if name in skip:
            continue
        if name not in saved_shapes:
            problems.append(f"parameter {name} (shape {tuple(here_shapes[name])}) is not in the checkpoint")
        elif name not in here_shapes:
            problems.append(f"checkpoint parameter {name} (shape {tuple(saved_shapes[name])}) does not "
                            "exist in this model")
        elif list(saved_shapes[name]) != list(here_shapes[name]):
            fatal = True  # cannot be loaded even non-strictly
            problems.append(f"parameter {name} has shape {tuple(saved_shapes[name])} in the checkpoint but "
                            f"{tuple(here_shapes[name])} in this model")
    names = _model_names(tm, model_cfg)
    saved_names = {k: saved_model.get(k) for k in ("preset", "size")}
    if problems:
        if any(saved_names.values()) and any(names.get(k) for k in saved_names):
            problems.insert(0, f"checkpoint model is preset={saved_names['preset']} "
                               f"size={saved_names['size']}, this one preset={names.get('preset')} "
                               f"size={names.get('size')}")
        shown = "\n  - ".join(problems[:12])
        if len(problems) > 12:
            shown += f"\n  - ... {len(problems) - 12} more"
        message = (f"checkpoint {step_dir} does not match this model's architecture:\n  - {shown}\n"
                   f"Fix: build the model with the checkpoint's architecture (see 'model' in "
                   f"{step_dir / atomic.META_FILE}), or point the load at a checkpoint of this model.")
        if strict or fatal:
            raise CheckpointMismatchError(message)
        if _rank() == 0:
            log.warning("%s\n(strict=False: loading what matches)", message)
    elif any(saved_names.values()) and any(names.values()) and \
            (saved_names["preset"], saved_names["size"]) != (names.get("preset"), names.get("size")):
        log.warning("checkpoint %s was saved as preset=%s size=%s, loading into preset=%s size=%s "
                    "(same architecture and shapes)", step_dir, saved_names["preset"], saved_names["size"],
                    names.get("preset"), names.get("size"))
    return problems


def load_checkpoint(tm, root_or_dir: str | Path, strict: bool = True, *, model_cfg=None,
                    load_optimizer: bool = True, load_rng: bool = True) -> dict:
    """Load a checkpoint saved in any layout into ``tm`` (collective); returns
    ``{"step", "extra", "path", "meta", "same_layout", "seconds"}``.

    ``root_or_dir`` is a checkpoint root (``latest`` is followed) or a ``step_*`` directory. Model,
    optimizer (``load_optimizer``), scheduler and RNG (``load_rng``) are restored. RNG streams are
    per rank: restored exactly when the layout is unchanged; otherwise every rank takes global rank
    0's python/numpy/torch-CPU state and keeps its seeded CUDA/model-parallel streams (a layout
    change changes which rank draws what anyway).

    ``strict=False`` tolerates parameters missing on one side (they keep their current values and
    the optimizer state is then not loaded); shapes that differ always raise.
    """
    t0 = time.perf_counter()
    # Every rank resolves the path itself (shared filesystem), so path errors raise on all ranks
    # alike, and before megatron is touched.
    step_dir = atomic.resolve_checkpoint_dir(root_or_dir)
    meta = read_meta(step_dir)
    ensure_megatron()
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    weights_only = meta.get("contents") == CONTENTS_WEIGHTS
    if weights_only and (load_optimizer or load_rng):
        raise CheckpointError(
            f"checkpoint {step_dir} holds model weights only (a converted checkpoint, e.g. from `r1mega convert "
            "from-hf`): it is a starting point, not a resume point. Load it as initial weights "
            "(checkpoint.load_dir, or load_optimizer=False, load_rng=False), not with checkpoint.resume")
    problems = check_compatible(meta, tm, step_dir, model_cfg=model_cfg, strict=strict)
    layout = _layout(_uses_dist_opt(tm), tm.config)
    saved_layout = meta.get("layout", {})
    same_layout = all(saved_layout.get(k) == v for k, v in layout.items())

    saved_optim = meta.get("optimizer") or {}
    use_dist_opt = layout["use_distributed_optimizer"]
    sharding_type = saved_optim.get("sharding_type") or DEFAULT_OPTIM_SHARDING
    if load_optimizer and saved_layout.get("use_distributed_optimizer") != use_dist_opt:
        raise CheckpointMismatchError(
            f"checkpoint {step_dir} was saved with use_distributed_optimizer="
            f"{saved_layout.get('use_distributed_optimizer')} but this run has {use_dist_opt}: set "
            "parallel.use_distributed_optimizer to match, or load with load_optimizer=False")
    if load_optimizer and sharding_type == "dp_reshardable" and not same_layout and \
            any(saved_layout.get(k) != layout[k] for k in _MODEL_SHARDING):
        raise CheckpointMismatchError(
            f"checkpoint {step_dir} stores the distributed optimizer as 'dp_reshardable', which only "
            f"loads with the same TP/PP/EP and pipeline split (saved {saved_layout}, here {layout}): load with "
            "load_optimizer=False or resume in the saved layout")
    if load_optimizer and not use_dist_opt:
        _check_plain_optimizer_structure(tm.optimizer, step_dir, int(saved_optim.get("num_optimizers", 1)))
    if problems:
        load_optimizer = False  # strict=False with a different parameter set: fresh optimizer state

    metadata = _sharded_metadata(sharding_type)
    model_sd = tm.module.sharded_state_dict(metadata=metadata)
    request = {"model": model_sd}
    if load_optimizer:
        _ensure_optimizer_state(tm.optimizer)
        request["optimizer"] = tm.optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=metadata)
    if load_rng:
        saved_world = int(saved_layout.get("world_size", 1))
        rank = _rank()
        if same_layout:  # my own streams
            request[_RNG_KEY] = {"use": _rng_object(saved_world, rank, None)}
        else:
            # Global rank 0's streams, read by every rank (rank 0 as the main replica). The other
            # saved ranks' objects are requested too, spread over the ranks and unused, because
            # dist_checkpointing's load validation insists that every saved shard is accessed.
            request[_RNG_KEY] = {"use": _rng_object(saved_world, 0, None, replica=rank)}
            request[_RNG_KEY].update({f"unused_{i}": _rng_object(saved_world, i, None)
                                      for i in range(1, saved_world) if i % _world() == rank})
    loaded = dist_checkpointing.load(
        request, str(step_dir),
        strict=StrictHandling.RAISE_UNEXPECTED if strict else StrictHandling.LOG_UNEXPECTED)

    missing, _ = tm.module.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing and strict:
        raise CheckpointMismatchError(f"checkpoint {step_dir} lacks model tensors {missing[:8]}: load with "
                                      "strict=False to keep their current values")
    if load_optimizer:
        if use_dist_opt:
            _load_distributed_optimizer_state(tm.optimizer, loaded["optimizer"], step_dir,
                                              loaded.get("r1mega", {}).get("optimizer_param_groups", []))
        else:
            _load_plain_optimizer_state(tm.optimizer, loaded["optimizer"])
    if not weights_only:
        # OptimizerParamScheduler.load_state_dict *adds* the saved step count to the current one.
        tm.scheduler.num_steps = 0
        tm.scheduler.load_state_dict(loaded["scheduler"])
    if load_rng:
        restore_rng(loaded[_RNG_KEY]["use"], include_device=same_layout)
    common = loaded.get("r1mega", {})
    step = int(common.get("step", meta.get("step", 0)))
    barrier()
    seconds = time.perf_counter() - t0
    if _rank() == 0:
        log.info("loaded checkpoint %s (step %d, saved at %s, %s layout, %.2fs)", step_dir, step,
                 {k: saved_layout.get(k) for k in ("tp", "pp", "ep", "dp")},
                 "same" if same_layout else "different", seconds)
    return {"step": step, "extra": common.get("extra", {}), "path": step_dir, "meta": meta,
            "same_layout": same_layout, "seconds": seconds}
