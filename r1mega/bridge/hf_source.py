"""The tensors of an HF checkpoint directory as the bridge consumes them: one at a time, FP8 dequantised.

A blockwise-FP8 directory (DeepSeek-V3 / R1 as published) stores each quantised linear weight ``X``
as float8_e4m3fn plus ``X_scale_inv``; :meth:`HFSource.get` returns ``X`` dequantised to the
requested dtype, tile by tile (tile shape from ``quantization_config.weight_block_size``). Pairs are
checked when the directory is opened, before any weight is read: a float8 tensor without its scale,
a scale without its tensor, or float8 tensors without a ``quantization_config`` are errors naming both
sides. Casting FP8 values without their scales would load weights that are silently wrong.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from r1mega.bridge.fp8 import SCALE_SUFFIX, block_size, dequantize_blockwise
from r1mega.bridge.safetensors_io import HFReader

log = logging.getLogger(__name__)
_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


class HFFormatError(ValueError):
    """An HF directory whose tensors do not form a loadable checkpoint; the message names them."""


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{hf_dir}: no config.json (is this a Hugging Face model directory?)")
    return json.loads(path.read_text())


class HFSource:
    """Logical HF tensors (scales folded in) of ``hf_dir``; ``config`` defaults to its config.json."""

    def __init__(self, hf_dir: str | Path, config: dict | None = None):
        self.dir = Path(hf_dir)
        self.reader = HFReader(hf_dir)
        config = read_hf_config(hf_dir) if config is None else config
        quant = config.get("quantization_config")
        try:
            self.block = block_size(quant, str(self.dir / "config.json"))
        except ValueError as e:
            raise HFFormatError(str(e)) from None
        self.scales = self._pair_scales()
        if self.scales:
            log.info("%s: %d blockwise-FP8 weights (tile %s) are dequantised on read", self.dir,
                     len(self.scales), self.block)

    def _pair_scales(self) -> dict[str, str]:
        names = set(self.reader.names())
        float8 = sorted(n for n in names if self.reader.dtype(n) in _FLOAT8)
        scales = sorted(n for n in names if n.endswith(SCALE_SUFFIX))
        problems = []
        for n in float8:
            if self.reader.dtype(n) != torch.float8_e4m3fn:
                problems.append(f"{n} is {self.reader.dtype(n)}; only float8_e4m3fn weights are read")
            elif n + SCALE_SUFFIX not in names:
                problems.append(f"{n} is float8_e4m3fn but its scale {n + SCALE_SUFFIX} is missing")
        for s in scales:
            weight = s.removesuffix(SCALE_SUFFIX)
            if weight not in names:
                problems.append(f"scale {s} has no weight {weight}")
            elif self.reader.dtype(weight) not in _FLOAT8:
                problems.append(f"scale {s} belongs to {weight}, which is {self.reader.dtype(weight)}, not float8")
        if float8 and self.block is None and not problems:
            problems.append(f"{len(float8)} float8 tensors (e.g. {float8[0]}) but config.json has no "
                            "quantization_config with weight_block_size to say how their scales tile them")
        if problems:
            more = f"\n  - ... {len(problems) - 10} more" if len(problems) > 10 else ""
            shown = "\n  - ".join(problems[:10]) + more
            raise HFFormatError(f"{self.dir}: the FP8 weights and their scales do not pair up:\n  - {shown}\n"
                                "The checkpoint is incomplete or mixed: download the missing file(s) again.")
        return {n: n + SCALE_SUFFIX for n in float8}

    def __contains__(self, name: str) -> bool:
        return name in self.reader and not name.endswith(SCALE_SUFFIX)

    def names(self) -> list[str]:
        return [n for n in self.reader.names() if not n.endswith(SCALE_SUFFIX)]

    def is_quantized(self, name: str) -> bool:
        return name in self.scales

    def shape(self, name: str) -> tuple[int, ...]:
        return self.reader.shape(name)

    def nbytes(self, name: str) -> int:
        return self.reader.nbytes(name)

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """``name`` in ``dtype``: a view when it is stored so, else a new tensor (FP8 dequantised)."""
        if name in self.scales:
            q, s = self.reader.get(name), self.reader.get(self.scales[name])
            try:
                return dequantize_blockwise(q, s, self.block, dtype)
            except ValueError as e:
                raise HFFormatError(f"{self.dir}: {name}: {e} (quantization_config.weight_block_size="
                                    f"{list(self.block)})") from None
        t = self.reader.get(name)
        return t if t.dtype == dtype else t.to(dtype)

    def release(self, name: str) -> None:
        """Done with ``name``: its mapped pages leave the resident set."""
        self.reader.release(name)
        if name in self.scales:
            self.reader.release(self.scales[name])
