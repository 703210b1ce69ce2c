"""The one form of a time in topic-audit: ISO-8601 UTC with milliseconds and a ``Z``, e.g.
``2026-11-25T20:39:14.123Z`` -- how the log stores ``received_at`` and every other time, so that the
strings sort as the times do. Nothing else formats or parses a time."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime

_second_cache: tuple[int, str] = (-1, "")


def iso(now: float) -> str:
    """``now`` (``time.time()``) in the log's form; the second is formatted once (the receiver's hot path)."""
    global _second_cache
    fraction, whole = math.modf(now)  # split and rounded exactly as datetime.fromtimestamp does
    second, micro = int(whole), round(fraction * 1_000_000)
    if micro >= 1_000_000:
        second, micro = second + 1, micro - 1_000_000
    cached_second, prefix = _second_cache
    if second != cached_second:
        prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second_cache = (second, prefix)
    return f"{prefix}.{micro // 1000:03d}Z"


def now() -> str:
    """The current time in the log's form."""
    return iso(time.time())


def of(moment: datetime) -> str:
    """An aware ``datetime`` in the log's form."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse(text: str) -> datetime:
    """A time in the log's form (or any ISO-8601 time with a zone) as an aware ``datetime``."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def seconds(text: str) -> float:
    """A time in the log's form as ``time.time()`` seconds."""
    return parse(text).timestamp()
