"""The refit transport between a learner rank and its engine process (``r1mega.rollout.transport``),
without vLLM: a spawned receiver reads streamed batches through two reusable buffers (shared memory on
CPU, CUDA IPC on GPU) and must see exactly what was sent, also when buffers are reused, grown, and
after a failure on either side mid-stream."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from r1mega.rollout.refit_profile import Sections
from r1mega.rollout.transport import RemoteFailure, SlotBuffers, engine_visible_devices, open_buffer, send_stream

sys.path.insert(0, str(Path(__file__).parent))
from transport_peer import receive_main  # noqa: E402


class Peer:
    """A receiver process and the learner-side callables ``send_stream`` needs."""

    def __init__(self, device: str, delay_s: float = 0.03):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=receive_main, args=(child, delay_s, device), daemon=True)
        self.proc.start()
        child.close()
        self.sent: list[tuple] = []

    def send(self, *msg) -> None:
        method, *args = msg
        self.sent.append(msg)
        self.conn.send((method, tuple(args)))

    def wait(self):
        if not self.conn.poll(60):
            raise TimeoutError("transport receiver gave no answer within 60 s")
        status, value = self.conn.recv()
        if status != "ok":
            raise RemoteFailure(value)
        return value

    def push(self, slots: SlotBuffers, batches):
        self.sent.clear()
        self.send("stream")
        return send_stream(batches, slots, self.send, self.wait, Sections())

    def new_handles(self) -> int:
        return sum(1 for m in self.sent if m[0] == "batch" and m[2] is not None)

    def close(self) -> None:
        self.conn.send(("close", ()))
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


def _batches(device: str, seed: int) -> list[list[tuple[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 10, generator=g)
    out = [
        [("a", base), ("a.t", base.t()), ("a.slice", base[1:5, ::3]), ("scalar", torch.tensor(seed + 0.5))],
        [("bf16", torch.randn(33, 17, generator=g).to(torch.bfloat16)), ("ids", torch.arange(7) * seed)],
        [("big", torch.randn(5 << 20, generator=g))],  # 20 MiB: larger than a fresh 16 MiB buffer
        [("c", torch.randn(3, 3, generator=g))],
        [],  # an empty batch (a layer with nothing to push) is handed back too
        [("d", torch.randn(1000, generator=g).half())],
    ]
    return [[(n, t.to(device)) for n, t in b] for b in out]


def _check(got: dict, batches) -> None:
    want = {n: t for b in batches for n, t in b}
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t.cpu()), f"{name}: the receiver read other bytes than were sent"


def _round_trips(device: str) -> None:
    peer = Peer(device)
    try:
        slots = SlotBuffers(2)
        first = _batches(device, seed=1)
        got, buffer_devices = peer.push(slots, iter(first))
        _check(got, first)
        assert buffer_devices == [device]
        assert peer.new_handles() == 3  # two buffers mapped, one of them grown for the 20 MiB batch
        second = _batches(device, seed=2)
        got, _ = peer.push(slots, iter(second))
        _check(got, second)
        assert peer.new_handles() == 0, "buffers are mapped once and reused across pushes"

        def failing():
            yield from _batches(device, seed=3)[:3]
            raise RuntimeError("bridge failed mid-stream")

        with pytest.raises(RuntimeError, match="bridge failed mid-stream"):
            peer.push(slots, failing())
        third = _batches(device, seed=4)
        _check(peer.push(slots, iter(third))[0], third)  # the next push after a learner-side failure

        bad = [[("fail", torch.zeros(2, device=device))]] + _batches(device, seed=5)
        with pytest.raises(RemoteFailure, match="engine-side failure"):
            peer.push(slots, iter(bad))
        fourth = _batches(device, seed=6)
        _check(peer.push(slots, iter(fourth))[0], fourth)  # the next push after an engine-side failure
    finally:
        peer.close()


@pytest.mark.timeout(120)
def test_shared_memory_transport_round_trips_reuses_and_recovers():
    _round_trips("cpu")


@pytest.mark.gpu
@pytest.mark.timeout(180)
def test_cuda_ipc_transport_round_trips_reuses_and_recovers():
    _round_trips("cuda")


def test_slot_buffers_layout_reuse_and_growth():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    batch = [("a", base), ("b.t", base.t()), ("c", base[1:3, ::2]), ("d", torch.tensor(3.5)),
             ("e", torch.randn(5, 7).to(torch.bfloat16)), ("f", torch.arange(3))]
    slots = SlotBuffers(2)
    new, entries = slots.pack(0, batch)
    assert new is not None and new.untyped_storage().is_shared()
    for (name, off, nbytes, dtype, shape), (ref_name, ref) in zip(entries, batch):
        assert name == ref_name and off % SlotBuffers.ALIGN == 0
        got = new[off: off + nbytes].view(dtype).view(shape)
        assert got.dtype == ref.dtype and torch.equal(got, ref)
    again, _ = slots.pack(0, batch[:2])  # fits: the engine keeps its mapping, nothing new is sent
    assert again is None
    grown, entries = slots.pack(0, [("big", torch.ones(5 << 20))])  # 20 MiB > the 16 MiB buffer
    assert grown is not None and grown.numel() >= 20 << 20
    assert torch.equal(grown[: entries[0][2]].view(torch.float32), torch.ones(5 << 20))
    with pytest.raises(ValueError, match="at least one buffer"):
        SlotBuffers(0)
    with pytest.raises(ValueError, match="unknown buffer handle kind"):
        open_buffer(("carrier_pigeon", (None, ())))


def test_engine_visible_devices_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU answer")
    assert engine_visible_devices({"CUDA_VISIBLE_DEVICES": "3"}) is None


@pytest.mark.gpu
def test_engine_visible_devices_maps_the_current_gpu_to_its_physical_id():
    torch.cuda.set_device(0)
    assert engine_visible_devices({}) == "0"
    assert engine_visible_devices({"CUDA_VISIBLE_DEVICES": "5, 7"}) == "5"


@pytest.mark.gpu
def test_cuda_batches_staged_through_host_memory_for_a_multi_worker_engine():
    slots = SlotBuffers(1, cuda_ipc=False)
    t = torch.randn(100, device="cuda")
    handle, entries = slots.pack(0, [("w", t)])
    assert handle.device.type == "cpu" and handle.untyped_storage().is_shared()
    assert torch.equal(handle[: entries[0][2]].view(torch.float32), t.cpu())
