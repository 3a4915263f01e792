"""How many transformer layers each pipeline stage holds, by megatron-core's rules (no torch).

``parallel.num_layers_in_first_pipeline_stage`` / ``num_layers_in_last_pipeline_stage`` go to
megatron's ``TransformerConfig`` unchanged; megatron then splits the layers in
``get_num_layers_to_build`` / ``get_transformer_layer_offset`` (non-interleaved): the first and the last
stage hold what they are given, the middle stages share the rest evenly. Validation must know that
split before any process starts, so it is restated here; ``tests/test_pipeline_split.py`` evaluates
megatron's own functions on the same cases and requires the same answers.

megatron accepts a few settings that do not build what they say (e.g. at ``pp=1`` both edges set: its
``__post_init__`` divides by -1 middle stages and the one stage gets ``last`` layers). A split is valid
here only when megatron accepts it *and* the stages it builds hold each layer exactly once, with the
first / last stage sizes as configured.
"""

from __future__ import annotations

from typing import Optional


def megatron_refusal(num_layers: int, pp: int, first: Optional[int], last: Optional[int]) -> Optional[str]:
    """Why megatron-core 0.16's ``TransformerConfig.__post_init__`` rejects this split (None: accepted)."""
    if first is None and last is None:
        if num_layers % pp:
            return f"{num_layers} layers do not divide evenly over {pp} pipeline stages"
        return None
    if any(v is not None and v <= 0 for v in (first, last)):
        return "num_layers_in_first/last_pipeline_stage must be larger than 0"
    middle_layers, middle_stages = _middle(num_layers, pp, first, last)
    if bool(middle_layers) != bool(middle_stages):
        return f"{middle_layers} middle layers remaining but {middle_stages} middle pipeline stages"
    if middle_stages and middle_layers % middle_stages:
        return f"{middle_layers} middle layers do not divide over {middle_stages} middle pipeline stages"
    return None


def stage_layers(num_layers: int, pp: int, first: Optional[int], last: Optional[int]) -> list[int]:
    """Layers megatron builds on each pipeline rank (rank 0 first), as ``get_num_layers_to_build``.

    Only meaningful when :func:`megatron_refusal` is None; the counts may still not be a valid split
    (see :func:`split_problem`).
    """
    if first is None and last is None:
        return [num_layers // pp] * pp
    middle_layers, middle_stages = _middle(num_layers, pp, first, last)
    per_middle = middle_layers // middle_stages if middle_stages > 0 else 0
    counts = [per_middle] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last  # at pp=1 the only stage is the last one too, and megatron lets `last` win
    return counts


def split_problem(num_layers: int, pp: int, first: Optional[int], last: Optional[int]) -> Optional[str]:
    """Why this split cannot be built as configured, or None. Never names a fix (see :func:`suggest`)."""
    refusal = megatron_refusal(num_layers, pp, first, last)
    if refusal is not None:
        return refusal
    counts = stage_layers(num_layers, pp, first, last)
    if min(counts) < 1 or sum(counts) != num_layers:
        return f"the stages would hold {counts} layers, which is not {num_layers} layers split over {pp} stages"
    if (first is not None and counts[0] != first) or (last is not None and counts[-1] != last):
        return (f"with pp={pp} the one stage holds all {num_layers} layers, so first={first} / last={last} "
                f"cannot both hold")
    return None


def suggest(num_layers: int, pp: int, first: Optional[int], last: Optional[int], limit: int = 3
            ) -> list[tuple[Optional[int], Optional[int]]]:
    """Valid (first, last) pairs for ``pp`` stages, the most balanced first, then the closest to the
    given ones. Keeps the edges the caller set (both, when neither is set)."""
    use_first = first is not None or last is None
    use_last = last is not None or first is None
    firsts = range(1, num_layers + 1) if use_first else [None]
    lasts = range(1, num_layers + 1) if use_last else [None]
    found = []
    for f in firsts:
        for lst in lasts:
            if split_problem(num_layers, pp, f, lst) is None:
                counts = stage_layers(num_layers, pp, f, lst)
                distance = abs((f or 0) - (first or 0)) + abs((lst or 0) - (last or 0))
                found.append((max(counts), distance, f, lst))
    return [(f, lst) for _, _, f, lst in sorted(found)[:limit]]


def _middle(num_layers: int, pp: int, first: Optional[int], last: Optional[int]) -> tuple[int, int]:
    edges = [v for v in (first, last) if v is not None]
    return num_layers - sum(edges), pp - len(edges)
