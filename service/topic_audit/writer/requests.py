"""What is asked of the writer and what it answers, as plain data: a row to append (:class:`Append`,
with what forwarding queues with it, :class:`Forward`), delivery attempts to record (:class:`Record`),
an appended row's answer (:class:`Committed`), and the refusal of either (:class:`AppendError`: answer
503).

Apart from the append transaction (:mod:`topic_audit.writer.append`) so that whoever sends these -- a receiver,
the delivery process -- loads neither the projection nor the commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from topic_audit.forwarding import outbox
from topic_audit.forwarding.outbox import Forward as Forward
from topic_audit.tencent import models

Row = dict[str, Any]
"""A log row: every column of ``audit_log`` but ``id`` and the chain links (:data:`chain.COLUMNS`)."""


@dataclass(frozen=True, slots=True)
class Intake:
    """Cluster mode: the intake stream's message a row came from (:mod:`topic_audit.cluster`)."""

    stream: str
    """The intake stream that stored it."""
    seq: int
    """Its sequence in that stream."""
    after: int
    """The sequence of that stream applied just before it (0 for none): the append refuses a row that
    does not follow the last one applied, so that a group refused never leaves a gap behind a later one
    committed."""
    msg_id: str
    """The receiver's id of the message: a second copy (its publish retried) is recorded, not appended."""
    salt: bytes
    """The content's salt, drawn by the receiver (the commitment to a message's content is the same
    whichever writer applies it)."""
    valid_until: float = float("inf")
    """The writer lease's end as last confirmed (``time.monotonic``): a message whose group commits later
    is refused (:class:`OutOfOrder`), for another writer may hold the lease by then."""


@dataclass(frozen=True, slots=True)
class Append:
    """A request to append one row (and project ``event``, and queue ``forward``)."""

    row: Row
    event: models.TopicEvent | None = None
    forward: Forward | None = None
    intake: Intake | None = None


@dataclass(frozen=True, slots=True)
class Record:
    """A request to record delivery attempts and move their outbox rows on (forwarding)."""

    attempts: Sequence[outbox.Attempt]
    schedule: tuple[int, ...]


@dataclass(slots=True)
class Committed:
    """One appended row, as the answer to its request needs it."""

    id: int
    outcome: str
    duplicate_of: int | None
    entry_hash: str


class AppendError(Exception):
    """The row (or the record) could not be committed; the request must be answered 503."""


class OutOfOrder(AppendError):
    """An intake message that does not follow the last one applied (:attr:`Intake.after`)."""
