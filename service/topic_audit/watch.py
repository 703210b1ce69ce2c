"""``topic-audit watch``: continuous, incremental verification of a log, for the auditors' side.

Each round costs what is new plus a fixed slice of what is old, whatever the log's size:

- the entries appended since the last round are chained on to the last verified one (whose hash is
  remembered, so a log rewritten or cut short behind it is found at once);
- the checkpoint lines added since the last round are checked (signature, signer, chain of digests, the
  log still holding what they sign), and the lines already checked must still be there, unchanged;
- the deliveries appended since the last round are chained on likewise;
- a rolling sweep re-verifies ``sweep_entries`` older entries, so an old entry altered behind the
  triggers is found within (entries ÷ sweep) rounds.

Findings stay reported (``topic_audit_watch_findings``) until the watcher is restarted: a log does not
heal. It reads through a read-only connection and can watch the live file or a restored copy.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, Histogram

from topic_audit import chain, checkpoints, outbox
from topic_audit.verify import Finding, verify_chain

log = logging.getLogger(__name__)


class WatchMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.verified = Gauge(
            "topic_audit_watch_verified_entries",
            "Entries of the log verified so far (the chain up to here).",
            registry=r,
        )
        self.findings = Gauge(
            "topic_audit_watch_findings", "Integrity findings (0 while the log is intact).", registry=r
        )
        self.last_success = Gauge(
            "topic_audit_watch_last_success_timestamp_seconds",
            "Unix time of the last round that completed (whatever it found).",
            registry=r,
        )
        self.round_seconds = Histogram(
            "topic_audit_watch_round_seconds",
            "Time of one verification round.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )


@dataclass
class Round:
    new_entries: int
    swept: tuple[int, int]
    new_checkpoints: int
    new_deliveries: int
    findings: list[Finding]
    seconds: float


@dataclass
class Watch:
    db: Path
    checkpoint_file: Path
    pinned_key: str | None = None
    sweep_entries: int = 10_000
    metrics: WatchMetrics = field(default_factory=WatchMetrics)

    verified: tuple[int, str] = (0, chain.GENESIS)
    """The last entry verified (id, entry_hash)."""
    cursor: int = 0
    """Where the sweep goes on (entries after this id)."""
    checkpoints_seen: int = 0
    checkpoint_digest: str = chain.GENESIS
    checkpoint_last: dict[str, object] = field(default_factory=dict)
    """The last checkpoint line verified, whole: a line edited in place is found at once."""
    checkpoint_cursor: int = 0
    """Where the sweep of older checkpoint lines goes on."""
    delivered: tuple[int, str] = (0, chain.GENESIS)
    findings: dict[tuple[str, int | None], Finding] = field(default_factory=dict)

    def round(self) -> Round:
        started = time.perf_counter()
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            new: list[Finding] = []
            appended, swept = self._entries(conn, new)
            added = self._checkpoints(conn, new)
            delivered = self._deliveries(conn, new)
        finally:
            conn.close()
        fresh = [f for f in new if (f.check, f.entry_id) not in self.findings]
        for finding in fresh:
            self.findings[(finding.check, finding.entry_id)] = finding
            where = f"entry {finding.entry_id}" if finding.entry_id is not None else "log"
            log.error("integrity finding %s: %s: %s", finding.check, where, finding.message)
        seconds = time.perf_counter() - started
        self.metrics.verified.set(self.verified[0])
        self.metrics.findings.set(len(self.findings))
        self.metrics.last_success.set(time.time())
        self.metrics.round_seconds.observe(seconds)
        return Round(appended, swept, added, delivered, fresh, seconds)

    def _entries(self, conn: sqlite3.Connection, new: list[Finding]) -> tuple[int, tuple[int, int]]:
        head = conn.execute("SELECT coalesce(max(id), 0) FROM audit_log").fetchone()[0]
        last_id, last_hash = self.verified
        if head < last_id:
            new.append(
                Finding(
                    "ids", head + 1, f"the log has {head} entries; {last_id} were verified: entries removed"
                )
            )
            return 0, (0, 0)
        if last_id:
            stored = conn.execute("SELECT entry_hash FROM audit_log WHERE id = ?", (last_id,)).fetchone()
            if stored is None or stored[0] != last_hash:
                new.append(
                    Finding(
                        "chain",
                        last_id,
                        f"entry {last_id} is no longer the one verified: the log was rewritten",
                    )
                )
        appended = 0
        if head > last_id:
            found, appended, head_hash = verify_chain(conn, ids=(last_id, head))
            new += found
            if appended and last_id:  # the first new entry must link to the one verified, not to a rewrite
                link = conn.execute("SELECT prev_hash FROM audit_log WHERE id = ?", (last_id + 1,)).fetchone()
                if link is not None and link[0] != last_hash:
                    new.append(
                        Finding("chain", last_id + 1, "prev_hash is not the verified entry's entry_hash")
                    )
            self.verified = (head, head_hash)
        # The rolling sweep over what was verified in earlier rounds.
        limit = last_id
        if limit == 0:
            return appended, (0, 0)
        start = self.cursor if self.cursor < limit else 0
        end = min(start + self.sweep_entries, limit)
        found, _, _ = verify_chain(conn, ids=(start, end))
        new += found
        self.cursor = end if end < limit else 0
        return appended, (start, end)

    def _checkpoints(self, conn: sqlite3.Connection, new: list[Finding]) -> int:
        try:
            lines = checkpoints.read_file(self.checkpoint_file)
        except ValueError as exc:
            new.append(
                Finding("checkpoint_file", None, f"{self.checkpoint_file} is not a checkpoint file: {exc}")
            )
            return 0
        if len(lines) < self.checkpoints_seen:
            new.append(
                Finding(
                    "checkpoint_file",
                    None,
                    f"{self.checkpoints_seen - len(lines)} checkpoints removed from the file",
                )
            )
            return 0
        if self.checkpoints_seen and lines[self.checkpoints_seen - 1] != self.checkpoint_last:
            new.append(Finding("checkpoint_file", None, f"checkpoint {self.checkpoints_seen} was rewritten"))
        self._sweep_checkpoints(lines, new)
        size = conn.execute("SELECT coalesce(max(id), 0) FROM audit_log").fetchone()[0]
        delivered = _count(conn, "deliveries")
        for number, cp in enumerate(lines[self.checkpoints_seen :], self.checkpoints_seen + 1):
            if not checkpoints.signature_ok(cp):
                new.append(
                    Finding("checkpoint_signature", None, f"checkpoint {number}: signature or digest invalid")
                )
                continue
            if self.pinned_key is None:
                self.pinned_key = cp["public_key"]
            if cp["public_key"] != self.pinned_key:
                new.append(Finding("checkpoint_key", None, f"checkpoint {number}: signed by another key"))
            if cp["prev_digest"] != self.checkpoint_digest:
                new.append(
                    Finding(
                        "checkpoint_chain",
                        None,
                        f"checkpoint {number}: prev_digest is not the previous checkpoint's",
                    )
                )
            log_size = int(cp["log_size"])
            if log_size > size:
                new.append(
                    Finding(
                        "checkpoint_prefix",
                        size + 1,
                        f"checkpoint {number} covers {log_size} entries; the log has {size}",
                    )
                )
            elif log_size:
                row = conn.execute("SELECT entry_hash FROM audit_log WHERE id = ?", (log_size,)).fetchone()
                if row is None or row[0] != cp["head_hash"]:
                    new.append(
                        Finding(
                            "checkpoint_prefix",
                            log_size,
                            f"checkpoint {number}: entry {log_size} is not the signed head",
                        )
                    )
            if cp.get("deliveries_size"):
                count = int(cp["deliveries_size"])
                row = (
                    conn.execute("SELECT entry_hash FROM deliveries WHERE id = ?", (count,)).fetchone()
                    if count <= delivered
                    else None
                )
                if row is None or row[0] != cp["deliveries_head"]:
                    new.append(
                        Finding(
                            "checkpoint_deliveries",
                            None,
                            f"checkpoint {number}: delivery {count} is not the signed head",
                        )
                    )
            self.checkpoint_digest = cp["digest"]
            self.checkpoint_last = cp
        added = len(lines) - self.checkpoints_seen
        self.checkpoints_seen = len(lines)
        return added

    def _sweep_checkpoints(self, lines: list[dict[str, object]], new: list[Finding]) -> None:
        """Re-check a slice of the lines verified in earlier rounds: signatures and the chain of digests."""
        limit = min(self.checkpoints_seen, len(lines))
        if not limit:
            return
        start = self.checkpoint_cursor if self.checkpoint_cursor < limit else 0
        end = min(start + self.sweep_entries, limit)
        previous = lines[start - 1]["digest"] if start else chain.GENESIS
        for number in range(start + 1, end + 1):
            cp = lines[number - 1]
            if not checkpoints.signature_ok(cp) or cp.get("prev_digest") != previous:
                new.append(Finding("checkpoint_file", None, f"checkpoint {number} was rewritten"))
                break
            previous = cp["digest"]
        self.checkpoint_cursor = end if end < limit else 0

    def _deliveries(self, conn: sqlite3.Connection, new: list[Finding]) -> int:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'deliveries'").fetchone():
            return 0
        last_id, last_hash = self.delivered
        if last_id:
            stored = conn.execute("SELECT entry_hash FROM deliveries WHERE id = ?", (last_id,)).fetchone()
            if stored is None or stored[0] != last_hash:
                new.append(
                    Finding("delivery_chain", None, f"delivery {last_id} is no longer the one verified")
                )
        found, count, head = outbox.verify_chain(conn, self.delivered)
        new += [Finding(check, None, f"delivery {at}: {message}") for check, at, message in found]
        if count:
            self.delivered = (last_id + count, head)
        return count


def _count(conn: sqlite3.Connection, table: str) -> int:
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (table,)).fetchone():
        return 0
    return int(conn.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()[0])
