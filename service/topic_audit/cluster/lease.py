"""The writer lease: who may apply the intake to the log, one writer at a time.

A key in JetStream's key-value bucket (:data:`topic_audit.cluster.jetstream.LEASE_BUCKET`, three
replicas), created by the writer that finds it absent (compare-and-set on "no such key"), renewed by its
holder (compare-and-set on the revision it wrote) every quarter of its time to live, and removed by the
bucket's time to live once its holder stops renewing. A renewal refused because another writer's
revision is there means the lease is lost: the holder stops at once (a revision of its own there is a
renewal whose answer was lost: it carries on). A renewal refused because the key
expired (the bucket's stream electing a leader can take longer than the time to live) takes it again if
nobody else has.

Fencing: a holder that could not renew for most of the time to live (a stalled machine, a process
stopped and continued, the bucket's stream electing a leader) stops applying until a renewal succeeds
(:meth:`Lease.valid`), so that it never applies while another may hold the lease.
"""

from __future__ import annotations

import logging
import time
from typing import Final

from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

log = logging.getLogger("topic_audit.cluster")

KEY: Final = "lease"
MARGIN: Final = 0.75
"""A holder applies only within this fraction of the time to live after its last renewal."""


class Lost(Exception):
    """Another writer holds the lease now."""


class Lease:
    def __init__(self, kv: KeyValue, name: str, ttl: float) -> None:
        self.kv, self.name, self.ttl = kv, name, ttl
        self.revision: int | None = None
        self.renewed_at = 0.0

    @property
    def renew_every(self) -> float:
        return self.ttl / 4

    async def take(self) -> bool:
        """Take the lease if nobody holds it; whether this writer holds it now."""
        started = time.monotonic()
        try:
            self.revision = await self.kv.create(KEY, self.name.encode())
        except KeyWrongLastSequenceError:
            return False
        self.renewed_at = started
        log.info("writer %s holds the writer lease", self.name)
        return True

    async def renew(self) -> None:
        """Renew the lease; :class:`Lost` when another writer holds it. Other failures (no connection,
        no leader) are raised as they are: the lease may still be ours."""
        assert self.revision is not None
        started = time.monotonic()
        try:
            self.revision = await self.kv.update(KEY, self.name.encode(), last=self.revision)
        except KeyWrongLastSequenceError:
            holder = await self.holder()
            if holder == self.name:  # a renewal stored, its answer lost (a reconnect): ours still
                self.revision = (await self.kv.get(KEY)).revision
                self.renewed_at = started
                return
            if holder is None and await self.take():  # expired while the bucket had no leader
                log.warning("writer %s took the writer lease again: it expired unrenewed", self.name)
                return
            self.revision = None
            raise Lost(f"another writer holds the lease ({holder})") from None
        self.renewed_at = started

    @property
    def valid_until(self) -> float:
        """Until when (``time.monotonic``) this writer may apply, as of its last renewal."""
        return self.renewed_at + MARGIN * self.ttl if self.revision is not None else 0.0

    def valid(self) -> bool:
        """This writer may apply now: it holds the lease, renewed recently enough."""
        return time.monotonic() < self.valid_until

    async def holder(self) -> str | None:
        try:
            entry = await self.kv.get(KEY)
        except Exception:  # no such key, deleted, or no answer
            return None
        return entry.value.decode() if entry.value else None

    async def release(self) -> None:
        """Give the lease up (a clean stop): a standby takes it at once instead of after the TTL."""
        if self.revision is None:
            return
        try:
            await self.kv.delete(KEY, last=self.revision)
        except Exception as exc:
            log.warning("the writer lease could not be released (%s); it expires by itself", exc)
        self.revision = None
