"""Hourly rollups of the log (``callbacks_hourly``, ``latency_hourly``), kept by the writer.

Charts over months of callbacks read a few rows per hour instead of scanning the log. The writer adds
each group's counts in the transaction that appends the group, so the rollups always equal a
``GROUP BY`` over ``audit_log`` (``tests/test_writer.py`` checks it) at one statement per distinct hour
and outcome in the group, rather than two trigger statements per row. Derived data: the log's rows are
never touched.
"""

from __future__ import annotations

import bisect
import sqlite3
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from topic_audit.log.migrations import LATENCY_BUCKETS_MS

OVERFLOW_MS = 1e9
"""The bucket of answers slower than the last bound (and of entries without ``elapsed_ms``)."""

_CALLBACKS = (
    "INSERT INTO callbacks_hourly VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT DO UPDATE SET callbacks = callbacks + excluded.callbacks"
)
_LATENCY = "INSERT INTO latency_hourly VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET callbacks = callbacks + excluded.callbacks"


def hour(received_at: str) -> str:
    """``2026-11-25T22:58:44.123Z`` → ``2026-11-25T22:00:00Z``."""
    return received_at[:13] + ":00:00Z"


def bucket(elapsed_ms: float | None) -> float:
    """The smallest bound of ``LATENCY_BUCKETS_MS`` that ``elapsed_ms`` does not exceed."""
    if elapsed_ms is None:
        return OVERFLOW_MS
    at = bisect.bisect_left(LATENCY_BUCKETS_MS, elapsed_ms)
    return float(LATENCY_BUCKETS_MS[at]) if at < len(LATENCY_BUCKETS_MS) else OVERFLOW_MS


def add(conn: sqlite3.Connection, rows: Iterable[Mapping[str, Any]]) -> None:
    """Count ``rows`` (just appended, in the caller's transaction) into the hourly rollups."""
    callbacks: Counter[tuple[str, str, str, str]] = Counter()
    latency: Counter[tuple[str, float]] = Counter()
    for row in rows:
        at = hour(row["received_at"])
        callbacks[at, row["callback_command"] or "", row["outcome"], row["reason"] or "none"] += 1
        latency[at, bucket(row["elapsed_ms"])] += 1
    conn.executemany(_CALLBACKS, ((*key, n) for key, n in callbacks.items()))
    conn.executemany(_LATENCY, ((*key, n) for key, n in latency.items()))
