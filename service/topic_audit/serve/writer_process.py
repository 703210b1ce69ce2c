"""The writer process of ``serve`` (``python -m topic_audit.serve.writer_process``): one per database.

It owns the write connection and commits for every receiver process: each connects to its Unix socket
(``TOPIC_AUDIT_WRITER_SOCKET``, in a folder only ``serve``'s user can enter) and sends requests
(:mod:`topic_audit.writer.wire`); the writer answers each once its COMMIT has returned. Neither side waits for
the other's Python: the receivers' event loops answer HTTP while this process hashes, projects and
commits, and N receivers share one writer instead of contending for SQLite's lock.

One thread does everything, on an event loop: it reads every frame that has arrived, commits the
requests in groups of up to ``max_batch`` (:class:`~topic_audit.writer.groups.Groups`, the writer thread's
loop too: one transaction, one fsync), writes the answers (one write per receiver per group), runs jobs between groups, then looks
for more. What arrives during a COMMIT waits in the socket and makes the next group: group commit.
Between groups, now and then, it feeds the full-text indexes (:class:`~topic_audit.writer.housekeeping.SearchIndexer`);
a thread beside it copies the WAL into the database file (:class:`~topic_audit.writer.housekeeping.WalCheckpointer`).

It says ``ready <pid> <version>`` on ``TOPIC_AUDIT_READY_FD`` once it listens. SIGTERM: it stops
listening, commits and answers what it has received, brings the search indexes up to date (for at most
:data:`~topic_audit.writer.housekeeping.STOP_INDEXING_SECONDS`) and exits 0. Its metrics (the commits, the
rows by outcome, the log's size) go to ``PROMETHEUS_MULTIPROC_DIR``, which every receiver's
``/metrics`` merges.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import struct
import sys
from pathlib import Path
from typing import Any, cast

import uvloop

from topic_audit.log.database import connect
from topic_audit.log.migrations import migrate
from topic_audit.metrics import Metrics, package_version
from topic_audit.settings import WORKER_SETTINGS, Settings, SettingsError, configure_logging
from topic_audit.transparency.checkpoints import record_key
from topic_audit.writer import jobs, wire
from topic_audit.writer.client import WRITER_SOCKET
from topic_audit.writer.committer import Committer
from topic_audit.writer.groups import Groups
from topic_audit.writer.housekeeping import SearchIndexer, WalCheckpointer
from topic_audit.writer.requests import Append, AppendError, Record

log = logging.getLogger("topic_audit.writer")

READY_FD = "TOPIC_AUDIT_READY_FD"
_PR_SET_PDEATHSIG = 1


class Peer(asyncio.Protocol):
    """One receiver's connection: frames in, answers out."""

    def __init__(self, server: WriterServer) -> None:
        self.server = server
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.greeted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)
        sock = transport.get_extra_info("socket")
        _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != os.getuid():  # the folder already keeps others out; this says so twice
            log.error("refused a connection from uid %d", uid)
            self.transport.abort()
            self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            bodies = wire.frames(self.buffer)
        except wire.ProtocolError as exc:
            self._broken(exc)
            return
        for body in bodies:
            try:
                seq, request = wire.request(body)
            except wire.ProtocolError as exc:
                self._broken(exc)
                return
            if isinstance(request, wire.Hello):
                if not self._greeted(request):
                    return
            elif not self.greeted:
                self._broken(
                    wire.ProtocolError("a request before the receiver said which protocol it speaks")
                )
                return
            else:
                self.server.received(self, seq, request)

    def _greeted(self, hello: wire.Hello) -> bool:
        if hello.version == wire.VERSION:
            self.greeted = True
            return True
        why = f"the receiver speaks protocol {hello.version}, this writer {wire.VERSION}: reload serve"
        log.error("refused a receiver: %s", why)
        if self.transport is not None:
            self.transport.write(wire.answer(0, wire.REFUSED, why))
            self.transport.close()
            self.transport = None
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def send(self, frames: list[bytes]) -> None:
        if self.transport is not None:
            self.transport.write(b"".join(frames))

    def _broken(self, exc: Exception) -> None:
        log.error("a receiver sent what is not a request (%s); closing its connection", exc)
        if self.transport is not None:
            self.transport.abort()
            self.transport = None


