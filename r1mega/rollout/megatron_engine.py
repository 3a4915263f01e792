"""Rollout engine inside the learner: generation with megatron-core's inference over the learner's own chunk.

``rollout.engine=megatron``. The engine holds no weights of its own: it reads the parameters the learner
has just updated (no HF export, no refit, no second copy), so it runs wherever the learner runs, with
what travels to a GPU machine (torch + the megatron-core wheel; no vLLM, TE or flash-attn).

What is megatron's and what is r1mega's:

- megatron-core's ``StaticInferenceContext`` (the KV cache, allocated by each attention layer on first
  use, MLA included) and ``GPTInferenceWrapper`` (the causal mask and positions of each context window,
  the forward with and without pipeline parallelism, the logits gathered over TP) run every forward.
- The sampling loop is r1mega's. megatron's ``TextGenerationController`` cannot give what a rollout
  needs: it samples a whole batch from one generator (no per-sample seed, so samples would depend on
  how prompts are split over data-parallel ranks), returns log-probs of the raw logits (not of the
  tempered / top-k / top-p distribution it sampled from), refuses top-k with top-p, stops only on one
  end id, has no routing capture, and its ranks are not kept in step across the expert-parallel group
  when their batches finish at different times. So this loop drives the wrapper and context itself.
  Its batches are left-padded (``padded_batch``) rather than megatron's left-aligned ones: one prefill
  forward for prompts of any lengths, then one forward per generated token, finished rows dropped, each
  row at its own positions behind a padding mask (which r1mega's SDPA core attention applies; Transformer
  Engine layers are refused).

The contract, as for the vLLM engines: sample ``j`` of the prompt with seed ``s`` draws from its own
``torch.Generator`` seeded from ``(s, j)`` (all its uniforms are drawn up front; a token is picked by
inverse CDF), so a sample does not depend on the batch it is in, nor on the number of data-parallel
groups generating. Log-probs are those of the sampled distribution (``processed``: after temperature,
top-k and top-p, the right ones for importance ratios) or of the raw logits (``raw``).

Every method is collective over the learner's world (every rank calls it with the same arguments): the
prompts are split round-robin over the data-parallel groups, each group generates its share (its TP / PP
/ EP ranks together), and the groups run their forwards in lock step (a finished group runs one-token
dummy forwards) because an expert-parallel all-to-all spans them. The KV cache lives only for one call
(freed on return), so a GPU learner gets that memory back for training without a sleep.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from r1mega.rollout.padded_batch import PaddedBatch
from r1mega.rollout.protocol import Bucket, Generation, Prompt, RefitStats, SamplingSpec, log_once

log = logging.getLogger(__name__)

_SAMPLE_SEED_MULT = 1_000_003  # sample j of a prompt with seed s: generator seed s * mult + j (mod 2**63)


def sample_seed(prompt_seed: int, sample: int) -> int:
    """The generator seed of sample ``sample`` of a prompt seeded ``prompt_seed``."""
    return (int(prompt_seed) * _SAMPLE_SEED_MULT + int(sample)) % (2**63 - 1)


def filtered_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """``logits`` [B, V] of the distribution actually sampled from: divided by the temperature, then
    everything outside the top ``top_k`` (-1: off) and outside the smallest set whose probability reaches
    ``top_p`` (1: off) set to -inf (vLLM's order: top-k, then top-p; the most likely token always stays).
    With nothing to apply it is ``logits`` itself, not a copy."""
    x = logits / temperature if temperature != 1.0 else logits  # no step below writes in place
    if 0 < top_k < x.size(-1):
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = sorted_x.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability of the tokens ranked above
        drop = before >= top_p
        drop[:, 0] = False
        x = x.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return x


def pick(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: one token per row of the (filtered) ``logits`` [B, V] for ``uniforms`` [B] in
    [0, 1). A token of probability 0 is never picked."""
    cdf = logits.double().softmax(-1).cumsum(-1)
    target = (uniforms.double() * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=logits.size(-1) - 1)


@dataclass
class _Row:
    """One sample being generated on this data-parallel group."""

    prompt: int  # index into the call's prompts
    sample: int
    prompt_ids: list[int]
    uniforms: torch.Tensor  # [max_new_tokens] float64


@dataclass
class _Draws:
    """What one static batch has drawn, per row (the order of its rows)."""

    ids: torch.Tensor  # [b, max_new_tokens]
    logps: torch.Tensor  # [b, max_new_tokens] float64
    top_ids: torch.Tensor  # [b, max_new_tokens, max(top_logprobs, 1)]
    top_lps: torch.Tensor
    generated: torch.Tensor  # [b]: tokens drawn so far
    done: torch.Tensor  # [b] bool
    finish: list[str]

    @classmethod
    def empty(cls, b: int, sampling: SamplingSpec) -> "_Draws":
        new, top = sampling.max_new_tokens, max(sampling.top_logprobs, 1)
        return cls(torch.zeros(b, new, dtype=torch.long), torch.zeros(b, new, dtype=torch.float64),
                   torch.zeros(b, new, top, dtype=torch.long), torch.zeros(b, new, top, dtype=torch.float64),
                   torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.bool), ["length"] * b)


