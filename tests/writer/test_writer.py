"""The single writer: group commit, commit-before-answer, failure isolation, chain continuity."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import pickle
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import make_row
from topic_audit.forwarding import outbox
from topic_audit.integrity import verify
from topic_audit.log import chain, database
from topic_audit.log.migrations import LATENCY_BUCKETS_MS, migrate
from topic_audit.transparency import checkpoints
from topic_audit.writer import append, jobs
from topic_audit.writer import thread as writer_module
from topic_audit.writer.thread import AppendError, AuditWriter, Forward


class Recorder:
    """Observer that records each committed group (the writer's own report)."""

    def __init__(self) -> None:
        self.groups: list[int] = []
        self.failed = 0

    def batch_committed(self, rows: list[dict[str, Any]], seconds: float, head_id: int) -> None:
        self.groups.append(len(rows))

    def batch_failed(self, count: int) -> None:
        self.failed += count

    def topics_counted(self, active: int, deleted: int) -> None:
        pass


@pytest.fixture
def fresh_db(tmp_path: Path) -> Path:
    path = tmp_path / "audit.db"
    migrate(path)
    return path


def check_chain(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        findings, count, _ = verify.verify_chain(conn)
    finally:
        conn.close()
    assert findings == []
    return count


def visible(path: Path, topic_id: str) -> bool:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT 1 FROM audit_log WHERE topic_id = ?", (topic_id,)).fetchone() is not None
    finally:
        conn.close()


def test_no_answer_precedes_its_commit(fresh_db: Path) -> None:
    recorder = Recorder()
    writer = AuditWriter(fresh_db, max_batch=16, observer=recorder)
    writer.start()
    seen_before_commit: list[int] = []

    async def one(n: int) -> None:
        await writer.append(make_row(n))
        # The instant the append resolves, a separate connection must already see the row.
        if not visible(fresh_db, f"t{n}"):
            seen_before_commit.append(n)

    async def main() -> None:
        await asyncio.gather(*(one(n) for n in range(300)))

    try:
        asyncio.run(main())
    finally:
        writer.stop()
    assert seen_before_commit == []
    assert check_chain(fresh_db) == 300
    assert sum(recorder.groups) == 300
    assert max(recorder.groups) > 1, "concurrent appends should share transactions"
    assert max(recorder.groups) <= 16


def test_a_lone_append_commits_at_once(fresh_db: Path) -> None:
    recorder = Recorder()
    writer = AuditWriter(fresh_db, observer=recorder)
    writer.start()
    try:
        committed = asyncio.run(writer.append(make_row(1)))
    finally:
        writer.stop()
    assert committed.id == 1 and recorder.groups == [1]


def test_a_bad_row_fails_only_its_own_request(fresh_db: Path) -> None:
    recorder = Recorder()
    writer = AuditWriter(fresh_db, observer=recorder)

    async def main() -> list[Any]:
        tasks = [
            asyncio.ensure_future(writer.append(make_row(n, outcome="bogus" if n == 5 else "ignored")))
            for n in range(10)
        ]
        await asyncio.sleep(0)  # all ten are queued before the writer starts: one group, which fails
        writer.start()
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        writer.stop()
    failed = [n for n, r in enumerate(results) if isinstance(r, AppendError)]
    assert failed == [5]
    assert recorder.failed == 1
    assert recorder.groups == [1] * 9  # the group was retried row by row
    assert check_chain(fresh_db) == 9


def test_a_locked_database_fails_the_group_and_recovers(fresh_db: Path) -> None:
    recorder = Recorder()
    writer = AuditWriter(fresh_db, observer=recorder)
    writer.start()
    other = sqlite3.connect(fresh_db, isolation_level=None)

    async def main() -> tuple[list[Any], Any]:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        results = await asyncio.gather(
            *(writer.append(make_row(n)) for n in range(5)), return_exceptions=True
        )
        other.execute("ROLLBACK")
        after = await writer.append(make_row(99))
        return results, after

    try:
        results, after = asyncio.run(main())
    finally:
        writer.stop()
        other.close()
    assert all(isinstance(r, AppendError) for r in results)
    assert "locked" in str(results[0])
    assert recorder.failed == 5
    assert after.id == 1  # nothing half-written; the chain starts cleanly when the fault clears
    assert check_chain(fresh_db) == 1


def test_a_restarted_writer_continues_the_chain(fresh_db: Path) -> None:
    for start in (0, 10):
        writer = AuditWriter(fresh_db)
        writer.start()

        async def main(writer: AuditWriter = writer, start: int = start) -> None:
            await asyncio.gather(*(writer.append(make_row(start + n)) for n in range(10)))

        try:
            asyncio.run(main())
        finally:
            writer.stop()
    assert check_chain(fresh_db) == 20


def test_two_writers_on_one_file_keep_one_chain(fresh_db: Path) -> None:
    writers = [AuditWriter(fresh_db, max_batch=8) for _ in range(2)]
    for w in writers:
        w.start()

    async def main() -> None:
        await asyncio.gather(*(writers[n % 2].append(make_row(n)) for n in range(200)))

    try:
        asyncio.run(main())
    finally:
        for w in writers:
            w.stop()
    assert check_chain(fresh_db) == 200


@pytest.mark.parametrize("body", [b"\xff\xfe\x00binary", b"caf\xc3\xa9 \x00 nul", b"", "😀".encode()])
def test_body_bytes_are_kept_exactly(fresh_db: Path, body: bytes) -> None:
    writer = AuditWriter(fresh_db)
    writer.start()
    row = make_row(
        1, request_body=chain.stored_body(body), request_body_sha256=hashlib.sha256(body).hexdigest()
    )
    try:
        asyncio.run(writer.append(row))
    finally:
        writer.stop()
    conn = sqlite3.connect(fresh_db)
    try:
        stored = conn.execute("SELECT request_body FROM audit_log").fetchone()[0]
    finally:
        conn.close()
    assert chain.body_bytes(stored) == body
    check_chain(fresh_db)


def test_the_search_index_follows_the_log(fresh_db: Path) -> None:
    """Request bodies become searchable within about a second, without a trigger on the commit path."""
    import time

    writer = AuditWriter(fresh_db)
    writer.start()

    async def main() -> None:
        await asyncio.gather(
            *(writer.append(make_row(n, request_body=f'{{"word": "needle{n}"}}')) for n in range(50))
        )

    try:
        asyncio.run(main())
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            conn = sqlite3.connect(fresh_db)
            found = conn.execute(
                "SELECT rowid FROM audit_log_fts WHERE audit_log_fts MATCH 'needle42'"
            ).fetchall()
            conn.close()
            if found:
                break
            time.sleep(0.1)
    finally:
        writer.stop()
    assert found == [(43,)]


def test_the_topic_search_index_follows_the_projection(tmp_path: Path) -> None:
    """A backlog of many batches (written without a receiver) is indexed once the writer is idle, and
    ``topics_fts`` then holds exactly each topic's current texts: renamed topics lose their old names."""
    db = tmp_path / "audit.db"
    items = _logged_history(2000, seed=11)
    _append_in_groups(db, items, 64)
    assert _table(db, "SELECT count(*) FROM topics_fts") == [(0,)]  # nothing indexed yet
    last = _table(db, "SELECT max(id) FROM audit_log")[0][0]
    writer = AuditWriter(db)
    writer.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            progress = _table(db, "SELECT last_entry_id FROM search_progress WHERE name = 'topics_fts'")
            bodies = _table(db, "SELECT max(id) FROM audit_log_fts_docsize")
            if progress == [(last,)] and bodies == [(last,)]:
                break
            time.sleep(0.05)
    finally:
        writer.stop()
    assert progress == [(last,)] and bodies == [(last,)]
    for index in ("audit_log_fts", "topics_fts"):  # merged by hand, a few pages a batch: still sound
        assert _table(db, f"SELECT v FROM {index}_config WHERE k = 'automerge'") == [(0,)]
        _table(db, f"INSERT INTO {index} ({index}, rank) VALUES ('integrity-check', 1)")
    texts = "rowid, name, introduction, notification"
    indexed = _table(db, f"SELECT {texts} FROM topics_fts ORDER BY rowid")
    assert indexed == _table(db, f"SELECT {texts} FROM topics ORDER BY rowid")
    renamed = _table(db, "SELECT rowid FROM topics_fts WHERE topics_fts MATCH 'renamed'")
    assert (
        renamed and len(renamed) == _table(db, "SELECT count(*) FROM topics WHERE name LIKE 'renamed%'")[0][0]
    )
    assert (
        len(renamed) < _table(db, "SELECT count(*) FROM audit_log WHERE request_body LIKE '%renamed%'")[0][0]
    )


def test_the_wal_is_copied_into_the_database_beside_the_writer(fresh_db: Path) -> None:
    """A few hundred rows stay far below SQLite's own checkpoint (1,000 pages): the database file grows
    only because the checkpointer thread copies the WAL while the writer is running. With a replica
    (``autocheckpoint=False``, Litestream checkpoints) there is no such thread."""
    writer = AuditWriter(fresh_db)
    writer.start()

    async def main() -> None:
        await asyncio.gather(*(writer.append(make_row(n)) for n in range(300)))

    try:
        before = fresh_db.stat().st_size
        asyncio.run(main())
        assert any(t.name == "wal-checkpoint" for t in threading.enumerate())
        deadline = time.monotonic() + 5
        while fresh_db.stat().st_size == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fresh_db.stat().st_size > before
    finally:
        writer.stop()
    assert not any(t.name == "wal-checkpoint" for t in threading.enumerate())
    replicated = AuditWriter(fresh_db, autocheckpoint=False)
    replicated.start()
    try:
        assert not any(t.name == "wal-checkpoint" for t in threading.enumerate())
    finally:
        replicated.stop()


def test_a_job_whose_caller_gave_up_does_not_kill_the_writer(fresh_db: Path) -> None:
    """/readyz waits 2 s for its probe; if it gives up, the writer must carry on (it once died here)."""
    writer = AuditWriter(fresh_db)
    abandoned = writer.probe()
    assert abandoned.cancel()  # the caller stops waiting before the writer gets to it
    writer.start()
    try:
        committed = asyncio.run(asyncio.wait_for(writer.append(make_row(1)), timeout=5))
        assert committed.id == 1
        assert writer.submit(jobs.Counts()).result(timeout=5) == (1, 0, 0)
    finally:
        writer.stop()
    assert _table(fresh_db, "SELECT count(*) FROM heartbeat") == [(0,)]  # the abandoned probe never ran


class _Unknown(jobs.Job[None]):
    """A job the writer does not know."""


def test_a_failing_job_fails_its_caller_only(fresh_db: Path, tmp_path: Path) -> None:
    writer = AuditWriter(fresh_db)
    writer.start()
    try:
        with pytest.raises(TypeError, match="no job _Unknown"):
            writer.submit(_Unknown()).result(timeout=5)
        (tmp_path / "key.pem").write_text("not a key")
        with pytest.raises(ValueError):
            writer.submit(jobs.Checkpoint(tmp_path / "key.pem", tmp_path / "cp.jsonl")).result(timeout=5)
        assert asyncio.run(writer.append(make_row(1))).id == 1
    finally:
        writer.stop()


def test_the_jobs_and_their_results_are_plain_data(fresh_db: Path, tmp_path: Path) -> None:
    """What crosses the writer's queue survives pickling (the seam for a writer in its own process)."""
    key, file = tmp_path / "signing.key", tmp_path / "checkpoints.jsonl"
    checkpoints.Signer.load_or_create(key)
    asked: list[jobs.Job[Any]] = [
        jobs.Counts(),
        jobs.Heartbeat(),
        jobs.Checkpoint(key, file),
        jobs.Checkpoint(key, file, unless_within=60),
        jobs.Pragmas(),
    ]
    writer = AuditWriter(fresh_db)
    writer.start()
    try:
        committed = asyncio.run(writer.append(make_row(1)))
        answers = [writer.submit(pickle.loads(pickle.dumps(job))).result(timeout=5) for job in asked]
    finally:
        writer.stop()
    assert pickle.loads(pickle.dumps(committed)) == committed
    assert [pickle.loads(pickle.dumps(a)) for a in answers] == answers
    counted, beat, signed, skipped, pragmas = answers
    assert counted == jobs.Counted(entries=1, active=0, deleted=0) and beat is None
    assert signed is not None and signed["log_size"] == 1 and checkpoints.read_file(file) == [signed]
    assert skipped is None  # a checkpoint younger than a minute stands
    assert pragmas == database.Durability(synchronous=2, wal_autocheckpoint=1000, journal_mode="wal")
    requests = [append.Append(make_row(2)), append.Record([], (1,))]
    assert [pickle.loads(pickle.dumps(r)) for r in requests] == requests


def test_append_leaves_the_callers_row_and_attempt_unchanged(fresh_db: Path) -> None:
    row = make_row(1)
    attempt = outbox.Attempt(0, "https://app.example/before", "before", 1, row["received_at"], 12.5, 200)
    given, attempted = dict(row), dataclasses.replace(attempt)
    writer = AuditWriter(fresh_db)
    writer.start()
    try:
        committed = asyncio.run(writer.append(row, None, Forward(before=attempt)))
        again = asyncio.run(writer.append(row))  # the same row appended twice: two entries
    finally:
        writer.stop()
    assert row == given and attempt == attempted
    assert (committed.id, again.id) == (1, 2)
    assert _table(fresh_db, "SELECT audit_id, destination FROM deliveries") == [(1, attempt.destination)]
    assert check_chain(fresh_db) == 2


def _logged_history(count: int, seed: int) -> list[tuple[dict[str, Any], Any]]:
    """A realistic mix (creates, changes, destroys, redeliveries, rejections) over three hours."""
    import random

    from benchmarks.logs import APP_ID, TOKEN, _bodies, _request
    from topic_audit.receiver.app import build_row
    from topic_audit.settings import Settings
    from topic_audit.tencent import checks, models

    settings = Settings(sdk_app_id=APP_ID, token=TOKEN)
    rng = random.Random(seed)
    items = []
    for n, (body, query) in enumerate(_bodies(rng, count)):
        request = _request(body, query)
        decision = checks.decide(request, settings, time.time())
        answer = models.answer_body(decision.status_code, decision.reason, decision.detail)
        elapsed = rng.choice([0.0001, 0.0004, 0.003, 0.04, 3.0])  # every latency bucket, and past the last
        received = 1_764_000_000 + n * 3 * 3600 / count
        items.append((build_row(request, decision, received, elapsed, answer), decision.event))
    return items


def _append_in_groups(path: Path, items: list[tuple[dict[str, Any], Any]], size: int) -> None:
    migrate(path)
    conn = writer_module.connect(path)
    try:
        for start in range(0, len(items), size):
            writer_module.append_batch(
                conn, [(dict(row), event) for row, event in items[start : start + size]]
            )
    finally:
        conn.close()


def _table(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_a_group_projects_exactly_like_one_row_at_a_time(tmp_path: Path) -> None:
    """Topics read once per group and written once each give the same log and projection."""
    items = _logged_history(600, seed=5)
    for size in (1, 7, 600):
        _append_in_groups(tmp_path / f"{size}.db", items, size)
    # Every column but the commitment and what hashes it: each entry's salt is its own random bytes.
    kept = [c for c in chain.COLUMNS if c not in ("content_commitment", "entry_hash", "prev_hash")]
    log = f"SELECT {', '.join(kept)} FROM audit_log ORDER BY id"
    topics = "SELECT * FROM topics ORDER BY topic_id"
    one_by_one = _table(tmp_path / "1.db", log), _table(tmp_path / "1.db", topics)
    outcomes = {row[17] for row in one_by_one[0]}
    assert {"accepted", "duplicate", "rejected", "ignored"} <= outcomes  # the mix exercises every rule
    for size in (7, 600):
        assert (_table(tmp_path / f"{size}.db", log), _table(tmp_path / f"{size}.db", topics)) == one_by_one
        conn = sqlite3.connect(tmp_path / f"{size}.db")
        try:
            findings = verify.verify_all(conn, tmp_path / "none.jsonl")[0]
        finally:
            conn.close()
        assert findings == []


def test_the_hourly_rollups_equal_a_count_over_the_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    _append_in_groups(path, _logged_history(500, seed=9), size=13)
    buckets = " ".join(f"WHEN elapsed_ms <= {b} THEN {b}" for b in LATENCY_BUCKETS_MS)
    hour = "substr(received_at, 1, 13) || ':00:00Z'"
    counted = _table(
        path,
        f"SELECT {hour}, coalesce(callback_command, ''), outcome, coalesce(reason, 'none'), count(*) "
        "FROM audit_log GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
    )
    assert len({row[0] for row in counted}) == 3 and len(counted) > 10
    assert _table(path, "SELECT * FROM callbacks_hourly ORDER BY 1, 2, 3, 4") == counted
    latency = _table(
        path,
        f"SELECT {hour}, CASE {buckets} ELSE 1e9 END, count(*) FROM audit_log GROUP BY 1, 2 ORDER BY 1, 2",
    )
    assert len({row[1] for row in latency}) >= 5
    assert _table(path, "SELECT * FROM latency_hourly ORDER BY 1, 2") == latency
