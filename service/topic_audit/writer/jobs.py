"""The named jobs the writer runs between groups, on its connection: nobody else gets the connection.

A job is plain data (a frozen dataclass of strings, numbers and paths) and so is its result, so that
a job can be sent to a writer in another process (over a pipe) as well as queued to a thread:

========================  ==============================================  =============================
job                       what the writer does                            result
========================  ==============================================  =============================
:class:`Counts`           reads the log size and the topics per state     :class:`Counted`
:class:`Heartbeat`        commits the heartbeat row (a real durable       None
                          write: readiness, and the end of a fault
                          episode)
:class:`Checkpoint`       signs the head into the checkpoint file and     the checkpoint (a dict), or
                          table (:func:`checkpoints.make_checkpoint`)     None when a recent one stands
:class:`Pragmas`          reads the connection's durability pragmas       :class:`database.Durability`
:class:`Erase`            one erasure record and its entries' content     (entries erased, whether an
                          (:func:`erasure.erase_batch`), for retention    index held them)
:class:`Purge`            one step of :func:`purge.purge` (zero free    True once the step is done
                          pages, a merge step, truncate the WAL)
========================  ==============================================  =============================

Appending rows and recording delivery attempts are not jobs: they share the groups' transactions
(:mod:`topic_audit.writer.append`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar

from topic_audit.log import database
from topic_audit.privacy import purge

T = TypeVar("T")


class Job(Generic[T]):
    """A job whose result is a ``T``."""

    __slots__ = ()


class Counted(NamedTuple):
    entries: int
    active: int
    deleted: int


@dataclass(frozen=True, slots=True)
class Counts(Job[Counted]):
    """The log's size and the topics active and deleted (``topic_counts``), for the gauges at start."""


@dataclass(frozen=True, slots=True)
class Heartbeat(Job[None]):
    """Commit the heartbeat row: proof that the database takes a durable write now."""


@dataclass(frozen=True, slots=True)
class Checkpoint(Job[dict[str, Any] | None]):
    """Sign a checkpoint of the current head with the key at ``key_path``, appended to ``file``."""

    key_path: Path
    file: Path
    unless_within: float = 0.0
    """Sign nothing if the last checkpoint is younger than this many seconds (with several workers,
    each ticks: one checkpoint per interval is enough)."""


@dataclass(frozen=True, slots=True)
class Pragmas(Job[database.Durability]):
    """What the write connection promises about a commit."""


@dataclass(frozen=True, slots=True)
class Erase(Job["tuple[int, bool]"]):
    """Erase the content of entries ``ids`` under one record (``serve``'s retention and body policy run
    on the writer, between groups: no second writer waits for the lock)."""

    ids: tuple[int, ...]
    cause: str
    reason: str
    now: str


@dataclass(frozen=True, slots=True)
class Purge(purge.Step, Job[bool]):
    """One step of a purge (:class:`topic_audit.privacy.purge.Step`), run between groups."""

    @classmethod
    def of(cls, step: purge.Step) -> Purge:
        return cls(step.step, step.table, step.start, step.most_levels)
