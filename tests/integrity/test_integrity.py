"""One tamper-detection path: every tampering case through ``verify``, ``watch`` (a fresh watcher's first
round, and a watcher that verified the intact log before the tampering, over a whole sweep) and
``restore``'s recovery of checkpoints from a restored copy's table — and the same findings from each."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from benchmarks.logs import generate_log
from conftest import alter
from topic_audit.forwarding import outbox
from topic_audit.integrity import Finding, verify
from topic_audit.integrity.watch import Watch
from topic_audit.log import chain
from topic_audit.offbox.replica import recover_checkpoints
from topic_audit.transparency import checkpoints
from topic_audit.transparency.checkpoints import Signer, make_checkpoint
from topic_audit.writer.thread import connect

ENTRIES, DELIVERIES, SWEEP = 60, 12, 8  # checkpoints after entries 20, 40, 60 and deliveries 4, 8, 12
Case = Callable[[Path], None]
FILE = ("checkpoint_table", "checkpoint_file")
"""Findings about the checkpoint file as a whole, not about one line."""


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("integrity")
    signer, _ = Signer.load_or_create(folder / "key.pem")
    for round_ in range(3):
        generate_log(folder / "audit.db", ENTRIES // 3, seed=round_)
        conn = connect(folder / "audit.db")
        conn.execute("BEGIN IMMEDIATE")
        outbox.append(conn, [_attempt(round_ * 20 + n) for n in range(1, DELIVERIES // 3 + 1)])
        conn.execute("COMMIT")
        make_checkpoint(conn, signer, folder / "cp.jsonl", f"2026-11-25T00:00:0{round_}.000Z")
        conn.close()
    return folder


def _attempt(audit_id: int) -> outbox.Attempt:
    return outbox.Attempt(audit_id, "http://app.example/cb", "after", 1, "2026-11-25T00:00:00.000Z", 1.5, 200)


@pytest.fixture
def copy(populated: Path, tmp_path: Path) -> Path:
    for name in ("audit.db", "cp.jsonl", "key.pem"):
        shutil.copy(populated / name, tmp_path / name)
    return tmp_path


# -- the three paths -------------------------------------------------------------------------------
def by_verify(folder: Path, file: Path | None = None) -> list[Finding]:
    """``verify``'s findings but the projection's (derived data, which only ``verify`` replays)."""
    conn = sqlite3.connect(folder / "audit.db")
    try:
        found = verify.verify_all(conn, file or folder / "cp.jsonl")[0]
    finally:
        conn.close()
    return [f for f in found if f.check not in ("projection", "replay")]


def watcher(folder: Path) -> Watch:
    return Watch(folder / "audit.db", folder / "cp.jsonl", sweep_entries=SWEEP)


def by_watching(folder: Path, tampering: Case) -> list[Finding]:
    """A watcher that verified the intact log, then a whole sweep's rounds after the tampering."""
    watch = watcher(folder)
    assert watch.round().findings == []
    tampering(folder)
    for _ in range(ENTRIES // SWEEP + 2):
        watch.round()
    return list(watch.findings.values())


def by_restore(folder: Path) -> tuple[list[dict[str, Any]], Finding | None, list[Finding]]:
    """``restore`` with only the first checkpoint published: what it recovers from the table and where it
    stops, and what ``verify`` finds in a checkpoint file holding the table's lines."""
    conn = sqlite3.connect(folder / "audit.db")
    conn.row_factory = sqlite3.Row
    rows = [
        {k: v for k, v in dict(r).items() if v is not None and k != "id"}
        for r in conn.execute("SELECT * FROM checkpoints ORDER BY id")
    ]
    conn.close()
    published = [json.dumps(rows[0], sort_keys=True)]
    recovered, stopped = recover_checkpoints(folder / "audit.db", published)
    table_file = folder / "table.jsonl"
    table_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = [
        f for f in by_verify(folder, table_file) if f.check.startswith("checkpoint_") and f.check not in FILE
    ]
    return [json.loads(r) for r in recovered], stopped, lines


# -- the cases -------------------------------------------------------------------------------------
def _sql(*statements: str) -> Case:
    return lambda folder: alter(folder / "audit.db", *statements)


def _lines(change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> Case:
    def rewrite(folder: Path) -> None:
        lines = change(checkpoints.read_file(folder / "cp.jsonl"))
        (folder / "cp.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    return rewrite


def _rewrite_chain_from(entry: int) -> Case:
    """Entry ``entry``'s evidence altered and every hash after it recomputed: consistent, but not the chain
    signed. (Its content would not do: since keyed commitments, the hash covers the commitment, and the
    commitment's salt is in the file, so a rewriter recomputes both -- the same case.)"""

    def rewrite(folder: Path) -> None:
        conn = sqlite3.connect(folder / "audit.db")
        conn.row_factory = sqlite3.Row
        rows = [dict(r) for r in conn.execute("SELECT * FROM audit_log ORDER BY id")]
        conn.close()
        rows[entry - 1]["elapsed_ms"] = 999.0
        prev = chain.GENESIS
        for row in rows:
            row["prev_hash"] = prev
            row["entry_hash"] = prev = chain.entry_hash(row)
        alter(folder / "audit.db")  # the append-only triggers dropped
        conn = sqlite3.connect(folder / "audit.db")
        conn.executemany(
            "UPDATE audit_log SET elapsed_ms = ?, prev_hash = ?, entry_hash = ? WHERE id = ?",
            [(r["elapsed_ms"], r["prev_hash"], r["entry_hash"], r["id"]) for r in rows],
        )
        conn.commit()
        conn.close()

    return rewrite


def _signed_by_another_key(folder: Path) -> None:
    conn = connect(folder / "audit.db")
    make_checkpoint(
        conn, Signer.load_or_create(folder / "other.pem")[0], folder / "cp.jsonl", "2026-11-25T01:00:00.000Z"
    )
    conn.close()


def _edit_table_row(folder: Path) -> None:
    conn = sqlite3.connect(folder / "audit.db")
    conn.execute("DROP TRIGGER checkpoints_no_update")
    conn.execute("UPDATE checkpoints SET log_size = 39, digest = ? WHERE id = 2", ("f" * 64,))
    conn.commit()
    conn.close()


CASES: dict[str, tuple[Case, set[tuple[str, int | None]]]] = {
    # Content is committed to through its salt: an edit is a "content" finding; evidence is hashed.
    "edited entry": (_sql("UPDATE audit_log SET detail = 'edited' WHERE id = 30"), {("content", 30)}),
    "edited evidence": (_sql("UPDATE audit_log SET elapsed_ms = 999.0 WHERE id = 30"), {("hash", 30)}),
    "deleted entry": (_sql("DELETE FROM audit_log WHERE id = 30"), {("ids", 30), ("chain", 31)}),
    "entry moved below id 1": (
        _sql("UPDATE audit_log SET id = -5 WHERE id = 1"),
        {("ids", 1), ("hash", -5), ("content", -5)},  # its salt is the salt of entry 1
    ),
    "cut prefix": (_sql("DELETE FROM audit_log WHERE id <= 10"), {("ids", 1), ("chain", 11)}),
    "cut prefix, renumbered": (
        _sql("DELETE FROM audit_log WHERE id <= 10", "UPDATE audit_log SET id = id - 10"),
        {("chain", 1), ("hash", 1), ("content", 1), ("checkpoint_prefix", 1)},
    ),
    "cut tail": (_sql("DELETE FROM audit_log WHERE id > 50"), {("checkpoint_prefix", 51)}),
    "chain rewritten from entry 30": (_rewrite_chain_from(30), {("checkpoint_prefix", 21)}),
    "edited delivery": (
        _sql("UPDATE deliveries SET detail = 'edited' WHERE id = 5"),
        {("delivery_hash", None)},
    ),
    "deleted delivery": (
        _sql("DELETE FROM deliveries WHERE id = 5"),
        {("delivery_ids", None), ("delivery_chain", None)},
    ),
    "deliveries cut short": (_sql("DELETE FROM deliveries WHERE id > 10"), {("checkpoint_deliveries", None)}),
    "edited checkpoint line": (
        _lines(lambda lines: [lines[0], {**lines[1], "log_size": 39}, lines[2]]),
        {("checkpoint_signature", None), ("checkpoint_chain", 60)},
    ),
    "removed checkpoint line": (
        _lines(lambda lines: [lines[0], lines[2]]),
        {("checkpoint_chain", 60), ("checkpoint_table", None)},
    ),
    "last checkpoint line removed": (_lines(lambda lines: lines[:2]), {("checkpoint_table", None)}),
    "checkpoint file deleted": (
        lambda folder: (folder / "cp.jsonl").unlink(),
        {("checkpoint_file", None), ("checkpoint_table", None)},
    ),
    "checkpoint table row edited": (_edit_table_row, {("checkpoint_table", None)}),
    "checkpoint signed by another key": (_signed_by_another_key, {("checkpoint_key", 60)}),
}


def _kinds(findings: list[Finding]) -> set[tuple[str, int | None]]:
    return {(f.check, f.entry_id) for f in findings}


def test_the_intact_log_passes_every_path(copy: Path) -> None:
    assert by_verify(copy) == []
    assert watcher(copy).round().findings == []
    recovered, stopped, _ = by_restore(copy)
    assert (len(recovered), stopped) == (2, None)


@pytest.mark.parametrize("case", CASES)
def test_verify_and_a_fresh_watch_find_the_same(copy: Path, case: str) -> None:
    tampering, expected = CASES[case]
    tampering(copy)
    found = by_verify(copy)
    assert _kinds(found) == expected
    assert watcher(copy).round().findings == found


HISTORY = (
    "were verified: entries removed",
    "were verified: deliveries removed",
    "is no longer the one verified",
    "removed from the file",
    "rewritten",
)
"""What only a watcher that remembers an earlier round can tell."""


@pytest.mark.parametrize("case", CASES)
def test_a_watch_that_verified_the_log_finds_the_same_within_a_sweep(copy: Path, case: str) -> None:
    tampering, expected = CASES[case]
    found = by_watching(copy, tampering)
    assert expected <= _kinds(found)
    checks = {check for check, _ in expected}
    # Besides: the same kinds elsewhere (each slice of the sweep reports its first), and what it remembers.
    assert all(f.check in checks or any(h in f.message for h in HISTORY) for f in found), found


@pytest.mark.parametrize("case", CASES)
def test_restore_recovers_the_checkpoints_up_to_the_first_finding(copy: Path, case: str) -> None:
    """What ``restore`` takes from the table after the published checkpoints stops where ``verify``, given
    the table's checkpoints, finds the first one bad, with that finding."""
    CASES[case][0](copy)
    recovered, stopped, lines = by_restore(copy)
    table = len(recovered) + 1 + (stopped is not None)  # published, recovered, the one it stopped at
    if not lines:
        assert stopped is None
    else:
        assert stopped is not None and stopped.check in {f.check for f in lines}
        assert stopped.message.startswith(f"checkpoint {table}:") or f"checkpoint {table} " in stopped.message
    assert recovered == [
        {k: v for k, v in row.items() if v is not None}
        for row in checkpoints.read_file(copy / "table.jsonl")[1 : 1 + len(recovered)]
    ]
