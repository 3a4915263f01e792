"""The lean checkpoint writer writes what torch's writer writes: torch.save's record bytes, the same DCP
checkpoint, and a weights-only save that loads as one written through megatron's own writer."""

import io
import logging

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from r1mega.ckpt.lean_writer import LeanWriter, _Framer, _framer, _serialization_id
from r1mega.ckpt.record_reader import _bytes_of, direct_record_reader


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    fc1 = torch.randn(12, 5, generator=g).to(torch.bfloat16)
    return {
        "fp32": torch.randn(3, 4, 5, generator=g),
        "bf16": torch.randn(6, 10, generator=g).to(torch.bfloat16),
        "fp16": torch.randn(7, generator=g).to(torch.float16),
        "int64": torch.arange(-3, 8, dtype=torch.int64),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "up_half": fc1[6:],  # a SwiGLU half: rows of its owner's storage, at an offset
        "size1_strides": torch.randn(1, 3, generator=g).as_strided((1, 3), (9, 1)),  # contiguous, odd stride
        "large": torch.randn(1 << 18, generator=g),  # 1 MiB
    }


@pytest.fixture
def no_crc32():
    from torch.utils.serialization import config

    before = config.save.compute_crc32
    config.save.compute_crc32 = False
    yield
    config.save.compute_crc32 = before


@pytest.mark.parametrize("name", list(_tensors()))
def test_records_are_torch_save_bytes(name, no_crc32):
    """A framed record is byte for byte the archive torch.save writes of the tensor's own bytes (the
    serialization id, which torch derives from what the process saved, aside), and torch.load
    (weights_only) gives the tensor back."""
    t = _tensors()[name]
    ref = io.BytesIO()
    torch.save(t.clone() if t.untyped_storage().nbytes() != t.nbytes else t, ref)  # what DCP hands torch.save
    header, trailer = _Framer(_serialization_id(ref.getvalue())).frames(t)
    assert header + bytes(_bytes_of(t)) + trailer == ref.getvalue()
    header, trailer = _framer().frames(t)
    back = torch.load(io.BytesIO(header + bytes(_bytes_of(t)) + trailer), weights_only=True)
    assert back.dtype == t.dtype and back.shape == t.shape and back.stride() == t.stride()
    assert torch.equal(back, t)


def test_checkpoint_equals_torch_writers(tmp_path, no_crc32, caplog):
    """One state dict saved by both writers: the same records at the same offsets, the data files equal
    apart from the records' serialization ids, and torch's reader and the direct reader load the same
    tensors from both. Tensors the lean writer does not frame go through torch.save (logged)."""
    state = dict(_tensors(), transposed=torch.randn(5, 7).t(), fp8=torch.randn(4, 8).to(torch.float8_e4m3fn),
                 conj=torch.randn(3, 2, dtype=torch.complex64).conj(), step=7)
    with caplog.at_level(logging.INFO, logger="r1mega.ckpt.lean_writer"):
        dcp.save(state, storage_writer=LeanWriter(str(tmp_path / "lean")), no_dist=True)
    assert "3 record(s) through torch.save" in caplog.text
    for why in ("2 a non-contiguous, conjugate or negated view", "has no legacy storage class"):
        assert why in caplog.text
    dcp.save(state, storage_writer=FileSystemWriter(str(tmp_path / "torch")), no_dist=True)

    lean_md, torch_md = (FileSystemReader(str(tmp_path / d)).read_metadata() for d in ("lean", "torch"))
    assert lean_md.state_dict_metadata.keys() == torch_md.state_dict_metadata.keys()
    assert {k.fqn: (v.relative_path, v.offset, v.length) for k, v in lean_md.storage_data.items()} == \
        {k.fqn: (v.relative_path, v.offset, v.length) for k, v in torch_md.storage_data.items()}
    files = {d: (tmp_path / d / "__0_0.distcp").read_bytes() for d in ("lean", "torch")}
    assert len(files["lean"]) == len(files["torch"])
    differ = [i for i, (a, b) in enumerate(zip(files["lean"], files["torch"])) if a != b]
    ids = [i for info in torch_md.storage_data.values()
           for i in _id_bytes(files["torch"][info.offset: info.offset + info.length], info.offset)]
    assert set(differ) <= set(ids)

    for d in ("lean", "torch"):
        for reader in (FileSystemReader(str(tmp_path / d)), direct_record_reader(tmp_path / d)):
            out = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in state.items()}
            dcp.load(out, storage_reader=reader, no_dist=True)
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    assert out[k].dtype == v.dtype and torch.equal(_raw(out[k]), _raw(v)), k
                else:
                    assert out[k] == v


