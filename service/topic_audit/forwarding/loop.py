"""The delivering loop around a :class:`~topic_audit.forwarding.deliverer.Deliverer`, as both its hosts run
it: ``serve``'s delivery process (:mod:`topic_audit.serve.delivery_process`, one per ``serve``) and the
app alone (:class:`topic_audit.forwarding.forwarder.LocalDelivery`: tests and tools that build the app
without ``serve``).

- :class:`ForwarderLock`: ``<db>.forwarder.lock``, held by whoever delivers. One ``serve`` runs one
  delivery process, but two ``serve`` (or a ``serve`` and an app alone) on one database would otherwise
  both attempt every due row: the lock makes the second wait its turn.
- :func:`deliver`: take the lock, deliver, and hand over the metric updates every
  :data:`REPORT_SECONDS`.
- :class:`Waker` and :func:`listen`: a receiver says "rows were queued, look now" with one datagram to the
  delivery process's socket (:data:`DELIVERY_SOCKET`, in ``serve``'s own folder, 0700); a wake that
  finds nobody listening (the delivery process restarting) is dropped: it looks at the outbox every
  :data:`~topic_audit.forwarding.deliverer.POLL_SECONDS` anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

from topic_audit.forwarding.deliverer import Deliverer, Report, Writer
from topic_audit.settings import Settings

log = logging.getLogger("topic_audit.delivery")

DELIVERY_SOCKET = "TOPIC_AUDIT_DELIVERY_SOCKET"
"""Environment variable: the delivery process's wake socket (set by ``serve`` for its children)."""
REPORT_SECONDS = 0.25
LOCK_RETRY_SECONDS = 2.0


class ForwarderLock:
    """``<db>.forwarder.lock``, held (``flock``) by the one deliverer of a database that works."""

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
                except BlockingIOError:  # another deliverer works on this database
                    os.close(fd)
            await asyncio.sleep(LOCK_RETRY_SECONDS)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


async def deliver(
    settings: Settings, deliverer: Deliverer, report: Report, reported: Callable[[bytes], None]
) -> None:
    """Deliver until cancelled, once this process holds the lock; ``reported`` gets each report line
    (and the last one when cancelled)."""

    async def send_reports() -> None:
        while True:
            await asyncio.sleep(REPORT_SECONDS)
            if (line := report.line()) is not None:
                reported(line)

    async def run() -> None:
        await lock.acquire()
        await deliverer.run()

    lock = ForwarderLock(settings.db)
    tasks = [asyncio.create_task(run(), name="deliver"), asyncio.create_task(send_reports())]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await deliverer.stop()
        lock.release()
        if (line := report.line()) is not None:
            reported(line)


def start(
    settings: Settings, writer: Writer | None, reported: Callable[[bytes], None]
) -> tuple[Deliverer, asyncio.Task[None]]:
    """A :class:`Deliverer` and the task that runs :func:`deliver` with it (cancel it to stop)."""
    report = Report()
    deliverer = Deliverer(settings, report, writer)
    return deliverer, asyncio.create_task(deliver(settings, deliverer, report, reported), name="delivering")


class Waker:
    """A receiver's side of the wake socket."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # nobody listens (restarting), or wakes are already queued
            self._sock.sendto(b"\x01", self.path)

    async def stop(self) -> None:
        self._sock.close()


def listen(path: Path) -> socket.socket:
    """The delivery process's side of the wake socket: bound at ``path`` (in place of an ended
    process's), non-blocking."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    return sock
