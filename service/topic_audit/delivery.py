"""The delivery process: a child of ``serve`` that delivers the outbox to the app's handler(s).

It runs in its own interpreter, so delivering (HTTP, recording each attempt) never takes CPU or the GIL
from the answers to Tencent (README, Performance). :class:`Deliverer` attempts what falls due, following
the retry schedule, at most :data:`~topic_audit.forward.PER_DESTINATION` at a time to each destination, so
a slow or dead destination holds only its own slots. An outbox row stays pending until its attempt is
recorded (in a group transaction of this process's own writer): a crash at any point means another
attempt, never a lost one. With ``serve --workers``, one delivery process at a time works (the holder of
``<db>.forwarder.lock``); the others wait for the lock.

Between ``serve`` and the child (:class:`DeliveryProcess` is the parent's side):

- stdin: a byte means "rows were queued, look now"; end of file means ``serve`` is gone (stopped, or
  killed): the child stops, abandoning attempts under way (their rows stay pending).
- stdout: a JSON line every :data:`REPORT_SECONDS` with the metric updates, which ``serve`` applies to
  its metrics (one ``/metrics`` for everything).
- stderr: log lines, folded into ``serve``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO, Any, TypeVar

from topic_audit import outbox
from topic_audit.forward import PER_DESTINATION, Sender, content_type, destination_label
from topic_audit.metrics import Metrics
from topic_audit.settings import WORKER_SETTINGS, Settings
from topic_audit.writer import AuditWriter

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
"""Longest wait between looks at the outbox (retries fall due; other processes queue rows)."""
BACKLOG_SECONDS = 1.0
"""How often the pending gauges are refreshed."""
LOCK_RETRY_SECONDS = 2.0
REPORT_SECONDS = 0.25
RECORD_SECONDS = 0.1
"""Finished attempts are recorded together at most this often: the delivery process then holds the
database's write lock ten short times a second, not once per answer (the receiver's commits would wait
on it)."""
RESTART_SECONDS = 1.0

T = TypeVar("T")


class Report:
    """Metric updates gathered in the child, sent to ``serve`` as one JSON line at a time."""

    def __init__(self) -> None:
        self.attempts: list[tuple[str, str, float]] = []
        self.exhausted: Counter[str] = Counter()
        self.backlog: dict[str, tuple[int, float]] = {}

    def attempted(self, label: str, result: str, seconds: float) -> None:
        self.attempts.append((label, result, round(seconds, 6)))

    def line(self) -> bytes | None:
        if not (self.attempts or self.exhausted or self.backlog):
            return None
        line = json.dumps(
            {"attempts": self.attempts, "exhausted": self.exhausted, "backlog": self.backlog}
        ).encode()
        self.attempts, self.exhausted, self.backlog = [], Counter(), {}
        return line + b"\n"


def apply(metrics: Metrics, line: bytes) -> None:
    """A report line from the child, applied to ``serve``'s metrics."""
    report = json.loads(line)
    for label, result, seconds in report["attempts"]:
        metrics.attempted(label, "after", result, seconds)
    for label, count in report["exhausted"].items():
        metrics.forward_failed.labels(label).inc(count)
    for label, (pending, age) in report["backlog"].items():
        metrics.forward_pending.labels(label).set(pending)
        metrics.forward_oldest_pending.labels(label).set(age)


