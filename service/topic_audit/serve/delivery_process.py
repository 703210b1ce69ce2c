"""The delivery process: the child of ``serve`` that delivers the outbox to the app's handler(s).

It runs in its own interpreter, so delivering (HTTP, recording each attempt) never takes CPU or the GIL
from the answers to Tencent (docs/performance.md, "Forwarding"); it loads only what delivering needs (the outbox, the
sender, the connection to ``serve``'s writer process, which records the attempts in its groups), not
the receiver. :class:`~topic_audit.forwarding.deliverer.Deliverer` does the work, in the loop of
:mod:`topic_audit.forwarding.loop`; this module is the process around it. ``serve``'s supervisor starts
one (:class:`topic_audit.serve.delivery.DeliveryProcess`), however many receivers run.

Between ``serve`` and the child:

- stdin: a byte means "rows were queued, look now"; end of file means ``serve`` is gone (stopped, or
  killed): the child stops, abandoning attempts under way (their rows stay pending).
- the wake socket (``TOPIC_AUDIT_DELIVERY_SOCKET``): the receivers' "rows were queued", one datagram each
  (:class:`topic_audit.forwarding.loop.Waker`).
- stdout: a JSON line every :data:`~topic_audit.forwarding.loop.REPORT_SECONDS` with the metric updates
  (:class:`~topic_audit.forwarding.deliverer.Report`), which ``serve`` applies to its metrics (one
  ``/metrics`` for everything).
- stderr: log lines, folded into ``serve``'s.
- the environment: the settings (:data:`~topic_audit.settings.WORKER_SETTINGS`), the token, and the
  writer process's socket (``TOPIC_AUDIT_WRITER_SOCKET``; without one the attempts are recorded on a
  write connection of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO

import uvloop

from topic_audit.forwarding.loop import DELIVERY_SOCKET, listen, start
from topic_audit.settings import WORKER_SETTINGS, Settings, configure_logging
from topic_audit.writer.client import WRITER_SOCKET, RemoteWriter

NICENESS = 10
"""How much less CPU the delivery process asks for than the processes that answer Tencent (set first
thing, so that every thread it starts inherits it). What it delivers was answered already: when the two
cores are short, the answers go first and the outbox is delivered a moment later; otherwise nothing
waits. Flat out at 32 connections (docs/performance.md, "Forwarding"): 0.33 → 0.39 of bare, p99 3.3 →
2.5 times bare's; the outbox ~9,000 behind after 10 s instead of ~300, drained in ~2.5 s. Under
sustained saturation it grows by the difference (~900 a second there) for as long as it lasts."""


def main() -> None:
    """``python -m topic_audit.serve.delivery_process``, started by ``serve``: settings from the environment."""
    os.nice(NICENESS)
    configure_logging()
    settings = Settings.from_workers_json(
        os.environ[WORKER_SETTINGS], os.environ.get("TOPIC_AUDIT_TOKEN") or None
    )
    uvloop.run(_child(settings, sys.stdout.buffer))  # aiohttp's sends cost less CPU on uvloop


async def _child(settings: Settings, out: IO[bytes]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    socket_path = os.environ.get(WRITER_SOCKET)
    writer = RemoteWriter(Path(socket_path)) if socket_path else None
    if writer is not None:
        writer.start()

    def reported(line: bytes) -> None:
        with contextlib.suppress(OSError):
            out.write(line)
            out.flush()

    deliverer, delivering = start(settings, writer, reported)

    def on_input() -> None:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return
        if data:
            deliverer.wake()
        else:  # serve is gone
            loop.remove_reader(0)
            stop.set()

    os.set_blocking(0, False)
    loop.add_reader(0, on_input)
    wake_path = os.environ.get(DELIVERY_SOCKET)
    wakes = listen(Path(wake_path)) if wake_path else None
    if wakes is not None:
        loop.add_reader(wakes.fileno(), _drain, wakes, deliverer.wake)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    delivering.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await delivering
    if wakes is not None:
        loop.remove_reader(wakes.fileno())
        wakes.close()
    if writer is not None:
        writer.stop()


def _drain(sock: socket.socket, wake: Callable[[], None]) -> None:
    """Read every datagram waiting (one look at the outbox answers them all)."""
    with contextlib.suppress(BlockingIOError):
        while sock.recv(64):
            pass
    wake()


if __name__ == "__main__":  # pragma: no cover
    main()
