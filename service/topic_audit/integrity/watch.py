"""``topic-audit watch``: continuous, incremental verification of a log, for the auditors' side.

Each round runs :class:`topic_audit.integrity.Checker` (the checks ``verify`` runs) on one snapshot of the
log, and costs what is new plus a fixed slice of what is old, whatever the log's size:

- the entries appended since the last round are chained on to the last verified one (whose hash is
  remembered, so a log rewritten or cut short behind it is found at once);
- the checkpoint lines added since the last round are checked (signature, signer, chain of digests, the
  log still holding what they sign), and the lines already checked must still be there, unchanged;
- the deliveries appended since the last round are chained on likewise;
- a rolling sweep re-verifies ``sweep_entries`` older entries (and as many deliveries and checkpoint
  lines), so an old entry altered behind the triggers is found within (entries ÷ sweep) rounds.

Findings stay reported (``topic_audit_watch_findings``) until the watcher is restarted: a log does not
heal. It reads through a read-only connection and can watch the live file or a restored copy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, Histogram

from topic_audit.integrity import Checker, Finding
from topic_audit.log.database import read_only

log = logging.getLogger("topic_audit.watch")


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
    checker: Checker = field(init=False)
    findings: dict[tuple[str, int | None], Finding] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.checker = Checker(self.checkpoint_file, self.pinned_key)

    @property
    def verified(self) -> tuple[int, str]:
        """The last entry verified (id, entry_hash)."""
        return self.checker.entries.verified

    def round(self) -> Round:
        """The sweep of what earlier rounds verified, then what was added since, in one snapshot."""
        started = time.perf_counter()
        conn = read_only(self.db)
        try:
            with self.checker.snapshot(conn) as snapshot:
                new = self.checker.sweep(snapshot, self.sweep_entries) + self.checker.advance(snapshot)
        finally:
            conn.close()
        fresh = []
        for finding in new:
            if (finding.check, finding.entry_id) in self.findings:
                continue
            fresh.append(finding)
            self.findings[(finding.check, finding.entry_id)] = finding
            where = f"entry {finding.entry_id}" if finding.entry_id is not None else "log"
            log.error("integrity finding %s: %s: %s", finding.check, where, finding.message)
        seconds = time.perf_counter() - started
        self.metrics.verified.set(self.verified[0])
        self.metrics.findings.set(len(self.findings))
        self.metrics.last_success.set(time.time())
        self.metrics.round_seconds.observe(seconds)
        entries, checkpoints = self.checker.entries, self.checker.checkpoints
        added, delivered = checkpoints.added, self.checker.deliveries.appended
        return Round(entries.appended, entries.swept, added, delivered, fresh, seconds)
