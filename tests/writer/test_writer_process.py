"""The writer process: receivers feed it over its socket; it commits for all of them, one chain.

Real processes on a real file: a writer process (``python -m topic_audit.serve.writer_process``) and clients
(:class:`topic_audit.writer.client.RemoteWriter`) in this process, and ``serve`` with several receivers.
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
from topic_audit.settings import WORKER_SETTINGS, Settings
from topic_audit.writer import client as client_module
from topic_audit.writer import jobs, wire
from topic_audit.writer.append import Committed
from topic_audit.writer.client import WRITER_SOCKET, RemoteWriter
from topic_audit.writer.committer import AppendError


class WriterProcess:
    """``python -m topic_audit.serve.writer_process`` on ``db``, listening on ``sock``."""

    def __init__(self, db: Path, sock: Path, **settings: Any) -> None:
        self.db, self.sock = db, sock
        self.settings = Settings(sdk_app_id=APP_ID, token=TOKEN, db=db, **settings)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WriterProcess:
        read, write = os.pipe()
        env = {**os.environ, WORKER_SETTINGS: self.settings.for_workers(), WRITER_SOCKET: str(self.sock)}
        env["TOPIC_AUDIT_READY_FD"] = str(write)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "topic_audit.serve.writer_process"], env=env, pass_fds=(write,)
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
    assert set(wire.JOBS) == set(wire.RESULTS)
    assert set(wire.JOBS) == {
        c.__name__ for c in jobs.Job.__subclasses__() if c.__module__ == "topic_audit.writer.jobs"
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


def test_a_writer_still_starting_is_waited_for_quietly_and_a_lost_one_out_loud(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver starts beside its writer (``serve``): until their first connection, the writer is only
    starting, and nothing is said. Once connected, losing it is worth a warning."""
    monkeypatch.setattr(client_module, "STARTING_SECONDS", 60.0)  # however slowly this machine starts it
    sock = tmp_path / "writer.sock"

    def waiting() -> int:
        return sum("waiting for the writer process" in r.getMessage() for r in caplog.records)

    async def main() -> tuple[int, int]:
        client = RemoteWriter(sock)
        client.start()
        await asyncio.sleep(0.3)  # tried some sixty times: nobody listens yet
        before = waiting()
        writer = await asyncio.to_thread(WriterProcess(tmp_path / "audit.db", sock).start)
        await client.connect(5)
        await client.append(*ITEMS[1])
        writer.kill()
        while not client.failing:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        client.stop()
        return before, waiting()

    with caplog.at_level("WARNING", logger="topic_audit"):
        before, after = asyncio.run(main())
    assert (before, after) == (0, 1)


def test_a_writer_that_does_not_come_is_waited_for_out_loud(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the time a writer takes to start, one never reached is waited for out loud, once."""
    monkeypatch.setattr(client_module, "STARTING_SECONDS", 0.2)

    async def main() -> None:
        client = RemoteWriter(tmp_path / "nobody.sock")
        client.start()
        await asyncio.sleep(0.8)
        client.stop()

    with caplog.at_level("WARNING", logger="topic_audit"):
        asyncio.run(main())
    assert sum("waiting for the writer process" in r.getMessage() for r in caplog.records) == 1


def test_sigterm_commits_what_arrived_and_exits_zero(writer_process: WriterProcess) -> None:
    """SIGTERM while appends are in flight: each is answered (committed, or 503 once the writer has
    stopped listening), every one acknowledged is in the log, and the writer exits 0."""
    assert writer_process.process is not None

    async def main() -> list[Any]:
        client = RemoteWriter(writer_process.sock)
        client.start()
        try:
            await client.connect(5)
            sent = [asyncio.ensure_future(client.append(*ITEMS[n])) for n in range(2000)]
            await sent[0]  # the writer is committing them
            writer_process.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            return await asyncio.gather(*sent, return_exceptions=True)
        finally:
            client.stop()

    results = asyncio.run(main())
    assert writer_process.process.wait(30) == 0
    assert not writer_process.sock.exists()
    committed = [r for r in results if isinstance(r, Committed)]
    assert committed and all(isinstance(r, Committed | AppendError) for r in results), results[:3]
    conn = sqlite3.connect(writer_process.db)
    stored = dict(conn.execute("SELECT id, entry_hash FROM audit_log").fetchall())
    conn.close()
    assert all(stored[c.id] == c.entry_hash for c in committed)
    assert verified(writer_process.db)


def _connects_as(sock: Path, uid: int, gid: int) -> bool:
    """Whether a process running as ``uid``/``gid`` is served by the writer (it answers a probe)."""
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, socket, sys\n"
            "from topic_audit.writer import jobs, wire\n"
            "folder = os.open(os.path.dirname(sys.argv[1]), os.O_RDONLY)\n"  # (its parents are root's)
            f"os.setgid({gid}); os.setuid({uid})\n"
            "s = socket.socket(socket.AF_UNIX); s.settimeout(5)\n"
            "s.connect(f'/proc/self/fd/{folder}/' + os.path.basename(sys.argv[1]))\n"
            "s.sendall(wire.hello() + wire.job_frame(1, jobs.Counts()))\n"
            "print('served' if s.recv(65536) else 'refused')\n",
            str(sock),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    refused = ("ConnectionResetError", "BrokenPipeError")  # the writer closed it before or while it sent
    assert child.returncode == 0 or any(error in child.stderr for error in refused), child.stderr
    return child.stdout.strip() == "served"


@pytest.mark.skipif(os.getuid() != 0, reason="changing uid and gid needs root (CI runs as root)")
def test_only_the_writers_own_user_is_served(writer_process: WriterProcess) -> None:
    """The peer's uid is checked, not its gid (the socket opened to everyone here, so that only the
    check stands between)."""
    os.chmod(writer_process.sock, 0o666)
    os.chmod(writer_process.sock.parent, 0o755)
    assert _connects_as(writer_process.sock, 0, 4321)
    assert not _connects_as(writer_process.sock, 4321, 0)


def test_a_receiver_speaking_another_protocol_is_answered_503(
    writer_process: WriterProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As after an upgrade in place, when a crashed writer restarts from code newer than the receivers'."""
    monkeypatch.setattr(wire, "VERSION", wire.VERSION + 1)

    async def main() -> None:
        client = RemoteWriter(writer_process.sock)
        client.start()
        try:
            await client.connect(5)
            with pytest.raises(AppendError):
                await asyncio.wait_for(client.append(*ITEMS[0]), 5)
        finally:
            client.stop()

    asyncio.run(main())
    conn = sqlite3.connect(writer_process.db)
    assert conn.execute("SELECT count(*) FROM audit_log").fetchone() == (0,)
    conn.close()


