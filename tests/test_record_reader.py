"""The direct torch_dist record reader reads exactly what torch's reader reads, and refuses what it cannot parse."""

import io
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from r1mega.ckpt.record_reader import NotPlain, _RecordUnpickler, direct_record_reader


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "bf16": torch.randn(6, 10, generator=g).to(torch.bfloat16),
        "fp32": torch.randn(3, 4, 5, generator=g),
        "strided": torch.randn(7, 5, generator=g).t(),  # saved with its strides (storage size == numel)
        "scalar": torch.tensor(2.5),
        "flags": torch.tensor([True, False, True]),
        "ids": torch.arange(11, dtype=torch.int64),
        "empty": torch.empty(0, 4),
        "fp8": torch.randn(4, 8, generator=g).to(torch.float8_e4m3fn),
    }


def _load(path, reader, like: dict) -> dict:
    out = {k: torch.zeros_like(v) if v.dtype != torch.float8_e4m3fn else torch.empty_like(v) for k, v in like.items()}
    dcp.load(out, storage_reader=reader, no_dist=True)
    return out


def test_direct_reads_equal_torch_reads(tmp_path):
    state = _state()
    dcp.save(state, checkpoint_id=str(tmp_path), no_dist=True)
    stock = _load(tmp_path, FileSystemReader(str(tmp_path)), state)
    reader = direct_record_reader(tmp_path)
    direct = _load(tmp_path, reader, state)
    for k, v in state.items():
        assert direct[k].dtype == v.dtype and direct[k].shape == v.shape, k
        assert torch.equal(direct[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn else direct[k],
                           stock[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn else stock[k]), k
        assert torch.equal(direct[k].float(), v.float()), k
    # the strided record is read through a buffer and copied; every other one (DCP plans no read for the empty
    # tensor) in one readinto; none through torch.load
    assert reader.stats["torch.load"] == 0
    assert reader.stats["copied"] == 1 and reader.stats["direct"] == len(state) - 2


def test_a_strided_destination(tmp_path):
    """A destination that is a view (a transposed target) is filled through a copy."""
    full = torch.randn(8, 6)
    dcp.save({"w": full}, checkpoint_id=str(tmp_path), no_dist=True)
    target = torch.zeros(6, 8).t()  # non-contiguous destination
    reader = direct_record_reader(tmp_path)
    dcp.load({"w": target}, storage_reader=reader, no_dist=True)
    assert torch.equal(target, full) and reader.stats["copied"] == 1


def test_unknown_globals_are_refused():
    class Evil:
        def __reduce__(self):
            import os

            return (os.getcwd, ())

    with pytest.raises(NotPlain, match="posix.getcwd|os.getcwd"):
        _RecordUnpickler(io.BytesIO(pickle.dumps(Evil(), protocol=2))).load()


def test_records_it_cannot_parse_go_through_torch(tmp_path, caplog, monkeypatch):
    """Records the parser refuses are read by torch's reader, and that is logged."""
    state = {"w": torch.randn(4, 4), "v": torch.randn(3)}
    dcp.save(state, checkpoint_id=str(tmp_path), no_dist=True)
    reader = direct_record_reader(tmp_path)
    import r1mega.ckpt.record_reader as rr

    def refuse(*_):
        raise NotPlain("test: unparsed")

    monkeypatch.setattr(rr, "parse_record", refuse)
    with caplog.at_level("INFO", logger="r1mega.ckpt.record_reader"):
        out = _load(tmp_path, reader, state)
    assert all(torch.equal(out[k], state[k]) for k in state)
    assert reader.stats["torch.load"] == 2
    assert "test: unparsed" in caplog.text