class Deliverer:
    """Delivers the outbox until stopped (in the delivery process)."""

    def __init__(self, settings: Settings, writer: AuditWriter, report: Report) -> None:
        self.settings = settings
        self.writer = writer
        self.report = report
        self.destinations = settings.forward_url
        self.schedule = settings.forward_retry_schedule
        self.sender = Sender(settings.token)
        self._labels: dict[str, str] = {}
        self._reader: sqlite3.Connection | None = None
        self._read_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._flushing: asyncio.Task[None] | None = None
        self._attempts: set[asyncio.Task[None]] = set()
        self._sending: Counter[str] = Counter()
        """Attempts under way, per destination (at most PER_DESTINATION)."""
        self._unrecorded: dict[str, set[int]] = {}
        """Entries attempted (or being attempted) whose attempt is not recorded yet, per destination: the
        outbox still says pending for them, so they are skipped when looking for due rows."""
        self._results: list[outbox.Attempt] = []
        self._lock_file: int | None = None
        self._backlog_at = 0.0
        self._elsewhere: list[str] = []
        """Destinations with pending rows that are not configured (replayed elsewhere)."""

    def wake(self) -> None:
        self._wake.set()

    def label(self, destination: str) -> str:
        label = self._labels.get(destination)
        if label is None:
            label = self._labels[destination] = destination_label(destination)
        return label

    async def run(self) -> None:
        """Deliver what falls due, until cancelled."""
        await self.sender.start()
        self._reader = sqlite3.connect(
            f"file:{self.settings.db}?mode=ro", uri=True, check_same_thread=False, timeout=5
        )
        self._flushing = asyncio.create_task(self._record_now_and_then())
        while True:
            wait = POLL_SECONDS
            try:
                if self._holds_lock():
                    wait = await self._dispatch()
                    if time.monotonic() - self._backlog_at >= BACKLOG_SECONDS:
                        await self._report_backlog()
                else:
                    wait = LOCK_RETRY_SECONDS
            except Exception:
                log.exception("could not read the outbox; trying again")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            self._wake.clear()

    async def stop(self) -> None:
        """Abandon the attempts under way (their outbox rows stay pending, so they are attempted again
        after the restart); record what was already attempted."""
        for task in list(self._attempts):
            task.cancel()
        await asyncio.gather(*self._attempts, return_exceptions=True)
        if self._flushing is not None:
            self._flushing.cancel()
            with contextlib.suppress(BaseException):
                await self._flushing
        with contextlib.suppress(Exception):
            await self._flush()
        await self.sender.close()
        if self._reader is not None:
            self._reader.close()
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None

    def _holds_lock(self) -> bool:
        if self._lock_file is not None:
            return True
        fd = os.open(Path(f"{self.settings.db}.forwarder.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_file = fd
        return True

    async def _read(self, query: Callable[..., T], *args: Any) -> T:
        async with self._read_lock:
            return await asyncio.to_thread(query, self._reader, *args)

    async def _dispatch(self) -> float:
        """Start the attempts that are due; the seconds until the next one falls due (at most a poll).

        Each look costs a few index steps per destination whatever the backlog: the destinations with
        pending rows beyond the configured ones (replays elsewhere) are listed with the backlog gauges.
        """
        now = outbox.now_iso()
        wait = POLL_SECONDS
        for destination in dict.fromkeys([*self.destinations, *self._elsewhere]):
            unrecorded = self._unrecorded.setdefault(destination, set())
            free = PER_DESTINATION - self._sending[destination]
            if free > 0:
                for item in await self._read(outbox.due, destination, now, free, list(unrecorded)):
                    unrecorded.add(item.audit_id)
                    self._sending[destination] += 1
                    task = asyncio.create_task(self._deliver(item))
                    self._attempts.add(task)
                    task.add_done_callback(self._attempts.discard)
            upcoming = await self._read(outbox.next_due, destination)
            if upcoming is not None and self._sending[destination] < PER_DESTINATION:
                wait = min(wait, max(_timestamp(upcoming) - time.time(), 0.01))
        return wait

    async def _deliver(self, item: outbox.Due) -> None:
        attempt = item.attempts + 1
        started_at = outbox.now_iso()
        try:
            sent = await self.sender.send(
                item.destination,
                item.query_string,
                item.body,
                content_type(item.request_headers),
                {"x-topic-audit-id": str(item.audit_id), "x-topic-audit-attempt": str(attempt)},
                self.settings.forward_timeout_seconds,
            )
        finally:
            self._sending[item.destination] -= 1
            self._wake.set()  # a slot is free
        self.report.attempted(self.label(item.destination), sent.error or "delivered", sent.seconds)
        self._results.append(
            outbox.Attempt(
                item.audit_id,
                item.destination,
                "after",
                attempt,
                started_at,
                sent.seconds * 1000,
                sent.status_code,
                sent.error,
                sent.detail,
                sent.text(),
                item.replay,
                item.queued_at,
            )
        )

    async def _record_now_and_then(self) -> None:
        while True:
            await asyncio.sleep(RECORD_SECONDS)
            await self._flush()

    async def _flush(self) -> None:
        """Record the finished attempts (all that are ready, in one group); then their entries may be
        looked up again (a failed one falls due on the schedule)."""
        while self._results:
            batch, self._results = self._results, []
            try:
                exhausted = await self.writer.record(batch, self.schedule)
            except Exception as exc:  # the outbox rows stay pending: they are attempted again
                log.error(
                    "could not record %d delivery attempts (%s); they will be attempted again",
                    len(batch),
                    exc,
                )
                exhausted = []
            for attempt in exhausted:
                self.report.exhausted[self.label(attempt.destination)] += 1
                log.warning(
                    "delivery of entry %d to %s failed %d times; giving up (topic-audit replay --failed)",
                    attempt.audit_id,
                    self.label(attempt.destination),
                    attempt.attempt,
                )
            for attempt in batch:
                self._unrecorded[attempt.destination].discard(attempt.audit_id)
            self._wake.set()

    async def _report_backlog(self) -> None:
        self._backlog_at = time.monotonic()
        backlog = await self._read(outbox.backlog)
        self._elsewhere = [d for d in backlog if d not in self.destinations]
        now = time.time()
        for destination in dict.fromkeys([*self.destinations, *backlog]):
            pending, oldest = backlog.get(destination, (0, None))
            age = max(now - _timestamp(oldest), 0.0) if oldest is not None else 0.0
            self.report.backlog[self.label(destination)] = (pending, round(age, 3))


def _timestamp(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# -- the child -------------------------------------------------------------------------------------
def main() -> None:
    """``python -m topic_audit.delivery``, started by ``serve``: settings from the environment."""
    logging.basicConfig(
        level=os.environ.get("TOPIC_AUDIT_LOG_LEVEL", "info").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = Settings.from_workers_json(
        os.environ[WORKER_SETTINGS], os.environ.get("TOPIC_AUDIT_TOKEN") or None
    )
    asyncio.run(_child(settings, sys.stdout.buffer))


async def _child(settings: Settings, out: IO[bytes]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    writer = AuditWriter(
        settings.db,
        settings.max_batch,
        index_search=False,
        autocheckpoint=settings.replica_url is None,
        checkpointer=False,
    )
    writer.start()
    report = Report()
    deliverer = Deliverer(settings, writer, report)

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

    tasks = [asyncio.create_task(deliverer.run()), asyncio.create_task(send_reports())]
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await deliverer.stop()
    writer.stop()
    if (line := report.line()) is not None:
        with contextlib.suppress(OSError):
            out.write(line)
            out.flush()


# -- serve's side ----------------------------------------------------------------------------------
class DeliveryProcess:
    """Starts the delivery process, restarts it if it dies, wakes it, applies its reports, stops it."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    def start(self) -> None:
        self._spawn()
        self._supervisor = threading.Thread(target=self._supervise, name="delivery-supervisor", daemon=True)
        self._supervisor.start()

    def wake(self) -> None:
        process = self._process
        if process is None or process.stdin is None:
            return
        with contextlib.suppress(BlockingIOError, BrokenPipeError, ValueError, OSError):
            os.write(process.stdin.fileno(), b"\x01")

    def stop(self, timeout: float = 15.0) -> None:
        self._stopping.set()
        process = self._process
        if process is not None:
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()  # end of file: the child stops
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("the delivery process did not stop in %g s; killing it", timeout)
                process.kill()
                process.wait(5)
        if self._supervisor is not None:
            self._supervisor.join(timeout)
        if self._process is not process and self._process is not None:  # restarted meanwhile
            self._process.kill()
            self._process.wait(5)

    def _spawn(self) -> None:
        env = {**os.environ, WORKER_SETTINGS: self.settings.for_workers()}
        env.pop("TOPIC_AUDIT_TOKEN", None)
        if self.settings.token is not None:
            env["TOPIC_AUDIT_TOKEN"] = self.settings.token
        self._process = subprocess.Popen(
            [sys.executable, "-m", "topic_audit.delivery"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert self._process.stdin is not None
        os.set_blocking(self._process.stdin.fileno(), False)

    def _supervise(self) -> None:
        """Apply the child's reports; when it ends unasked, start another."""
        while True:
            process = self._process
            assert process is not None and process.stdout is not None
            for line in process.stdout:
                try:
                    apply(self.metrics, line)
                except (ValueError, KeyError, TypeError):
                    log.warning("unreadable report from the delivery process: %r", line[:200])
            code = process.wait()
            if self._stopping.is_set():
                return
            log.error(
                "the delivery process ended (exit code %s); starting another in %g s", code, RESTART_SECONDS
            )
            if self._stopping.wait(RESTART_SECONDS):
                return
            self._spawn()


if __name__ == "__main__":  # pragma: no cover
    main()
