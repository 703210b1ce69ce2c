"""Checks an auditor runs on a log: the chain, the ids, the body hashes, and the projection.

Each finding names the first bad entry (or topic). Nothing here writes to the database.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from topic_audit import chain, checkpoints, outbox, projection


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    """``ids``, ``body``, ``chain``, ``hash``, ``projection``, ``replay``, ``delivery_*`` or
    ``checkpoint_*``."""
    entry_id: int | None
    message: str
    topic_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Progress = Callable[[int], None]
ChainResult = tuple[list["Finding"], int, str]


# Every hashed column in canonical order, then the body's bytes (TEXT is stored as UTF-8: the CAST gives
# exactly the bytes received) and the stored hash. Python encodes the canonical form with the same
# encoder the writer used, so whatever a row holds (a BLOB or a float where none belongs), it is hashed
# by the definition itself.
_READ = (
    f"SELECT {', '.join(chain.SORTED)}, CAST(request_body AS BLOB), entry_hash FROM audit_log "
    "WHERE id > ? AND id <= ? ORDER BY id"
)
_ID, _PREV, _BODY_SHA = (chain.SORTED.index(c) for c in ("id", "prev_hash", "request_body_sha256"))
_ALL = (-(2**63), 2**63 - 1)
PROGRESS_EVERY = 10_000


def verify_chain(
    conn: sqlite3.Connection, progress: Progress | None = None, ids: tuple[int, int] = _ALL
) -> tuple[list[Finding], int, str]:
    """Recompute the chain over the entries with ``ids[0] < id <= ids[1]`` (all by default).

    Returns the findings (the first of each kind), the row count and the last entry's hash. A range
    starts from the two entries before it, exactly as a pass over the whole log would reach it, so
    ranges checked apart report what one pass would (see :func:`verify_all`).
    """
    found: dict[str, Finding] = {}

    def note(check: str, entry_id: int | None, message: str) -> None:
        found.setdefault(check, Finding(check, entry_id, message))

    sha256, canonical = hashlib.sha256, chain.canonical_values
    width = len(chain.SORTED)
    expected_id, prev_hash, count = 1, chain.GENESIS, 0
    before_prev: str | None = None
    before = conn.execute(
        "SELECT id, entry_hash FROM audit_log WHERE id <= ? ORDER BY id DESC LIMIT 2", (ids[0],)
    ).fetchall()
    if before:
        expected_id, prev_hash = before[0][0] + 1, before[0][1]
        before_prev = before[1][1] if len(before) > 1 else chain.GENESIS
    # Row by row, not fetchmany: a batch of 10,000 wide rows costs more than the rows themselves.
    for count, row in enumerate(conn.execute(_READ, ids), 1):
        entry_id, row_prev, body, row_hash = row[_ID], row[_PREV], row[width], row[width + 1]
        if entry_id != expected_id:
            note(
                "ids",
                expected_id,
                f"expected id {expected_id}, found {entry_id}: entries missing or inserted",
            )
        if sha256(body).hexdigest() != row[_BODY_SHA]:
            note("body", entry_id, "request_body does not match request_body_sha256")
        if row_prev != prev_hash:
            if row_prev == before_prev:  # links past the previous entry: that one was inserted
                note(
                    "chain",
                    entry_id - 1,
                    f"entry {entry_id - 1} was inserted: entry {entry_id} links past it",
                )
            else:
                note("chain", entry_id, "prev_hash is not the previous entry's entry_hash")
        if sha256(canonical(row[:width])).hexdigest() != row_hash:
            note("hash", entry_id, "entry_hash does not match the entry's canonical form")
        before_prev, prev_hash, expected_id = prev_hash, row_hash, entry_id + 1
        if progress is not None and not count % PROGRESS_EVERY:
            progress(PROGRESS_EVERY)
    if progress is not None:
        progress(count % PROGRESS_EVERY)
    return sorted(found.values(), key=lambda f: f.entry_id or 0), count, prev_hash


def verify_projection(conn: sqlite3.Connection) -> list[Finding]:
    """The ``topics`` table must equal a replay of the log, and every accepted entry must replay as such."""
    store, mismatches, _ = projection.replay(conn)
    findings = [
        Finding("replay", m.entry_id, f"recorded as accepted but replays as {m.replayed_outcome}")
        for m in mismatches[:1]
    ]
    replayed_counts = store.counts()
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'topic_counts'").fetchone():
        stored = projection.stored_counts(conn)
        if stored != replayed_counts:
            findings.append(
                Finding("projection", None, f"topic_counts is {stored}; the log gives {replayed_counts}")
            )
    for difference in projection.differences(conn, store.rows)[:1]:  # the first in key order
        if difference.replayed is None:
            assert difference.stored is not None
            entry = difference.stored[projection.COLUMNS.index("updated_entry_id")]
            message = "in topics but not in the log"
        elif difference.stored is None:
            entry, message = difference.replayed["updated_entry_id"], "missing from topics"
        else:
            pairs = zip(
                projection.COLUMNS, projection.row_values(difference.replayed), difference.stored, strict=True
            )
            entry = difference.replayed["updated_entry_id"]
            message = f"differs from the log in {', '.join(c for c, a, b in pairs if a != b)}"
        findings.append(Finding("projection", entry, message, difference.topic_id))
    return findings


def verify_deliveries(conn: sqlite3.Connection) -> tuple[list[Finding], int]:
    """The ``deliveries`` chain (forwarding): contiguous ids and every hash. Findings name the delivery id
    in the message (``entry_id`` is for audit_log entries); returns (findings, deliveries)."""
    found, count, _ = outbox.verify_chain(conn)
    return [Finding(check, None, f"delivery {at}: {message}") for check, at, message in found], count


def verify_checkpoints(
    conn: sqlite3.Connection, file: Path, count: int, pinned_key: str | None = None, delivered: int = 0
) -> list[Finding]:
    """Every checkpoint in ``file``: signature, key, chain of digests, and the log still holding its prefix.

    ``count`` is the number of rows in the log, ``delivered`` the number in ``deliveries``. A rewritten log is reported from the first entry after
    the last checkpoint that still matches (the altered entry lies between the two checkpoints).
    """
    found: dict[str, Finding] = {}

    def note(check: str, entry_id: int | None, message: str) -> None:
        found.setdefault(check, Finding(check, entry_id, message))

    try:
        lines = checkpoints.read_file(file)
    except ValueError as exc:
        note("checkpoint_file", None, f"{file} is not a checkpoint file: {exc}")
        lines = []
    has_table = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'checkpoints'").fetchone()
    stored = [r[0] for r in conn.execute("SELECT digest FROM checkpoints ORDER BY id")] if has_table else []
    if not lines and stored:
        note("checkpoint_file", None, f"{file} is missing but the database records {len(stored)} checkpoints")
    in_file = [c.get("digest") for c in lines]
    # The database may lag the file by one checkpoint (a crash between the two writes), never lead it.
    if stored != in_file[: len(stored)] or len(in_file) - len(stored) > 1:
        note("checkpoint_table", None, "the checkpoints table does not match the checkpoint file")

    prev_digest, key, matched_size = chain.GENESIS, pinned_key, 0
    for number, cp in enumerate(lines, 1):
        if not checkpoints.signature_ok(cp):
            note("checkpoint_signature", None, f"checkpoint {number}: signature or digest invalid")
            continue
        size = int(cp["log_size"])
        if key is None:
            key = cp["public_key"]
        if cp["public_key"] != key:
            note(
                "checkpoint_key",
                size,
                f"checkpoint {number}: signed by another key ({cp['public_key'][:16]}…)",
            )
        if cp["prev_digest"] != prev_digest:
            note(
                "checkpoint_chain", size, f"checkpoint {number}: prev_digest is not the previous checkpoint's"
            )
        prev_digest = cp["digest"]
        if size > count:
            note(
                "checkpoint_prefix",
                count + 1,
                f"checkpoint {number} covers {size} entries but the log has {count}: entries removed",
            )
            continue
        if cp.get("deliveries_size"):
            delivery_size = int(cp["deliveries_size"])
            head = conn.execute(
                "SELECT entry_hash FROM deliveries WHERE id = ?", (min(delivery_size, delivered),)
            ).fetchone()
            if delivery_size > delivered:
                note(
                    "checkpoint_deliveries",
                    None,
                    f"checkpoint {number} covers {delivery_size} deliveries but deliveries has {delivered}: "
                    "deliveries removed",
                )
            elif head is None or head[0] != cp["deliveries_head"]:
                note(
                    "checkpoint_deliveries",
                    None,
                    f"checkpoint {number}: delivery {delivery_size} is not the signed head; deliveries was "
                    "altered",
                )
        if size == 0:
            continue
        row = conn.execute("SELECT entry_hash FROM audit_log WHERE id = ?", (size,)).fetchone()
        if row is None or row[0] != cp["head_hash"]:
            note(
                "checkpoint_prefix",
                matched_size + 1,
                f"checkpoint {number}: entry {size} is not the signed head; the log was altered in entries "
                f"{matched_size + 1}..{size}",
            )
        elif "checkpoint_prefix" not in found:
            matched_size = size
    return sorted(found.values(), key=lambda f: f.entry_id or 0)


PARALLEL_FROM = 50_000
CHUNKS_PER_PROCESS = 8


def verify_all(
    conn: sqlite3.Connection,
    checkpoint_file: Path,
    pinned_key: str | None = None,
    show_progress: bool = False,
) -> tuple[list[Finding], int, str]:
    """Every check: (findings, entries, head hash).

    On a large log the chain is recomputed in ranges by a pool of processes (one per core but one, each
    on its own read-only connection) while this process replays the projection; then this process takes
    the ranges no worker has started, so every core is busy until the end.
    """
    path = conn.execute("PRAGMA database_list").fetchone()[2]
    low, high = conn.execute(
        "SELECT coalesce(min(id), 1) - 1, coalesce(max(id), 0) FROM audit_log"
    ).fetchone()
    with projection.paused_gc():
        delivery_findings, delivered = verify_deliveries(conn)
        if high - low < PARALLEL_FROM:  # starting processes costs more than it saves on a small log
            findings, count, head = _chain_range(path, (low, high), show_progress)
            findings += delivery_findings
            findings += verify_checkpoints(conn, checkpoint_file, count, pinned_key, delivered)
            return findings + verify_projection(conn), count, head
        workers = max((os.cpu_count() or 2) - 1, 1)  # this process has the replay to do meanwhile
        step = -(-(high - low) // ((workers + 1) * CHUNKS_PER_PROCESS))
        ranges = [(start, min(start + step, high)) for start in range(low, high, step)]
        results: list[ChainResult | None] = [None] * len(ranges)
        with (
            _progress(high - low, show_progress) as advance,
            ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool,
        ):
            parts = [pool.submit(_chain_range, path, ids) for ids in ranges]
            for part in parts:
                part.add_done_callback(lambda future: future.cancelled() or advance(future.result()[1]))
            projection_findings = verify_projection(conn)
            # Then this process takes the ranges no worker has started yet, from the end.
            for index in reversed(range(len(parts))):
                if parts[index].cancel():
                    results[index] = stolen = _chain_range(path, ranges[index])
                    advance(stolen[1])
            done = [r if r is not None else part.result() for r, part in zip(results, parts, strict=True)]
    found: dict[str, Finding] = {}
    for part_findings, _, _ in done:  # the first finding of each kind, in log order
        for finding in part_findings:
            found.setdefault(finding.check, finding)
    count = sum(r[1] for r in done)
    head = next((r[2] for r in reversed(done) if r[1]), chain.GENESIS)
    findings = sorted(found.values(), key=lambda f: f.entry_id or 0) + delivery_findings
    findings += verify_checkpoints(conn, checkpoint_file, count, pinned_key, delivered)
    return findings + projection_findings, count, head


@contextlib.contextmanager
def _progress(total: int, show: bool) -> Iterator[Progress]:
    if not show:
        yield lambda _: None
        return
    import click

    lock = threading.Lock()  # advanced from this thread and from the pool's result thread

    def advance(steps: int) -> None:
        with lock:
            bar.update(steps)

    with click.progressbar(length=total, label="verifying", file=sys.stderr) as bar:
        yield advance


def _chain_range(
    path: str, ids: tuple[int, int], show_progress: bool = False
) -> tuple[list[Finding], int, str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        with projection.paused_gc(), _progress(ids[1] - ids[0], show_progress) as advance:
            return verify_chain(conn, advance, ids)
    finally:
        conn.close()


def first_bad_id(findings: list[Finding]) -> int | None:
    """The earliest log entry known to be bad. Checks that pin an entry win over checkpoint ranges (which
    only say that something between two checkpoints changed); a projection finding names the entry that
    last changed the topic, which is context rather than a bad entry, so it counts last."""
    tiers: tuple[list[int], list[int], list[int]] = ([], [], [])
    for f in findings:
        if f.entry_id is not None:
            tier = 2 if f.check == "projection" else 1 if f.check.startswith("checkpoint") else 0
            tiers[tier].append(f.entry_id)
    return min(next((t for t in tiers if t), []), default=None)
