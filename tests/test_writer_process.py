"""The writer process: receivers feed it over its socket; it commits for all of them, one chain.

Real processes on a real file: a writer process (``python -m topic_audit.writer_process``) and clients
(:class:`topic_audit.writer_client.RemoteWriter`) in this process, and ``serve`` with several receivers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from benchmarks.logs import decided
from conftest import APP_ID, TOKEN, run_cli
from topic_audit import ipc, jobs
from topic_audit.append import Committed
from topic_audit.committer import AppendError
from topic_audit.settings import WORKER_SETTINGS, Settings
from topic_audit.writer_client import WRITER_SOCKET, RemoteWriter


class WriterProcess:
    """``python -m topic_audit.writer_process`` on ``db``, listening on ``sock``."""

    def __init__(self, db: Path, sock: Path, **settings: Any) -> None:
        self.db, self.sock = db, sock
        self.settings = Settings(sdk_app_id=APP_ID, token=TOKEN, db=db, **settings)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WriterProcess:
        read, write = os.pipe()
        env = {**os.environ, WORKER_SETTINGS: self.settings.for_workers(), WRITER_SOCKET: str(self.sock)}
        env["TOPIC_AUDIT_READY_FD"] = str(write)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "topic_audit.writer_process"], env=env, pass_fds=(write,)
        )
        os.close(write)
        with os.fdopen(read, "rb") as ready:
            line = ready.readline()
        assert line.startswith(b"ready "), f"the writer did not start ({line!r})"
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


def verified(db: Path) -> bool:
    done = run_cli("verify", "--db", str(db))
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.startswith("OK")


@pytest.fixture
def writer_process(tmp_path: Path) -> Iterator[WriterProcess]:
    process = WriterProcess(tmp_path / "audit.db", tmp_path / "writer.sock").start()
    yield process
    process.stop()


ITEMS = decided(3000)
"""Realistic (row, event) pairs: topic lifecycles, redeliveries, group callbacks, rejections."""


async def _appended(sock: Path, numbers: range) -> list[Committed]:
    client = RemoteWriter(sock)
    client.start()
    try:
        await client.connect(5)
        return await asyncio.gather(*(client.append(*ITEMS[n]) for n in numbers))
    finally:
        client.stop()


def test_rows_from_several_clients_make_one_chain(writer_process: WriterProcess) -> None:
    async def main() -> list[list[Committed]]:
        return await asyncio.gather(
            *(_appended(writer_process.sock, range(k * 100, k * 100 + 100)) for k in range(4))
        )

    results = asyncio.run(main())
    ids = sorted(c.id for batch in results for c in batch)
    assert ids == list(range(1, 401))
    conn = sqlite3.connect(writer_process.db)
    stored = dict(conn.execute("SELECT id, entry_hash FROM audit_log").fetchall())
    assert all(stored[c.id] == c.entry_hash for batch in results for c in batch)
    conn.close()
    assert verified(writer_process.db)


def test_jobs_cross_the_socket_with_their_results(writer_process: WriterProcess, tmp_path: Path) -> None:
    async def main() -> tuple[Any, ...]:
        client = RemoteWriter(writer_process.sock)
        client.start()
        await client.connect(5)
        await client.append(*ITEMS[1])
        counted = await asyncio.wrap_future(client.submit(jobs.Counts()))
        await asyncio.wrap_future(client.probe())
        pragmas = await asyncio.wrap_future(client.submit(jobs.Pragmas()))
        signed = await asyncio.wrap_future(
            client.submit(jobs.Checkpoint(tmp_path / "key.pem", tmp_path / "checkpoints.jsonl"))
        )
        client.stop()
        return counted, pragmas, signed

    counted, pragmas, signed = asyncio.run(main())
    assert counted.entries == 1
    assert pragmas.synchronous == 2 and pragmas.journal_mode == "wal"
    assert signed is not None and signed["log_size"] == 1
    assert (tmp_path / "checkpoints.jsonl").read_text().count("\n") == 1


def test_every_job_has_a_result_type() -> None:
    assert set(ipc.JOBS) == set(ipc.RESULTS)
    assert set(ipc.JOBS) == {
        c.__name__ for c in jobs.Job.__subclasses__() if c.__module__ == "topic_audit.jobs"
    }


def test_a_dead_writer_fails_what_it_had_not_answered_and_a_new_one_takes_over(tmp_path: Path) -> None:
    db, sock = tmp_path / "audit.db", tmp_path / "writer.sock"
    first = WriterProcess(db, sock).start()

    async def main() -> tuple[list[Any], Committed]:
        client = RemoteWriter(sock)
        client.start()
        await client.connect(5)
        many = [asyncio.ensure_future(client.append(*ITEMS[n])) for n in range(2000)]
        await asyncio.wait(many, return_when=asyncio.FIRST_COMPLETED)
        first.kill()
        outcomes = await asyncio.gather(*many, return_exceptions=True)
        second = WriterProcess(db, sock).start()  # the supervisor's restart, on the same socket
        after = await client.append(*ITEMS[2999])  # reconnects within CONNECT_SECONDS
        client.stop()
        second.stop()
        return outcomes, after

    outcomes, after = asyncio.run(main())
    answered = [o for o in outcomes if isinstance(o, Committed)]
    refused = [o for o in outcomes if isinstance(o, AppendError)]
    assert len(answered) + len(refused) == 2000
    assert answered and refused
    conn = sqlite3.connect(db)
    stored = dict(conn.execute("SELECT id, entry_hash FROM audit_log").fetchall())
    conn.close()
    # Everything acknowledged is committed; the row after the restart continues the one chain.
    assert all(stored[c.id] == c.entry_hash for c in answered)
    assert after.id == max(stored)
    assert verified(db)


def test_a_request_with_no_writer_listening_is_refused_quickly(tmp_path: Path) -> None:
    async def main() -> float:
        client = RemoteWriter(tmp_path / "nobody.sock")
        client.start()
        started = time.monotonic()
        with pytest.raises(AppendError):
            await client.append(*ITEMS[1])
        client.stop()
        return time.monotonic() - started

    assert asyncio.run(main()) < 1.9  # within Tencent's 2 s: a 503, not a timeout


def test_sigterm_commits_what_arrived_and_exits_zero(writer_process: WriterProcess) -> None:
    asyncio.run(_appended(writer_process.sock, range(50)))
    assert writer_process.stop() == 0
    assert not writer_process.sock.exists()
    assert verified(writer_process.db)