class WriterServer:
    """Takes what every peer sent, in order of arrival; commits it in groups
    (:class:`topic_audit.writer.groups.Groups`); answers."""

    def __init__(self, committer: Committer, indexer: SearchIndexer, max_batch: int) -> None:
        self.committer, self.indexer = committer, indexer
        self.groups = Groups(committer, max_batch, _answer, self._run)
        self.pending: list[tuple[tuple[Peer, int], Append | Record | jobs.Job[Any]]] = []
        self._arrived = asyncio.Event()
        self._stopping = False

    def received(self, peer: Peer, seq: int, request: Append | Record | jobs.Job[Any]) -> None:
        self.pending.append(((peer, seq), request))
        self._arrived.set()

    def stop(self) -> None:
        self._stopping = True
        self._arrived.set()

    async def run(self) -> None:
        """Commit what arrives until :meth:`stop`; then what has arrived, and the indexes."""
        committer, indexer = self.committer, self.indexer
        while not self._stopping:
            if not self.pending:
                try:
                    await asyncio.wait_for(self._arrived.wait(), indexer.wait_seconds())
                except TimeoutError:  # idle: a good moment to catch up on the search index
                    indexer.idle(committer.failing)
                    continue
            self._arrived.clear()
            self.take()
            await asyncio.sleep(0)  # read what arrived meanwhile: it makes the next group
            indexer.after_group(not self.pending, committer.failing)  # (index only when none did)
        await asyncio.sleep(0)  # what the receivers' sockets hold already is committed too
        self.take()
        indexer.finish(committer.failing)

    def take(self) -> None:
        """Commit and answer everything pending now (nothing arrives meanwhile: the loop is ours)."""
        pending, self.pending = self.pending, []
        self.groups.take(pending)

    def _run(self, key: tuple[Peer, int], job: jobs.Job[Any]) -> None:
        peer, seq = key
        try:
            result = self.committer.run(job)
        except Exception as exc:  # the job's caller sees it
            peer.send([wire.answer(seq, wire.FAILED, f"{type(exc).__name__}: {exc}")])
            return
        peer.send([wire.answer(seq, wire.OK, result)])


def _answer(keys: list[tuple[Peer, int]], results: list[Any]) -> None:
    """One write per peer for the whole group."""
    answers: dict[Peer, list[bytes]] = {}
    for (peer, seq), result in zip(keys, results, strict=True):
        if isinstance(result, AppendError):
            frame = wire.answer(seq, wire.REFUSED, str(result))
        else:
            frame = wire.answer(seq, wire.OK, result)
        answers.setdefault(peer, []).append(frame)
    for peer, frames in answers.items():
        peer.send(frames)


class _Reported:
    """The writer's metrics (commits, rows by outcome, the log's size, topics), but not the rows it could
    not commit: the receiver that answers a row 503 counts it -- also one it gave up waiting for, or lost
    with the connection -- so that each is counted once, by whoever answered it."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def batch_committed(self, rows: list[dict[str, Any]], seconds: float, head_id: int) -> None:
        self.metrics.batch_committed(rows, seconds, head_id)

    def batch_failed(self, count: int) -> None:
        pass

    def topics_counted(self, active: int, deleted: int) -> None:
        self.metrics.topics_counted(active, deleted)


async def serve(settings: Settings, path: Path, ready_fd: int | None) -> None:
    """Listen on ``path`` and commit for whoever connects, until SIGTERM or SIGINT."""
    migrate(settings.db)
    autocheckpoint = settings.replica_url is None
    conn = connect(settings.db, autocheckpoint)
    key = record_key(settings.signing_key_path, create=True)
    committer = Committer(conn, _Reported(Metrics()), settings.store_bodies, key)
    server = WriterServer(committer, SearchIndexer(conn), settings.max_batch)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.stop)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a socket left by a writer that was killed
    listening = await loop.create_unix_server(lambda: Peer(server), str(path))
    os.chmod(path, 0o600)
    wal_checkpointer = WalCheckpointer(settings.db) if autocheckpoint else None
    if wal_checkpointer is not None:
        wal_checkpointer.start()
    if ready_fd is not None:
        os.write(ready_fd, f"ready {os.getpid()} {package_version()}\n".encode())
        os.close(ready_fd)
    try:
        await server.run()
    finally:
        listening.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        if wal_checkpointer is not None:
            wal_checkpointer.stop()
        conn.close()


def main() -> None:
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)  # no writer outlives its supervisor
    configure_logging()
    settings = Settings.from_workers_json(os.environ[WORKER_SETTINGS], None)
    ready = os.environ.get(READY_FD)
    sys.setswitchinterval(0.0005)  # the WAL checkpointer's thread gives the GIL back quickly
    # uvloop, as the receivers run under uvicorn: its socket writes and callbacks cost less CPU a row
    try:
        uvloop.run(serve(settings, Path(os.environ[WRITER_SOCKET]), None if ready is None else int(ready)))
    except SettingsError as exc:  # a setting only the writer reads at start (the signing key): said plainly
        log.error("the writer process could not start: %s", exc)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
