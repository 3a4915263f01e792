"""HF tensors a converted r1mega model does not hold, kept byte for byte for the way back to HF.

A DeepSeek-V3 checkpoint's multi-token-prediction layers (``model.layers.{N}...``) are converted into
the r1mega model's MTP block when ``model.mtp_num_layers`` covers them. Converted with fewer MTP
layers (``r1mega convert from-hf --mtp-layers 0``), the remaining layers' tensors (FP8 weights and
scales included) are copied unchanged into ``hf_passthrough.safetensors`` next to the checkpoint, and
``to-hf`` writes them back, so the exported directory still has every MTP layer of the original.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from r1mega.bridge.safetensors_io import HFReader, SafetensorsFile, write_safetensors

log = logging.getLogger(__name__)
PASSTHROUGH_FILE = "hf_passthrough.safetensors"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def layer_tensors(names: list[str], first_layer: int) -> list[str]:
    """The HF tensors of layers ``first_layer`` and beyond (FP8 scales included)."""
    return sorted(n for n in names if (m := _LAYER.match(n)) and int(m[1]) >= first_layer)


def save_passthrough(reader: HFReader, names: list[str], out_dir: str | Path, mtp_layers: int,
                     hf_cfg: dict) -> Path:
    """Copy ``names`` unchanged into ``out_dir/hf_passthrough.safetensors`` (one tensor in memory at a time)."""
    path = Path(out_dir) / PASSTHROUGH_FILE
    metadata = {"format": "pt", "num_nextn_predict_layers": str(mtp_layers),
                "quantization_config": json.dumps(hf_cfg.get("quantization_config") or {})}
    write_safetensors(path, [(n, reader.get(n)) for n in names], metadata, written=reader.release)
    return path


class Passthrough:
    """The kept tensors of a converted checkpoint (``find`` looks in the step dir, then its root)."""

    def __init__(self, path: Path):
        self.file = SafetensorsFile(path)
        self.mtp_layers = int(self.file.metadata.get("num_nextn_predict_layers", 0))
        self.quantization = json.loads(self.file.metadata.get("quantization_config") or "{}")

    @classmethod
    def find(cls, step_dir: str | Path) -> "Passthrough | None":
        for candidate in (Path(step_dir) / PASSTHROUGH_FILE, Path(step_dir).parent / PASSTHROUGH_FILE):
            if candidate.is_file():
                return cls(candidate)
        return None

    def check_export(self, fp8_block: list[int] | None) -> None:
        """FP8 tensors go back only into an FP8 export with the same tiles (the directory stays consistent)."""
        float8 = [n for n in self.file.keys() if self.file.dtype(n) in _FLOAT8]
        if not float8:
            return
        theirs = self.quantization.get("weight_block_size")
        if fp8_block is None or list(fp8_block) != list(theirs or []):
            raise ValueError(f"{self.file.path} keeps {len(float8)} FP8 tensors of the original MTP layer(s) "
                             f"(tiles {theirs}) unchanged: export with --fp8 so the directory stays one FP8 "
                             "checkpoint, or convert from HF with the MTP layers in the model (--mtp-layers)")

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, self.file.get(n)) for n in self.file.keys()]
