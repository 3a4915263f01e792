"""Left-padded static batches for the megatron rollout engine: prompts of any lengths share one KV cache.

megatron's static inference aligns prompts on the left and steps one position at a time from the end of
the shortest prompt, so a batch whose prompts differ by D tokens pays D extra forwards (and its first token
waits for them). Here every row is padded on the left to the longest prompt instead: the whole batch is
prefilled in one forward, then each forward decodes one token of every row. Row ``k``'s token ``t`` sits in
cache slot ``pad[k] + t``.

What keeps a row's result independent of its padding and of the rows beside it:

- positions: each row's tokens keep the positions ``0, 1, ...`` the learner gives them. ``position_ids`` are
  per row, and the rotary table megatron builds over the cache's slots is gathered per row by a forward hook
  on each rotary module (``[slots, 1, 1, d]`` -> ``[slots, rows, 1, d]``; megatron's rope broadcasts over the
  batch dimension, as with its multimodal rope);
- the attention mask (megatron's convention, True = masked) hides the pad slots from every query; a pad
  query sees only its own slot, so no softmax row is empty and no NaN reaches the cache;
- a prefill in groups of rows (megatron's ``batch_size_offset`` places each in the cache) feeds each group its
  own rows' tables and mask;
- finished rows are dropped from the batch (and from every layer's KV cache) once they are an eighth of it,
  so later forwards carry only rows that still generate.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch

DROP_FRACTION = 8  # drop finished rows once they are at least 1/8 of the fed batch (each drop copies the cache)


class PaddedBatch:
    """The rows of one static batch, left-padded; every tensor is in batch order (``rows``: the caller's row
    index of each batch position). ``new_tokens``: the most tokens a row generates (sizes the cache)."""

    def __init__(self, prompts: Sequence[Sequence[int]], new_tokens: int):
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        self.prompt_end = int(lengths.max())  # the slot after every prompt's last token
        self.slots = self.prompt_end + int(new_tokens)
        self.pad = self.prompt_end - lengths
        self.rows = torch.arange(len(prompts))
        slot = torch.arange(self.slots)
        self.valid = slot.unsqueeze(0) >= self.pad.unsqueeze(1)  # [b, slots]: a real (not pad) slot
        self.positions = (slot.unsqueeze(0) - self.pad.unsqueeze(1)).clamp(min=0)
        self.tokens = torch.zeros(len(prompts), self.slots, dtype=torch.long)
        self.fed = slice(None)  # the rows of the last window: the ones the rotary hook gathers for
        self._table = None  # (rotary table, its version, fed rows, gathered table) of the last forward
        for k, p in enumerate(prompts):
            self.tokens[k, int(self.pad[k]): self.prompt_end] = torch.as_tensor(list(p), dtype=torch.long)

    def __len__(self) -> int:
        return int(self.rows.numel())

    def window(self, start: int, end: int, device, rows: slice = slice(None)) -> dict:
        """megatron's forward inputs for the slots ``[start, end)`` of ``rows`` (tokens, per-row positions and a
        ``[rows, 1, end - start, end]`` mask over the cache up to ``end``); the rotary hook follows ``rows``."""
        self.fed = rows
        query = torch.arange(start, end).unsqueeze(1)
        key = torch.arange(end).unsqueeze(0)
        allowed = (self.valid[rows, None, None, :end] & (key <= query)) | (key == query)
        return {"tokens": self.tokens[rows, start:end].to(device),
                "position_ids": self.positions[rows, start:end].to(device), "attention_mask": (~allowed).to(device)}

    def drop(self, finished: torch.Tensor, context) -> bool:
        """Drop the ``finished`` rows (bool, batch order) from the batch and from ``context``'s KV cache (a
        ``StaticInferenceContext``) when they are at least 1/``DROP_FRACTION`` of it; whether it did.
        megatron's ``swap_key_value_dict`` only permutes, so the cache is indexed here."""
        gone = int(finished.sum())
        if gone == 0 or gone == len(self) or gone * DROP_FRACTION < len(self):
            return False
        keep = (~finished).nonzero().squeeze(-1)
        for layer, (k, v) in list(context.key_value_memory_dict.items()):
            index = keep.to(k.device)
            context.key_value_memory_dict[layer] = (k.index_select(1, index), v.index_select(1, index))
        context.max_batch_size = int(keep.numel())
        for name in ("rows", "pad", "valid", "positions", "tokens"):
            setattr(self, name, getattr(self, name)[keep])
        self.fed = slice(None)
        self._table = None
        return True

    @contextmanager
    def rope(self, model: torch.nn.Module):
        """While active, every rotary module of ``model`` returns its table gathered at each row's positions."""
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

        hooks = [m.register_forward_hook(self._per_row) for m in model.modules() if isinstance(m, RotaryEmbedding)]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    def _per_row(self, module, args, output):
        emb, rest = (output[0], output[1:]) if isinstance(output, tuple) else (output, None)  # YaRN adds mscale
        if emb.dim() != 4 or emb.size(0) < self.slots or emb.size(1) != 1:
            raise RuntimeError(f"{type(module).__name__} gave a rotary table of shape {tuple(emb.shape)}; the padded "
                               f"batch needs [>= {self.slots}, 1, 1, d] (megatron's static-inference layout)")
        # megatron's table is the same tensor at every forward (its rotary forward is cached), so the gathered one
        # is kept until the rows change (a prefill group, a drop): a decode forward reuses it (a gather of
        # [slots, rows, d] was about 4% of a demo decode step)
        fed = (self.fed.start, self.fed.stop, self.fed.step)
        cached = self._table
        if cached is not None and cached[0] is emb and cached[1] == emb._version and cached[2] == fed:
            table = cached[3]
        else:
            table = emb[:, 0][self.positions[self.fed].t().to(emb.device)]  # [slots, fed rows, 1, d]
            self._table = (emb, emb._version, fed, table)
        return table if rest is None else (table, *rest)