def _id_bytes(record: bytes, at: int) -> range:
    """File offsets of a record's serialization id."""
    sid = _serialization_id(record)
    start = record.rindex(sid, 0, len(record) - 200) if sid else 0  # the entry's bytes, not a later copy
    return range(at + start, at + start + len(sid)) if sid else range(0)


@pytest.mark.timeout(120)
def test_weights_only_save_loads_as_megatrons_writer(single_process_megatron, tmp_path):
    """A real model (SwiGLU halves are views of fc1) saved by save_weights and by megatron's own torch_dist
    writer loads the same tensors, bit for bit, through megatron's loader and through WeightsReader."""
    from r1mega.ckpt.weights import WeightsReader, save_weights
    from r1mega.config.presets import resolve_model
    from r1mega.config.schema import ModelConfig, ParallelConfig
    from r1mega.models.policy import build_policy

    from megatron.core import dist_checkpointing

    cfg = resolve_model(ModelConfig(preset="qwen3_moe", precision="bf16"))
    torch.manual_seed(0)
    stage = build_policy(cfg, ParallelConfig())
    lean = save_weights(stage.model, stage.config, tmp_path / "lean", model_cfg=cfg)
    (tmp_path / "megatron").mkdir()
    dist_checkpointing.save({"model": stage.model.sharded_state_dict()}, str(tmp_path / "megatron"))
    names = [n for n, _ in stage.model.named_parameters()]
    expected = dict(stage.model.state_dict())

    for step_dir in (lean, tmp_path / "megatron"):
        fresh = build_policy(cfg, ParallelConfig()).model
        for p in fresh.parameters():
            p.data.zero_()
        state = dist_checkpointing.load({"model": fresh.sharded_state_dict()}, str(step_dir))
        fresh.load_state_dict(state["model"], strict=False)
        got = dict(fresh.state_dict())
        assert all(torch.equal(got[n], expected[n]) for n in names), step_dir
        meta = build_policy(cfg, ParallelConfig(), meta=True).model
        read = WeightsReader(step_dir, meta).read(names)
        assert all(torch.equal(read[n], expected[n]) for n in names), step_dir


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.resolve_conj().reshape(-1).view(torch.uint8)


def test_another_record_format_goes_through_torch_save(tmp_path, no_crc32, caplog, monkeypatch):
    """Where the framing differs from this torch's torch.save (here: another pickle protocol for data.pkl),
    every tensor goes through torch.save, with a warning, and the checkpoint loads the same."""
    monkeypatch.setattr(torch.serialization, "DEFAULT_PROTOCOL", 4)  # torch.save's default is bound already
    _framer.cache_clear()
    monkeypatch.setattr("r1mega.ckpt.lean_writer._LOGGED", set())
    state = _tensors()
    try:
        with caplog.at_level(logging.INFO, logger="r1mega.ckpt.lean_writer"):
            dcp.save(state, storage_writer=LeanWriter(str(tmp_path)), no_dist=True)
    finally:
        _framer.cache_clear()
    assert "frames a tensor record differently" in caplog.text
    assert f"{len(state)} record(s) through torch.save ({len(state)} torch's record format differs)" in caplog.text
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(out, storage_reader=FileSystemReader(str(tmp_path)), no_dist=True)
    assert all(torch.equal(_raw(out[k]), _raw(v)) for k, v in state.items())
