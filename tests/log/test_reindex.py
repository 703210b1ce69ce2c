"""Rebuilding a full-text index beside the one in use (:mod:`topic_audit.log.reindex`): while callbacks keep
arriving, topics change and entries are erased, the rebuilt index ends up holding exactly what an index
rebuilt in one go holds, and the old one leaves nothing behind."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from conftest import Post, instances, rebuilt_in_one_go
from topic_audit.log import reindex, search
from topic_audit.log.database import connect
from topic_audit.privacy import erasure, purge
from topic_audit.tencent import samples

GROUP = "@TGS#_reindex"


def topic(i: int) -> str:
    return f"{GROUP}@TOPIC#_{i}"


def created(i: int) -> dict[str, Any]:
    return samples.sample(
        "after-create", GroupId=GROUP, TopicId=topic(i), Name=f"name{i} common", Owner_Account=f"owner{i}"
    )


def changed(i: int, text: str) -> dict[str, Any]:
    return samples.sample("info-changed", GroupId=GROUP, TopicId=topic(i), Notification=text)


def tables(conn: sqlite3.Connection) -> set[str]:
    return {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE name LIKE '%fts%'")}


def test_a_rebuild_beside_the_index_follows_every_change_made_meanwhile(post: Post, db_path: Path) -> None:
    for i in range(40):
        assert post(created(i)).status_code == 200
    conn = connect(db_path)
    search.index_everything(conn)
    before = tables(conn)
    steps = {index: 0 for index in purge.INDEXES}
    for index in purge.INDEXES:
        while steps[index] < 6:  # part-way: the next index holds some of the documents
            assert not reindex.step(conn, index, most_levels=0, rows=4)
            steps[index] += 1
        assert f"{index}_next" in tables(conn)
        # it fills with FTS5's own merging (the writer merges by hand only the indexes in use)
        assert conn.execute(f"SELECT v FROM {index}_next_config WHERE k = 'automerge'").fetchone() != (0,)
    # Meanwhile: new callbacks, a copied topic changed, a copied entry erased (its terms must go from
    # both indexes), all indexed the way serve's writer does.
    for i in range(40, 50):
        assert post(created(i)).status_code == 200
    assert post(changed(1, "renamed notification")).status_code == 200
    target = conn.execute("SELECT id FROM audit_log WHERE topic_id = ? ORDER BY id", (topic(2),)).fetchone()[
        0
    ]
    assert erasure.erase_batch(conn, [target], "request", "test", None, "2026-12-03T00:00:00.000Z")
    search.index_everything(conn)
    for index in purge.INDEXES:
        while not reindex.step(conn, index, most_levels=0, rows=4):
            steps[index] += 1
        assert reindex.step(conn, index)  # done: nothing under way, the structure is short
    assert all(count > 20 for count in steps.values()), steps
    assert tables(conn) == before  # the old index and its tables are gone, none left over
    search.index_everything(conn)
    for index in purge.INDEXES:
        conn.execute(f"INSERT INTO {index} ({index}) VALUES ('integrity-check')")
        # the rebuilt index keeps the writer's setting: merged by hand, not inside an insert
        assert conn.execute(f"SELECT v FROM {index}_config WHERE k = 'automerge'").fetchone() == (0,)
        held = instances(conn, index)
        assert held == rebuilt_in_one_go(conn, index)
    terms = {term for term, *_ in instances(conn, "audit_log_fts")}
    assert "owner3" in terms
    assert "owner2" not in terms  # its creation's body was erased
    names = {term for term, *_ in instances(conn, "topics_fts")}
    assert {"name1", "name3"} <= names and "name2" not in names  # and so was the topic's name
    assert conn.execute("SELECT count(*) FROM topics_fts WHERE topics_fts MATCH 'renamed'").fetchone() == (1,)
    conn.close()


def test_a_setting_sqlite_does_not_know_does_not_stop_a_rebuild(post: Post, db_path: Path) -> None:
    """A setting a newer SQLite wrote into the index (an operator's ``sqlite3``) is not carried over, so
    that the rebuild -- and with it every purge -- still completes."""
    for i in range(30):
        assert post(created(i)).status_code == 200
    conn = connect(db_path)
    search.index_everything(conn)
    conn.execute("INSERT INTO audit_log_fts_config (k, v) VALUES ('secure-delete', 1)")
    steps = 0
    while not reindex.step(conn, "audit_log_fts", most_levels=0, rows=8):
        steps += 1
    assert steps > 4
    conn.execute("INSERT INTO audit_log_fts (audit_log_fts) VALUES ('integrity-check')")
    assert conn.execute("SELECT v FROM audit_log_fts_config WHERE k = 'automerge'").fetchone() == (0,)
    conn.close()


def test_abandoning_a_rebuild_leaves_the_index_in_use(post: Post, db_path: Path) -> None:
    for i in range(10):
        post(created(i))
    conn = connect(db_path)
    search.index_everything(conn)
    before = tables(conn)
    for _ in range(3):
        reindex.step(conn, "topics_fts", most_levels=0, rows=2)
    conn.execute("BEGIN IMMEDIATE")
    search.reindex_topics(conn)
    conn.execute("COMMIT")
    assert tables(conn) == before
    assert conn.execute("SELECT count(*) FROM topics_fts WHERE topics_fts MATCH 'common'").fetchone() == (10,)
    conn.close()


def test_free_pages_are_zeroed_a_step_at_a_time(tmp_path: Path) -> None:
    """Pages freed by a connection without ``secure_delete`` keep what they held; the wipe overwrites
    them in short steps and gives them back to the freelist (no scratch table left)."""
    db = tmp_path / "free.db"
    plain = sqlite3.connect(db, isolation_level=None)
    plain.execute("PRAGMA journal_mode=WAL")
    plain.execute("PRAGMA secure_delete=OFF")  # the default of this build is ON; not of every build
    plain.execute("CREATE TABLE t (b BLOB)")
    plain.executemany("INSERT INTO t VALUES (?)", [(b"zqxjkvsecret" * 400,)] * 40)
    plain.execute("DROP TABLE t")  # (a row deleted leaves its bytes in the page it was in, not free)
    plain.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    plain.close()
    assert b"zqxjkvsecret" in db.read_bytes()
    conn = purge.connect(db)
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    steps = 1
    while not purge.wipe_step(conn, pages=8):
        steps += 1
    assert steps > free // 8
    assert purge.truncate_wal(conn)
    assert conn.execute("PRAGMA freelist_count").fetchone()[0] >= free
    assert (
        conn.execute("SELECT name FROM sqlite_master WHERE name LIKE 'erasure_scratch%'").fetchone() is None
    )
    conn.close()
    for name in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        assert not name.exists() or b"zqxjkvsecret" not in name.read_bytes(), name


def test_the_wipe_ends_while_others_keep_freeing_pages(tmp_path: Path) -> None:
    """It takes the pages free when it began, not "until none is free": under writers that free pages
    all the time, that moment need never come."""
    db = tmp_path / "busy.db"
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("PRAGMA journal_mode=WAL")
    other.execute("CREATE TABLE t (b BLOB)")
    other.executemany("INSERT INTO t VALUES (zeroblob(40000))", [()] * 40)
    other.execute("DELETE FROM t")
    conn = purge.connect(db)
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    steps = 0
    while not purge.wipe_step(conn, pages=8):
        steps += 1
        other.execute("INSERT INTO t VALUES (zeroblob(40000))")  # ten pages, freed at once
        other.execute("DELETE FROM t")
        assert steps < 3 * (free // 8) + 10, "the wipe does not end"
    assert (
        conn.execute("SELECT name FROM sqlite_master WHERE name LIKE 'erasure_scratch%'").fetchone() is None
    )
    conn.close()
    other.close()


def test_a_purge_finishes_a_rebuild_left_under_way_even_when_it_merges_nothing(
    post: Post, db_path: Path
) -> None:
    """An erase whose entries the index had not reached yet purges without merging; a rebuild left under
    way (an erase killed between its steps) holds erased terms in its next or old index: finished all
    the same, no table of it left, no copy in the files."""
    for i in range(12):
        post(created(i))
    conn = purge.connect(db_path)
    search.index_everything(conn)
    while not reindex.step(conn, "audit_log_fts", most_levels=0, rows=4):
        if "audit_log_fts_old" in tables(conn):
            break  # swapped: the old index (which held the term) is left, as after a SIGKILL here
    target = conn.execute("SELECT id FROM audit_log WHERE topic_id = ?", (topic(5),)).fetchone()[0]
    assert erasure.erase_batch(conn, [target], "request", "test", None, "2026-12-03T00:00:00.000Z")
    assert purge.purge(conn, merge=False)
    assert not {t for t in tables(conn) if t.endswith(("_next", "_old")) or "_old_" in t or "_next_" in t}
    conn.close()
    for name in (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm")):
        assert not name.exists() or b"owner5" not in name.read_bytes(), name
