"""The engine side of the refit transport without an engine: a spawned process that receives streamed
weight batches with ``transport.StreamReceiver`` and sends back copies of what it read (used by
``test_refit_transport.py``, run by ``multiprocessing`` spawn)."""

from __future__ import annotations

import time

import torch

from r1mega.rollout.refit_profile import Sections
from r1mega.rollout.transport import StreamReceiver, recv_message


def receive_main(conn, delay_s: float, device: str) -> None:
    """Per ``("stream",)`` message: read the stream, answer ``{name: cpu copy}`` plus the buffers' devices.
    Each batch is read ``delay_s`` after it arrived and handed back only then, so a learner that refilled
    a buffer before it was handed back would corrupt what is read. A tensor named ``fail`` raises (an
    engine-side failure mid-stream)."""
    if device == "cuda":
        torch.cuda.set_device(0)
    buffers: dict = {}
    while True:
        try:
            method, _ = recv_message(conn)
        except EOFError:
            return
        if method == "close":
            return
        receiver = StreamReceiver(conn, buffers, Sections())
        try:
            got = {}
            for slot, batch in receiver.batches():
                time.sleep(delay_s)
                for name, t in batch:
                    if name == "fail":
                        raise RuntimeError("engine-side failure on tensor 'fail'")
                    got[name] = t.to("cpu", copy=True)
                receiver.ack(slot)
            conn.send(("ok", (got, sorted({str(b.device.type) for b in buffers.values()}))))
        except Exception as e:  # noqa: BLE001 - answered to the learner like an engine error
            conn.send(("error", repr(e)))
            receiver.drain()
