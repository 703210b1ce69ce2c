"""``rebuild-projection``: partitions replayed apart give one replay's rows, and only differences are written."""

from __future__ import annotations

import random
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from conftest import APP_ID, TOKEN, Post, Server, alter, random_history, topics
from topic_audit.cli import main
from topic_audit.log import projection, rebuild
from topic_audit.settings import Settings
from topic_audit.tencent import samples


@pytest.fixture
def history(post: Post, settings: Settings) -> dict[str, dict[str, Any]]:
    """300 deliveries of every kind for 12 topics, and the projection the receiver kept meanwhile."""
    random_history(post, random.Random(7), 300)
    return topics(settings.db)


def run(db: Path, processes: int) -> rebuild.Rebuilt:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        return rebuild.rebuild(conn, processes=processes)
    finally:
        conn.close()


def replay_differences(db: Path) -> list[projection.Difference]:
    """What ``verify`` compares: the table against one replay of the whole log."""
    conn = sqlite3.connect(db)
    try:
        return projection.differences(conn, projection.replay(conn)[0].rows)
    finally:
        conn.close()


FIRST_THREE = "SELECT rowid FROM topics ORDER BY topic_id LIMIT 3"
DAMAGE = {
    "none": ([], 0),
    "edited": ([f"UPDATE topics SET name = 'edited', custom_data = NULL WHERE rowid IN ({FIRST_THREE})"], 3),
    "deleted": ([f"DELETE FROM topics WHERE rowid IN ({FIRST_THREE})"], 3),
    "added": (["INSERT INTO topics (topic_id, group_id) VALUES ('not in the log', 'g')"], 1),
    "emptied": (["DELETE FROM topics"], 12),
}


@pytest.mark.parametrize("processes", [1, 2, 3])
@pytest.mark.parametrize("damage", DAMAGE)
def test_rebuild_restores_exactly_what_the_log_gives(
    history: dict[str, dict[str, Any]],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    processes: int,
    damage: str,
) -> None:
    monkeypatch.setattr(rebuild, "PARALLEL_FROM", 0)  # partitions even for this small log
    statements, written = DAMAGE[damage]
    assert len(history) == 12
    alter(settings.db, *statements)
    assert run(settings.db, processes) == rebuild.Rebuilt(topics=12, written=written)
    assert topics(settings.db) == history
    assert replay_differences(settings.db) == []
    conn = sqlite3.connect(settings.db)
    try:
        counts = dict(conn.execute("SELECT state, topics FROM topic_counts"))
        deleted = sum(t["deleted_entry_id"] is not None for t in history.values())
        assert counts == {"active": 12 - deleted, "deleted": deleted}
        # The full-text index follows the table (rebuilt once, with its indexes put back).
        assert conn.execute("SELECT count(*) FROM topics_fts WHERE topics_fts MATCH 'edited'").fetchone() == (
            0,
        )
        name = next(iter(history.values()))["name"]
        matched = {
            r[0] for r in conn.execute("SELECT rowid FROM topics_fts WHERE topics_fts MATCH ?", (name,))
        }
        assert matched == {r[0] for r in conn.execute("SELECT rowid FROM topics WHERE name = ?", (name,))}
        indexes = conn.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = 'topics' AND sql IS NOT NULL"
        )
        assert indexes.fetchone() == (6,)  # m002's and m015's, all put back
    finally:
        conn.close()


