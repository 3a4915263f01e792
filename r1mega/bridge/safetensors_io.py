"""Sharded safetensors: write HF buckets as they stream in, read single tensors on demand."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"


class ShardedWriter:
    """One ``model-XXXXX-of-NNNNN.safetensors`` per bucket plus the index (HF layout)."""

    def __init__(self, out_dir: str | Path, num_files: int):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.num_files = max(1, num_files)
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self._written = 0

    def write(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        self._written += 1
        fname = f"model-{self._written:05d}-of-{self.num_files:05d}.safetensors"
        # clone: views of one parameter (q/k/v, gate/up) share storage, which safetensors rejects
        payload = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors}
        save_file(payload, str(self.out / fname), metadata={"format": "pt"})
        for name, t in payload.items():
            if name in self.weight_map:
                raise ValueError(f"tensor {name} written twice")
            self.weight_map[name] = fname
            self.total_size += t.numel() * t.element_size()

    def close(self) -> None:
        if self._written != self.num_files:
            raise RuntimeError(f"wrote {self._written} of {self.num_files} safetensors files")
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")


class HFReader:
    """Random access to the tensors of an HF checkpoint dir (indexed or single-file)."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX
        if index.exists():
            self.weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.dir}: no *.safetensors files")
            self.weight_map = {}
            for f in files:
                with safe_open(str(f), "pt") as h:
                    for k in h.keys():
                        self.weight_map[k] = f.name
        self._handles: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def _handle(self, fname: str):
        if fname not in self._handles:
            self._handles[fname] = safe_open(str(self.dir / fname), "pt")
        return self._handles[fname]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{self.dir}: tensor {name!r} is missing")
        return self._handle(self.weight_map[name]).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.weight_map[name]).get_slice(name).get_shape())
