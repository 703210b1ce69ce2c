"""A receiver's side of the writer process: :class:`RemoteWriter`, with the writer thread's methods.

Everything happens on the receiver's event loop: a request is encoded (:mod:`topic_audit.writer.wire`) and
written to the writer's socket (the frames of one loop iteration in one write), and the answers, read
as they arrive, resolve the requests' futures. No thread, so no GIL handed back and forth.

If the writer process is gone (killed, or restarting), every request it had not answered fails with
:class:`~topic_audit.writer.committer.AppendError` (answered 503: it may or may not have been committed; it was
never acknowledged), and so does every request made while no writer can be reached within
:data:`CONNECT_SECONDS`. The receiver reconnects as soon as the writer listens again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from topic_audit.forwarding import outbox
from topic_audit.tencent import models
from topic_audit.writer import jobs, wire
from topic_audit.writer.requests import AppendError, Committed, Forward

log = logging.getLogger("topic_audit.writer")

T = TypeVar("T")

WRITER_SOCKET = "TOPIC_AUDIT_WRITER_SOCKET"
"""The environment variable naming the writer process's socket, for the receivers ``serve`` starts."""
CONNECT_SECONDS = 1.0
"""How long a request waits for the writer process to listen (a restarted writer takes ~0.5 s); well
inside Tencent's 2 s."""
ANSWER_SECONDS = 1.5
"""How long an append waits for the writer's answer (a writer that hangs without dying: a stalled disk,
SIGSTOP): then it is answered 503 -- it may still be committed later -- before Tencent's 2 s are up."""
MOST_WAITING = 8192
"""Requests waiting for the writer at once; past them, an append is answered 503 at once (a writer that
does not keep up must not fill the receiver's memory)."""
RETRY_SECONDS = 0.05
"""How often a receiver tries again to reach a writer process it has lost."""
FIRST_RETRY_SECONDS = 0.005
"""How often it tries before its first connection, for at most :data:`STARTING_SECONDS`: ``serve`` starts
the writer beside the receivers, and each millisecond here is one before the first answer."""
STARTING_SECONDS = 2.0
"""How long a writer not yet reached is taken to be starting (nothing said, tried every 5 ms); then it is
waited for out loud, as a lost one is (a writer that fails at start, a restart while it is down)."""
_RECORD = "(record)"
"""What a delivery record waits as, in ``_waiting`` (an append waits as "", a job as its class's name)."""
COMPLAIN_SECONDS = 10.0