def test_a_log_whose_recorded_topics_disagree_is_replayed_in_one_piece(
    history: dict[str, dict[str, Any]], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Partitions trust ``audit_log.topic_id``; an altered one must not change what the rebuild writes."""
    monkeypatch.setattr(rebuild, "PARALLEL_FROM", 0)
    alter(
        settings.db,
        "UPDATE audit_log SET topic_id = topic_id || '-moved' WHERE id = "
        "(SELECT min(id) FROM audit_log WHERE outcome = 'accepted' AND topic_id IS NOT NULL)",
        f"UPDATE topics SET name = 'edited' WHERE rowid IN ({FIRST_THREE})",
    )
    replayed: list[projection.Partition | None] = []
    in_one_piece = rebuild._snapshot

    def spy(path: str, part: projection.Partition | None, progress: Any) -> Any:
        replayed.append(part)
        return in_one_piece(path, part, progress)

    monkeypatch.setattr(rebuild, "_snapshot", spy)
    assert run(settings.db, 2) == rebuild.Rebuilt(topics=12, written=3)
    assert replayed == [None]  # the partitions (in other processes) gave up; this process replayed it all
    assert topics(settings.db) == history


def test_deliveries_during_the_replay_are_caught_up_under_the_lock(
    history: dict[str, dict[str, Any]], settings: Settings, post: Post, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver keeps writing while the log is replayed: its entries for a topic being repaired count."""
    topic = min(history)
    alter(settings.db, f"UPDATE topics SET name = 'edited' WHERE topic_id = '{topic}'")
    replay_then_deliver = rebuild._snapshot

    def snapshot(*args: Any) -> Any:
        found = replay_then_deliver(*args)
        response = post(samples.sample("info-changed", TopicId=topic, Introduction="during the replay"))
        assert response.json()["ErrorCode"] == 0
        return found

    monkeypatch.setattr(rebuild, "_snapshot", snapshot)
    assert run(settings.db, 1) == rebuild.Rebuilt(topics=12, written=1)
    assert topics(settings.db)[topic]["introduction"] == "during the replay"
    assert replay_differences(settings.db) == []


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_a_topic_is_in_the_same_partition_in_sql_and_in_python(count: int) -> None:
    ids = ["", "a", "ab", "@TGS#_g1@TOPIC#_t9", "@TGS#_g1@TOPIC#_话题", "emoji 😀", "x" * 300]
    conn = sqlite3.connect(":memory:")
    partitions = [projection.Partition(number, count) for number in range(count)]
    in_sql = [
        {
            t
            for t in ids
            if conn.execute(f"SELECT {projection.PARTITION_SQL.format('?')}", (t, *p.params)).fetchone()[0]
        }
        for p in partitions
    ]
    assert in_sql == [{t for t in ids if p.holds(t)} for p in partitions]
    assert sorted(t for part in in_sql for t in part) == sorted(ids)  # each topic in exactly one


def test_the_command_reports_what_it_rewrote(history: dict[str, dict[str, Any]], settings: Settings) -> None:
    alter(settings.db, f"DELETE FROM topics WHERE rowid IN ({FIRST_THREE})")
    result = CliRunner().invoke(main, ["rebuild-projection", "--db", str(settings.db)])
    assert result.exit_code == 0, result.output
    assert "rebuilt 12 topics" in result.output and "3 differed from the log" in result.output
    assert re.search(r"the write lock was held \d+\.\d\d s", result.output)
    assert topics(settings.db) == history


def test_a_rebuild_the_database_refuses_reports_the_database_s_error(
    history: dict[str, dict[str, Any]], settings: Settings
) -> None:
    """A failure that ends the transaction inside SQLite (here RAISE(ROLLBACK); a full disk does the same)
    reaches the caller as itself, and the table is left as it was."""
    alter(
        settings.db,
        "DELETE FROM topics",
        "CREATE TRIGGER refuse BEFORE INSERT ON topics BEGIN SELECT RAISE(ROLLBACK, 'refused by the disk'); END",
    )
    with pytest.raises(sqlite3.IntegrityError, match="refused by the disk"):
        run(settings.db, 1)
    assert topics(settings.db) == {}
    alter(settings.db, "DROP TRIGGER refuse")
    assert run(settings.db, 1) == rebuild.Rebuilt(topics=12, written=12)
    assert topics(settings.db) == history


def test_many_differences_are_written_with_the_indexes_built_afterwards(
    history: dict[str, dict[str, Any]], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rebuild, "BULK_FROM", 5)
    schema = "SELECT type, name, sql FROM sqlite_master WHERE tbl_name = 'topics' ORDER BY name"
    conn = sqlite3.connect(settings.db)
    before = conn.execute(schema).fetchall()
    conn.close()
    alter(settings.db, "DELETE FROM topics")
    assert run(settings.db, 1) == rebuild.Rebuilt(topics=12, written=12)
    assert topics(settings.db) == history
    conn = sqlite3.connect(settings.db)
    try:
        assert conn.execute(schema).fetchall() == before  # indexes and triggers are back, as they were
        plan = conn.execute("EXPLAIN QUERY PLAN SELECT * FROM topics WHERE group_id = 'g'").fetchall()
        assert "idx_topics_group_id" in str(plan)
    finally:
        conn.close()


def test_rebuilding_beside_a_running_receiver(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real ``serve`` process keeps answering while the projection is rebuilt by two processes, and
    the topics it changes meanwhile end up as the log has them."""
    names = [f"{samples.DOC_TOPIC}-live-{n}" for n in range(40)]
    with httpx.Client(base_url=server.url, timeout=10) as client:

        def deliver(body: dict[str, Any]) -> int:
            query = samples.query(APP_ID, body["CallbackCommand"], TOKEN)
            return client.post(f"/callback?{query}", json=body).status_code

        assert {deliver(samples.sample("after-create", TopicId=t)) for t in names} == {200}
        alter(server.db, "UPDATE topics SET name = 'edited'")  # every topic needs repair
        answers: list[int] = []
        stop = threading.Event()

        def keep_delivering() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                topic = names[n % len(names)]
                answers.append(deliver(samples.sample("info-changed", TopicId=topic, Introduction=f"v{n}")))

        sender = threading.Thread(target=keep_delivering)
        sender.start()
        try:
            monkeypatch.setattr(rebuild, "PARALLEL_FROM", 0)
            time.sleep(0.2)
            rebuilt = run(server.db, 2)
            time.sleep(0.2)
        finally:
            stop.set()
            sender.join()
    assert rebuilt.topics == 40 and rebuilt.written == 40
    assert len(answers) > 10 and set(answers) == {200}
    assert replay_differences(server.db) == []
    assert "edited" not in {t["name"] for t in topics(server.db).values()}
