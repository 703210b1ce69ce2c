"""The delivery process: a child of ``serve`` that delivers the outbox to the app's handler(s).

It runs in its own interpreter, so delivering (HTTP, recording each attempt) never takes CPU or the GIL
from the answers to Tencent (README, Performance); it loads only what delivering needs (the outbox, the
sender, the connection to ``serve``'s writer process, which records the attempts in its groups), not
the receiver. :class:`~topic_audit.forwarding.deliverer.Deliverer` does the
work; this module is the process around it. ``serve``'s side is
:class:`topic_audit.forwarding.forwarder.DeliveryProcess`.

Between ``serve`` and the child:

- stdin: a byte means "rows were queued, look now"; end of file means ``serve`` is gone (stopped, or
  killed): the child stops, abandoning attempts under way (their rows stay pending).
- stdout: a JSON line every :data:`REPORT_SECONDS` with the metric updates
  (:class:`~topic_audit.forwarding.deliverer.Report`), which ``serve`` applies to its metrics (one ``/metrics`` for
  everything).
- stderr: log lines, folded into ``serve``'s.
- the environment: the settings (:data:`~topic_audit.settings.WORKER_SETTINGS`), the token, and the
  writer process's socket (``TOPIC_AUDIT_WRITER_SOCKET``, the receiver's; without one, as when a test
  builds the app in one process, the attempts are recorded on a write connection of its own).

With ``serve --workers``, each worker starts a delivery process, and one at a time works: the holder of
``<db>.forwarder.lock`` (:class:`ForwarderLock`); the others wait for the lock, so every due row is
attempted by one process only.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import sys
from pathlib import Path
from typing import IO

from topic_audit.forwarding.deliverer import Deliverer, Report
from topic_audit.settings import WORKER_SETTINGS, Settings, configure_logging
from topic_audit.writer.client import WRITER_SOCKET, RemoteWriter

log = logging.getLogger("topic_audit.delivery")

REPORT_SECONDS = 0.25
LOCK_RETRY_SECONDS = 2.0


class ForwarderLock:
    """``<db>.forwarder.lock``, held (``flock``) by the one delivery process that works."""

    def __init__(self, db: Path) -> None:
        self.path = Path(f"{db}.forwarder.lock")
        self._fd: int | None = None

    async def acquire(self) -> None:
        """Wait until this process holds the lock (looking every :data:`LOCK_RETRY_SECONDS`)."""
        while self._fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                log.error("could not open %s (%s); trying again", self.path, exc)
            else:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    self._fd = fd
                    return
                except BlockingIOError:  # another delivery process works
                    os.close(fd)
            await asyncio.sleep(LOCK_RETRY_SECONDS)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def main() -> None:
    """``python -m topic_audit.serve.delivery_process``, started by ``serve``: settings from the environment."""
    configure_logging()
    settings = Settings.from_workers_json(
        os.environ[WORKER_SETTINGS], os.environ.get("TOPIC_AUDIT_TOKEN") or None
    )
    asyncio.run(_child(settings, sys.stdout.buffer))


async def _child(settings: Settings, out: IO[bytes]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    report = Report()
    socket_path = os.environ.get(WRITER_SOCKET)
    writer = RemoteWriter(Path(socket_path)) if socket_path else None
    if writer is not None:
        writer.start()
    deliverer = Deliverer(settings, report, writer)

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
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    async def send_reports() -> None:
        while True:
            await asyncio.sleep(REPORT_SECONDS)
            if (line := report.line()) is not None:
                out.write(line)
                out.flush()

    async def deliver() -> None:
        await lock.acquire()
        await deliverer.run()

    lock = ForwarderLock(settings.db)
    tasks = [asyncio.create_task(deliver()), asyncio.create_task(send_reports())]
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await deliverer.stop()
    if writer is not None:
        writer.stop()
    lock.release()
    if (line := report.line()) is not None:
        with contextlib.suppress(OSError):
            out.write(line)
            out.flush()


if __name__ == "__main__":  # pragma: no cover
    main()