class _Link(asyncio.Protocol):
    """One connection to the writer: answers in, resolved against what is waiting. Once it is closed,
    it tells the writer only if it is still the writer's current connection."""

    def __init__(self, writer: RemoteWriter) -> None:
        self.writer = writer
        self.buffer = bytearray()
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            for body in wire.frames(self.buffer):
                self.writer.answered(wire.reply(body))
        except wire.ProtocolError as exc:
            self.writer.complain(f"the writer process answered what is not an answer ({exc})")
            self.writer.lost(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.writer.lost(self.transport)


class _Waiting:
    """The requests sent to the writer and not answered yet, by sequence number: resolved by its answers,
    failed when it goes away or is late. Each is waited for as a name: "" for an append, ``_RECORD`` for
    a delivery record, a job's class name for a job."""

    def __init__(self, refuse: Callable[[int], None]) -> None:
        self.refuse = refuse
        """Told of every row answered 503 here."""
        self.futures: dict[int, tuple[str, asyncio.Future[Any] | Future[Any]]] = {}
        self.deadlines: deque[tuple[float, int]] = deque()
        """(deadline, seq) of the appends, in the order sent: their deadlines are in order too."""

    def __len__(self) -> int:
        return len(self.futures)

    def add(
        self, seq: int, name: str, future: asyncio.Future[Any] | Future[Any], deadline: float | None = None
    ) -> None:
        self.futures[seq] = (name, future)
        if deadline is not None:
            self.deadlines.append((deadline, seq))

    def answered(self, reply: wire.Reply) -> None:
        """Resolve what ``reply`` answers; :class:`~topic_audit.writer.wire.ProtocolError` (after failing that
        request) if it cannot be read."""
        if reply.seq == 0:  # the writer refused this receiver's hello
            raise wire.ProtocolError(wire.reason(reply.value))
        found = self.futures.pop(reply.seq, None)
        if found is None:  # answered too late (see ANSWER_SECONDS)
            return
        name, future = found
        if future.done():
            return
        try:
            if reply.status == wire.OK:
                if not name:
                    future.set_result(wire.committed(reply.value))
                elif name == _RECORD:
                    future.set_result(wire.exhausted(reply.value))
                else:
                    future.set_result(wire.result(name, reply.value))
            elif reply.status == wire.REFUSED:
                future.set_exception(AppendError(wire.reason(reply.value)))
                if not name:  # a row answered 503: counted here, where it is answered (once)
                    self.refuse(1)
            else:
                future.set_exception(RuntimeError(wire.reason(reply.value)))
        except wire.ProtocolError:
            future.set_exception(AppendError("the writer process answered what could not be read"))
            raise

    def fail_all(self, why: str) -> int:
        """Fail everything waiting with ``why``; the rows among it."""
        futures, self.futures = self.futures, {}
        self.deadlines.clear()
        rows = 0
        for name, future in futures.values():
            if not future.done():
                future.set_exception(AppendError(why))
                rows += not name
        return rows

    def expire(self, now: float) -> int:
        """Fail the appends whose deadline is past ``now``; how many."""
        deadlines, futures, late = self.deadlines, self.futures, 0
        while deadlines and (deadlines[0][1] not in futures or deadlines[0][0] <= now):
            _, seq = deadlines.popleft()
            found = futures.pop(seq, None)
            if found is not None and not found[1].done():
                found[1].set_exception(
                    AppendError(f"the writer process did not answer within {ANSWER_SECONDS} s")
                )
                late += 1
        return late


class RemoteWriter:
    """The writer process at ``path``, for one event loop (the receiver's)."""

    def __init__(self, path: Path, refused: Callable[[int], None] | None = None) -> None:
        self.path = path
        self.refused = refused
        """Told of every row answered 503: refused by the writer, or failed here (the writer could not
        be reached, went away, or did not answer in time)."""
        self._seq = itertools.count(1)
        self._waiting = _Waiting(self._refuse)
        self._transport: asyncio.Transport | None = None
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._disconnected.set()
        self._out: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._expiry: asyncio.Task[None] | None = None
        self._stopping = False
        self._complained_at = -COMPLAIN_SECONDS

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect (in the background, and again whenever the connection is lost); on the loop."""
        self._loop = asyncio.get_running_loop()
        self._keeper = self._loop.create_task(self._keep_connected(), name="writer-link")
        self._expiry = self._loop.create_task(self._expire(), name="writer-deadlines")

    async def connect(self, timeout: float = CONNECT_SECONDS) -> None:
        """Wait until connected (:class:`AppendError` after ``timeout``)."""
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            raise AppendError(f"the writer process does not listen on {self.path}") from None

    def stop(self) -> None:
        """Close the connection (what is still waiting fails)."""
        self._stopping = True
        for task in (self._keeper, self._expiry):
            if task is not None:
                task.cancel()
        if self._transport is not None:
            self._transport.close()
        self.lost(self._transport)

    @property
    def failing(self) -> bool:
        return not self._connected.is_set()

    # -- requests ----------------------------------------------------------------------------------
    async def append(
        self, row: dict[str, Any], event: models.TopicEvent | None = None, forward: Forward | None = None
    ) -> Committed:
        """Send ``row`` to the writer and wait until it is committed."""
        if not self._connected.is_set():
            try:
                await self.connect()
            except AppendError:
                self._refuse(1)
                raise
        if len(self._waiting) >= MOST_WAITING:
            self._refuse(1)
            raise AppendError(f"{MOST_WAITING} requests are waiting for the writer process already")
        seq = next(self._seq)
        frame = wire.append_frame(seq, row, event, forward)
        if len(frame) > wire.MAX_FRAME:
            self._refuse(1)
            raise AppendError(f"a row of {len(frame)} bytes is more than the writer takes")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Committed] = loop.create_future()
        self._waiting.add(seq, "", future, loop.time() + ANSWER_SECONDS)
        self._send(frame)
        return await future

    async def record(self, attempts: list[outbox.Attempt], schedule: tuple[int, ...]) -> list[outbox.Attempt]:
        """Have the writer record delivery attempts in its next group (the delivery process's); the
        attempts that exhausted ``schedule``. :class:`AppendError` if they could not be recorded (their
        outbox rows stay pending: attempted again)."""
        if not self._connected.is_set():
            await self.connect()
        seq = next(self._seq)
        future: asyncio.Future[list[outbox.Attempt]] = asyncio.get_running_loop().create_future()
        self._waiting.add(seq, _RECORD, future)
        self._send(wire.record_frame(seq, attempts, schedule))
        return await future

    def submit(self, job: jobs.Job[T]) -> Future[T]:
        """Run ``job`` on the writer, between groups; its result (or exception) in the future."""
        future: Future[T] = Future()
        assert self._loop is not None, "start() first"
        self._loop.call_soon_threadsafe(self._submit, job, future)
        return future

    def probe(self) -> Future[None]:
        """A real durable write by the writer (the heartbeat row): readiness."""
        return self.submit(jobs.Heartbeat())

    def _submit(self, job: jobs.Job[Any], future: Future[Any]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        if not self._connected.is_set():
            future.set_exception(AppendError(f"the writer process does not listen on {self.path}"))
            return
        seq = next(self._seq)
        try:
            frame = wire.job_frame(seq, job)
        except TypeError as exc:
            future.set_exception(exc)
            return
        self._waiting.add(seq, type(job).__name__, future)
        self._send(frame)

    def _send(self, frame: bytes) -> None:
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(frame)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self._transport is not None:
            self._transport.write(b"".join(out))

    # -- answers -----------------------------------------------------------------------------------
    def answered(self, reply: wire.Reply) -> None:
        """Resolve what ``reply`` answers (:meth:`_Waiting.answered`)."""
        self._waiting.answered(reply)

    def lost(self, transport: asyncio.BaseTransport | None) -> None:
        """The connection on ``transport`` is gone: if it is the current one, what was not answered fails
        (it was never acknowledged)."""
        if transport is not self._transport:
            return  # an earlier connection's: what waits was sent on the current one
        if self._transport is not None:
            self._transport.abort()
            self._transport = None
        self._connected.clear()
        self._disconnected.set()
        self._out = []
        rows = self._waiting.fail_all("the writer process went away before it answered")
        if rows:
            log.error("the writer process went away; %d requests answered 503", rows)
            self._refuse(rows)

    def complain(self, what: str) -> None:
        """Log ``what``, at most once every :data:`COMPLAIN_SECONDS` (it may recur at every reconnect)."""
        now = time.monotonic()
        if now - self._complained_at >= COMPLAIN_SECONDS:
            self._complained_at = now
            log.error("%s", what)

    def _refuse(self, rows: int) -> None:
        if self.refused is not None:
            self.refused(rows)

    async def _keep_connected(self) -> None:
        loop = asyncio.get_running_loop()
        said, starting_until = False, loop.time() + STARTING_SECONDS
        while not self._stopping:
            await self._disconnected.wait()
            starting = loop.time() < starting_until  # never connected, and only just started
            retry = FIRST_RETRY_SECONDS if starting else RETRY_SECONDS
            try:
                transport, _ = await loop.create_unix_connection(lambda: _Link(self), str(self.path))
            except OSError as exc:
                if not starting and not said:
                    log.warning("waiting for the writer process on %s (%s)", self.path, exc)
                    said = True
                await asyncio.sleep(retry)
                continue
            if transport.is_closing():  # the writer closed it already (stopping, or refused us)
                await asyncio.sleep(retry)
                continue
            transport.write(wire.hello())
            self._transport, said, starting_until = transport, False, 0.0
            self._disconnected.clear()
            self._connected.set()

    async def _expire(self) -> None:
        """Fail the appends the writer has not answered within :data:`ANSWER_SECONDS` (one sweep a
        tenth of that, rather than a timer per request)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(ANSWER_SECONDS / 10)
            late = self._waiting.expire(loop.time())
            if late:
                log.error("the writer process did not answer %d requests in time; answered 503", late)
                self._refuse(late)