class MegatronEngine:
    """``RolloutEngine`` over the learner's model chunk (``tm.module``); collective (see the module doc).

    ``vocab_size``: the real vocabulary (the output layer's padded rows are never sampled).
    ``eos_id``: the tokenizer's end id (stops a sample unless ``ignore_eos``), besides the sampling's
    ``stop_token_ids``. ``tokenizer``: decodes ``Generation.text`` when the sampling asks for it
    (``return_text``; empty without one).
    ``return_routed_experts``: every sample carries the experts each fed token was routed to, recorded
    from the learner's routers in the very forwards that produced its tokens (R3).
    ``max_batch``: samples per forward on one data-parallel group (more are generated in rounds).
    ``prefill_tokens``: padded prompt tokens per prefill forward (a batch's prompts are prefilled in groups of
    rows within it, and ``prompt_logprobs`` scores sequences in batches within it): bounds the activations,
    the mask and the logits of one forward.
    """

    collective = True  # every learner rank calls every method (WeightSync, eval and rejection sampling rely on it)

    def __init__(self, model: torch.nn.Module, config, vocab_size: int, *, eos_id: Optional[int] = None,
                 tokenizer=None, logprobs_mode: str = "processed", return_routed_experts: bool = False,
                 max_batch: int = 256, prefill_tokens: int = 8192, seed: int = 0):
        from megatron.core import parallel_state

        if logprobs_mode not in ("processed", "raw"):
            raise ValueError(f"logprobs_mode={logprobs_mode!r}: choose 'processed' or 'raw'")
        if parallel_state.get_context_parallel_world_size() > 1:
            raise ValueError("rollout.engine=megatron does not generate with context parallelism (megatron's "
                             "static KV cache has no CP path): set parallel.cp=1 or rollout.engine=vllm")
        if max_batch < 1 or prefill_tokens < 1:
            raise ValueError(f"max_batch={max_batch} and prefill_tokens={prefill_tokens} must be >= 1")
        _check_core_attention(model)
        self.model, self.config, self.vocab_size = model, config, int(vocab_size)
        self.eos_id, self.tokenizer = eos_id, tokenizer
        self.logprobs_mode, self.max_batch, self.seed = logprobs_mode, int(max_batch), int(seed)
        self.prefill_tokens = int(prefill_tokens)
        self.return_routed_experts = return_routed_experts
        self.calls = 0  # unseeded calls draw from (seed, calls): the same on every rank
        self.version = 0
        ps = parallel_state
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.lockstep = ps.get_expert_model_parallel_world_size() > 1 and self.dp_size > 1
        # the rank that reports this data-parallel group's samples (WeightSync scores rewards there)
        self.owner = ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0
        self.routing = None
        if return_routed_experts:
            from r1mega.models import routing_replay

            if not config.num_moe_experts:
                raise ValueError("return_routed_experts needs an MoE model (model.num_experts > 0)")
            self.routing = routing_replay.for_model(model, config)
        log_once("megatron-engine", "rollout: megatron-core inference over the learner's own weights "
                 "(StaticInferenceContext + GPTInferenceWrapper, r1mega's seeded sampling loop): dp=%d tp=%d pp=%d "
                 "ep=%d%s", self.dp_size, self.tp_size, ps.get_pipeline_model_parallel_world_size(),
                 ps.get_expert_model_parallel_world_size(), ", expert-parallel lock step" if self.lockstep else "")

    # ------------------------------------------------------------------ megatron plumbing
    def _wrapper(self, batch: int, max_len: int):
        from megatron.core.inference.contexts import StaticInferenceContext
        from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
        from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig

        cfg = self.config
        wrapper_cfg = InferenceWrapperConfig(
            hidden_size=cfg.hidden_size, params_dtype=cfg.params_dtype, inference_batch_times_seqlen_threshold=-1,
            padded_vocab_size=self._padded_vocab(), inference_max_requests=batch, inference_max_seq_length=max_len,
            fp32_residual_connection=cfg.fp32_residual_connection)
        context = StaticInferenceContext(batch, max_len)
        wrapper = GPTInferenceWrapper(self.model, wrapper_cfg, context)
        wrapper.model_is_pipeline_parallel = self.pp_group.size() > 1
        context.reset()
        return wrapper

    def _padded_vocab(self) -> int:
        layer = getattr(self.model, "output_layer", None)
        if layer is not None:
            return layer.weight.size(0) * self.tp_size
        return self.vocab_size

    def _forward(self, wrapper, window: dict) -> torch.Tensor:
        """One forward of ``window`` (a ``PaddedBatch.window``): logits [B, s, V] (fp32, real vocabulary) on every
        rank of the group (broadcast from the last pipeline stage)."""
        from megatron.core.inference.communication_utils import broadcast_from_last_pipeline_stage

        if not wrapper.model_is_pipeline_parallel:
            logits = wrapper.forward_pass_without_pipeline_parallel(window)
        else:
            logits = wrapper.forward_pass_with_pipeline_parallel_small_input_batch(window)
            b, s = window["tokens"].shape
            s = 1 if wrapper.inference_context.materialize_only_last_token_logits else s
            logits = broadcast_from_last_pipeline_stage([b, s, self._padded_vocab()], self.config.params_dtype,
                                                        logits, pp_group=self.pp_group)
        return logits[..., : self.vocab_size].float()

    def _dummy_forward(self) -> None:
        """A one-row forward whose result is dropped: keeps this group in step with the expert-parallel
        all-to-alls of groups that still generate."""
        batch = PaddedBatch([[0] * self.tp_size], 0)
        wrapper = self._wrapper(1, batch.slots)
        wrapper.inference_context.materialize_only_last_token_logits = True
        self._forward(wrapper, batch.window(0, batch.slots, self._device()))

    def _idle(self) -> None:
        """Dummy forwards for as long as another group still generates (lock step), once this one is done."""
        self._dummy_forward()
        while self._any(False):
            self._dummy_forward()

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @contextmanager
    def _inference(self):
        """The model in eval mode, with sequence parallelism off (decode steps have one position; megatron
        does the same for static batching), routing recorded if asked; everything restored on exit."""
        from megatron.core.transformer.utils import set_model_to_sequence_parallel

        was_training, sp = self.model.training, bool(self.config.sequence_parallel)
        self.model.eval()
        if sp:
            set_model_to_sequence_parallel(self.model, False)
        if self.routing is not None:
            self.routing.set_record()
        try:
            with torch.no_grad():
                yield
        finally:
            if self.routing is not None:
                self.routing.clear()
            if sp:
                set_model_to_sequence_parallel(self.model, True)
            self.model.train(was_training)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the KV cache goes back to the learner

    def _any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (world all-reduce); just ``flag`` without lock step."""
        return self._most(int(flag)) > 0

    def _most(self, count: int) -> int:
        """The largest ``count`` of all groups under lock step (every group runs as many forwards); else ``count``."""
        if not self.lockstep:
            return count
        t = torch.tensor([count], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[Prompt], n: int, sampling: SamplingSpec) -> list[list[Generation]]:
        """``n`` samples of every prompt, on every rank (collective)."""
        mine = self.generate_share(prompts, n, sampling)
        everyone = _gather_dicts(mine if self.owner else {})
        return [everyone[i] for i in range(len(prompts))]

    def generate_share(self, prompts: Sequence[Prompt], n: int, sampling: SamplingSpec) -> dict[int, list[Generation]]:
        """Collective; returns this data-parallel group's samples ``{prompt index: [n Generations]}`` on every
        rank of the group (prompt ``i`` is generated by group ``i % dp``)."""
        self._check(prompts, sampling)
        call = self.calls
        self.calls += 1
        seeds = [sampling.seed_of(i) for i in range(len(prompts))]
        seeds = [sample_seed(self.seed, call) * 7919 + i if s is None else s for i, s in enumerate(seeds)]
        rows = []
        for i in range(self.dp_rank, len(prompts), self.dp_size):
            ids = [int(t) for t in prompts[i]]
            for j in range(n):
                g = torch.Generator().manual_seed(sample_seed(seeds[i], j))
                rows.append(_Row(i, j, ids, torch.rand(sampling.max_new_tokens, generator=g, dtype=torch.float64)))
        rows.sort(key=lambda r: len(r.prompt_ids))  # similar lengths share a batch: less padding
        rounds = self._most(max(1, math.ceil(len(rows) / self.max_batch)))
        out: dict[int, list[Generation]] = {}
        with self._inference():
            for r in range(rounds):
                for g in self._generate_rows(rows[r * self.max_batch:(r + 1) * self.max_batch], sampling):
                    out.setdefault(g.prompt_index, []).append(g)
        return out

    def _check(self, prompts: Sequence[Prompt], sampling: SamplingSpec) -> None:
        if sampling.logprobs_mode != self.logprobs_mode:
            raise ValueError(f"sampling.logprobs_mode={sampling.logprobs_mode!r} but this engine was built with "
                             f"{self.logprobs_mode!r}: rebuild the engine")
        if sampling.stop:
            raise ValueError(f"stop strings {sampling.stop} need detokenizing every step, which the megatron engine "
                             "does not do: stop on token ids (rollout.stop_token_ids) or use rollout.engine=vllm")
        if sampling.prompt_seeds is not None and len(sampling.prompt_seeds) != len(prompts):
            raise ValueError(f"{len(sampling.prompt_seeds)} prompt_seeds for {len(prompts)} prompts")
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                raise TypeError(f"prompt {i} is text: the megatron engine takes token ids (tokenize it first)")
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")

    def _stop_ids(self, sampling: SamplingSpec) -> list[int]:
        ids = list(sampling.stop_token_ids)
        if self.eos_id is not None and not sampling.ignore_eos:
            ids.append(int(self.eos_id))
        return sorted(set(ids))

    def _generate_rows(self, rows: list[_Row], sampling: SamplingSpec) -> list[Generation]:
        """One static batch on this group, kept in lock step with the other groups (collective): the prompts
        left-padded (``PaddedBatch``), prefilled in one forward, then one forward per generated token, finished
        rows dropped from the batch as they accumulate."""
        if not rows:  # the other groups' forwards, each answered by a dummy one: their prefill, then their steps
            for _ in range(self._most(0)):
                self._dummy_forward()
            while self._any(False):
                self._dummy_forward()
            return []
        device = self._device()
        batch = PaddedBatch([r.prompt_ids for r in rows], sampling.max_new_tokens)
        pads = batch.pad.clone()
        draws = _Draws.empty(len(rows), sampling)
        uniforms = torch.stack([r.uniforms for r in rows])
        stop = torch.tensor(self._stop_ids(sampling), dtype=torch.long)
        routes = None
        if self.routing is not None:  # per row and cache slot
            routes = torch.zeros(len(rows), batch.slots, self.routing.num_moe_layers, self.routing.topk,
                                 dtype=torch.int16)
        wrapper = self._wrapper(len(rows), batch.slots)
        context = wrapper.inference_context
        context.materialize_only_last_token_logits = True
        start, end = 0, batch.prompt_end
        logits = self._prefill(wrapper, batch, routes)
        idle = False
        with batch.rope(self.model):  # this batch's forwards only: a dummy forward has a rotary table of its own
            while True:
                if start > 0:
                    logits = self._forward(wrapper, batch.window(start, end, device))[:, -1, :].cpu()
                    if routes is not None:
                        routes[batch.rows, start:end] = self._recorded(len(batch), end - start)
                context.enable_decode_mode()
                batch.tokens[:, end] = self._sample_step(logits, batch.rows, uniforms, stop, sampling, draws)
                start, end = end, end + 1
                active = not bool(draws.done.all())
                if not self._any(active):
                    break
                if not active:  # this group is finished; others still run the all-to-alls
                    idle = True
                    break
                batch.drop(draws.done[batch.rows], context)
        if idle:
            self._idle()
        out = []
        for k, r in enumerate(rows):
            m = int(draws.generated[k])
            ids = draws.ids[k, :m].tolist()
            gen = Generation(r.prompt, r.sample, list(r.prompt_ids), ids, self._text(ids, sampling),
                             draws.logps[k, :m].tolist(), draws.finish[k])
            if routes is not None:  # the fed tokens: the prompt and all generated ones but the last
                p = int(pads[k])
                gen.routed_experts = routes[k, p: p + len(r.prompt_ids) + m - 1].clone()
            if sampling.top_logprobs:
                gen.top_ids = draws.top_ids[k, :m, : sampling.top_logprobs].tolist()
                gen.top_logprobs = draws.top_lps[k, :m, : sampling.top_logprobs].tolist()
            out.append(gen)
        return out

    def _prefill(self, wrapper, batch: PaddedBatch, routes: Optional[torch.Tensor]) -> torch.Tensor:
        """The prompts' forwards: groups of rows of at most ``prefill_tokens`` padded tokens, each placed in the
        KV cache by megatron's ``batch_size_offset`` (as many forwards as the busiest group under lock step);
        the logits [b, V] of every row's last prompt token."""
        context, end = wrapper.inference_context, batch.prompt_end
        per = max(1, self.prefill_tokens // end)
        groups = [slice(i, min(i + per, len(batch))) for i in range(0, len(batch), per)]
        out = []
        forwards = self._most(len(groups))
        with batch.rope(self.model):
            for rows in groups:
                context.batch_size_offset, context.sequence_len_offset = rows.start, 0
                out.append(self._forward(wrapper, batch.window(0, end, self._device(), rows))[:, -1, :].cpu())
                if routes is not None:
                    routes[batch.rows[rows], :end] = self._recorded(rows.stop - rows.start, end)
        for _ in range(forwards - len(groups)):  # outside the hooks: a dummy forward's rotary table is its own
            self._dummy_forward()
        context.batch_size_offset = 0  # sequence_len_offset: end, after the last group's forward
        return torch.cat(out)

    def _sample_step(self, logits: torch.Tensor, rows: torch.Tensor, uniforms: torch.Tensor, stop: torch.Tensor,
                     sampling: SamplingSpec, draws: "_Draws") -> torch.Tensor:
        """Draw the next token of every unfinished row of the batch (``logits`` [fed, V], ``rows``: the row of
        each batch position) into ``draws``; returns the tokens to feed ([fed], 0 for finished rows)."""
        live = (~draws.done[rows]).nonzero().squeeze(-1)
        who = rows[live]
        raw = logits[live]
        step = draws.generated[who]  # index of the token drawn now, per row
        if sampling.min_new_tokens and len(stop):
            early = step < sampling.min_new_tokens
            if early.any():
                raw = raw.clone()
                raw[early.nonzero().squeeze(-1).unsqueeze(-1), stop.unsqueeze(0)] = float("-inf")
        proc = filtered_logits(raw, sampling.temperature, sampling.top_k, sampling.top_p).double()
        chosen = pick(proc, uniforms[who, step])
        lp = torch.log_softmax(proc if self.logprobs_mode == "processed" else raw.double(), -1)
        draws.logps[who, step] = lp.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
        if sampling.top_logprobs:
            best = lp.topk(sampling.top_logprobs, dim=-1)
            draws.top_ids[who, step] = best.indices
            draws.top_lps[who, step] = best.values
        draws.ids[who, step] = chosen
        draws.generated[who] += 1
        hit = torch.isin(chosen, stop)
        draws.done[who] = hit | (draws.generated[who] >= sampling.max_new_tokens)
        for r in who[hit].tolist():
            draws.finish[r] = "stop"
        fed = torch.zeros(len(rows), dtype=torch.long)
        fed[live] = chosen
        return fed

    def _recorded(self, b: int, s: int) -> torch.Tensor:
        """This forward's routing ``[b, s, L_moe, k]`` (global expert ids), summed over pipeline stages."""
        table, _ = self.routing.recorded(b, s)
        if self.pp_group.size() > 1:
            table = table.to(torch.int64)
            dist.all_reduce(table, group=self.pp_group)
        return table.to(torch.int16)

    def _text(self, ids: list[int], sampling: SamplingSpec) -> str:
        if self.tokenizer is None or not sampling.return_text:  # (stop strings are refused above)
            return ""
        return self.tokenizer.decode([t for t in ids if t != self.eos_id])

    # ------------------------------------------------------------------ scoring
    def prompt_logprobs(self, token_ids: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(t_k | t_<k) of every sequence (raw logits), on every rank (collective). Each group scores its
        share in left-padded batches of sequences of similar lengths (at most ``prefill_tokens`` padded tokens
        or ``max_batch`` sequences), one forward each."""
        mine = {}
        chunks: list[list[int]] = []
        for i in sorted(range(self.dp_rank, len(token_ids), self.dp_size), key=lambda i: len(token_ids[i])):
            last = chunks[-1] if chunks else None  # ascending lengths: sequence i is the chunk's longest
            if last and len(last) < self.max_batch and (len(last) + 1) * len(token_ids[i]) <= self.prefill_tokens:
                last.append(i)
            else:
                chunks.append([i])
        count = self._most(len(chunks))
        with self._inference():
            for c in range(count):
                if c >= len(chunks):
                    self._dummy_forward()
                    continue
                batch = PaddedBatch([[int(t) for t in token_ids[i]] for i in chunks[c]], 0)
                wrapper = self._wrapper(len(batch), batch.slots)
                wrapper.inference_context.materialize_only_last_token_logits = False
                with batch.rope(self.model):
                    logits = self._forward(wrapper, batch.window(0, batch.slots, self._device())).cpu()
                lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch.tokens[:, 1:].unsqueeze(-1))
                for k, i in enumerate(chunks[c]):
                    mine[i] = lp[k, int(batch.pad[k]):, 0].tolist()
        everyone = _gather_dicts(mine if self.owner else {})
        return [everyone[i] for i in range(len(token_ids))]

    # ------------------------------------------------------------------ weights and memory
    def update_weights(self, buckets: Iterable[Bucket]) -> RefitStats:
        """Nothing to load: the engine reads the learner's parameters. The stream is drained (its gathers
        are collectives) and the version counted."""
        stats = RefitStats()
        for batch in buckets:
            stats.count(batch)
        self.version += 1
        stats.version = self.version
        return stats

    def sleep(self, level: int = 1) -> None:
        """Nothing held between calls: each call's KV cache is freed when it returns."""

    def wake(self, tags=None) -> None:
        """Nothing to bring back (see :meth:`sleep`)."""

    def close(self) -> None:
        self.model = None


def _check_core_attention(model: torch.nn.Module) -> None:
    """The padded batches need a core attention that applies the padding mask it is given with causal
    attention too: r1mega's ``SDPAttention`` does, Transformer Engine's ignores it (wrong tokens, silently)."""
    from r1mega.models.local_layers import SDPAttention

    other = sorted({type(m.core_attention).__name__ for m in model.modules()
                    if isinstance(getattr(m, "core_attention", None), torch.nn.Module)
                    and not isinstance(m.core_attention, SDPAttention)})
    if other:
        raise ValueError(f"rollout.engine=megatron masks the padding of its batches in r1mega's SDPA core attention; "
                         f"this model's core attention is {', '.join(other)} (Transformer Engine layers): use "
                         "rollout.engine=vllm, or build the learner without transformer-engine installed")


def _gather_dicts(mine: dict) -> dict:
    """The union of every rank's dict, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(mine)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    out = {}
    for p in parts:
        out.update(p)
    return out