def test_a_writer_that_hangs_is_answered_503_in_time_and_then_served_again(
    writer_process: WriterProcess,
) -> None:
    """SIGSTOP (a stalled disk looks the same): nothing waits past ANSWER_SECONDS, nothing hangs, and
    once the writer goes on the receiver is served again."""
    from topic_audit.writer.client import ANSWER_SECONDS

    assert writer_process.process is not None

    async def main() -> tuple[float, int, Committed]:
        client = RemoteWriter(writer_process.sock)
        client.start()
        try:
            await client.connect(5)
            await client.append(*ITEMS[0])
            writer_process.process.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
            started = time.monotonic()
            results = await asyncio.gather(
                *(client.append(*ITEMS[n]) for n in range(1, 200)), return_exceptions=True
            )
            waited = time.monotonic() - started
            writer_process.process.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
            refused = sum(isinstance(r, AppendError) for r in results)
            after = await client.append(*ITEMS[200])
            return waited, refused, after
        finally:
            client.stop()

    waited, refused, after = asyncio.run(main())
    assert refused == 199
    assert ANSWER_SECONDS <= waited < ANSWER_SECONDS + 0.5
    assert after.id >= 2


def test_a_replaced_writer_that_hangs_is_answered_503_in_time(tmp_path: Path) -> None:
    """The deadlines hold on every connection, not just the first: a writer that was killed and started
    again, then hangs, still has its receivers' appends answered 503 within ANSWER_SECONDS."""
    from topic_audit.writer.client import ANSWER_SECONDS

    db, sock = tmp_path / "audit.db", tmp_path / "writer.sock"
    first = WriterProcess(db, sock)

    async def main() -> float:
        client = RemoteWriter(sock)
        client.start()
        second = None
        try:
            first.start()
            await client.connect(5)
            await client.append(*ITEMS[0])
            first.kill()
            await asyncio.sleep(0.2)  # the receiver sees the connection go
            second = WriterProcess(db, sock).start()
            await client.append(*ITEMS[1])  # reconnects within CONNECT_SECONDS
            second.process.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
            started = time.monotonic()
            with pytest.raises(AppendError):
                await asyncio.wait_for(client.append(*ITEMS[2]), ANSWER_SECONDS + 3)
            return time.monotonic() - started
        finally:
            client.stop()
            if first.process is not None and first.process.poll() is None:
                first.kill()
            if second is not None:
                second.process.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
                second.stop()

    waited = asyncio.run(main())
    assert ANSWER_SECONDS <= waited < ANSWER_SECONDS + 0.5


async def _garbage_writer(sock: Path, replies: list[bytes]) -> asyncio.AbstractServer:
    """A stand-in writer (named so: not the real one) that answers every frame with ``replies[0]``."""

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(65536):
                writer.write(replies[0])
        except ConnectionError:
            pass
        writer.close()

    return await asyncio.start_unix_server(peer, str(sock))


def test_an_answer_that_cannot_be_read_fails_its_request(tmp_path: Path) -> None:
    """Not a hang: the request fails (503), and so does what else waited on that connection."""
    sock = tmp_path / "garbage.sock"
    bad = wire.answer(1, wire.OK, {"not": "a commit"})

    async def main() -> list[Any]:
        server = await _garbage_writer(sock, [bad])
        client = RemoteWriter(sock)
        client.start()
        try:
            await client.connect(5)
            return await asyncio.wait_for(
                asyncio.gather(*(client.append(*ITEMS[n]) for n in range(3)), return_exceptions=True), 5
            )
        finally:
            client.stop()
            await asyncio.sleep(0.1)  # the stand-in sees the connection close, and closes its side
            server.close()
            await server.wait_closed()

    results = asyncio.run(main())
    assert all(isinstance(r, AppendError) for r in results), results


def test_a_row_too_large_for_a_frame_fails_alone(
    writer_process: WriterProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wire, "MAX_FRAME", 100_000)
    row, event = ITEMS[0]

    async def main() -> Committed:
        client = RemoteWriter(writer_process.sock)
        client.start()
        try:
            await client.connect(5)
            with pytest.raises(AppendError, match="more than the writer takes"):
                await client.append({**row, "request_body": "x" * 200_000}, event)
            return await client.append(row, event)
        finally:
            client.stop()

    assert asyncio.run(main()).id == 1
