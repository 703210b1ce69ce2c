"""A writer in cluster mode (``serve --role writer``): a standby until it takes the writer lease, then
the active writer -- the log, its replica, checkpoints, forwarding and retention, as a single-machine
``serve`` runs them, fed by the intake instead of receivers.

Taking over: the lease first (:mod:`topic_audit.cluster.lease`); then, with a replica configured, the
newest copy is restored beside the database and replaces the local file unless that holds the replica's
head entry itself (this writer's own log, continued since); then the intake is applied from the
message after the last one applied from each stream (:mod:`topic_audit.cluster.applier`). Nothing the
replica lacks was handed out (checkpoints are published only once the replica holds what they cover),
so a checkpoint published before the failover is never contradicted. A writer that learns another
holds the lease stops at once (exit code 75: systemd starts it again, as a standby).

``/healthz``: the process is up. ``/readyz``: it holds the lease and has applied everything stored (503
with why not otherwise: standing by, restoring, catching up). ``/metrics``: as every role.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

from litestar import Litestar, MediaType, Response, get
from litestar.datastructures import State
from nats.aio.client import Client

from topic_audit import clock, scratch, tasks
from topic_audit.cluster import jetstream
from topic_audit.cluster.applier import Applier, last_applied
from topic_audit.cluster.lease import Lease, Lost
from topic_audit.cluster.scrub import Scrubber
from topic_audit.forwarding.forwarder import LocalDelivery
from topic_audit.log import database
from topic_audit.log.database import read_only
from topic_audit.log.migrations import migrate
from topic_audit.metrics import Metrics
from topic_audit.offbox import replica
from topic_audit.receiver.app import healthz, metrics_endpoint
from topic_audit.settings import Settings
from topic_audit.tencent import models
from topic_audit.writer import jobs, retention
from topic_audit.writer.checkpoint_timer import CheckpointTimer
from topic_audit.writer.thread import AuditWriter

log = logging.getLogger("topic_audit.cluster")

NO_BACKUPS: Final = "no matching backup"
"""What ``litestream restore`` says of a replica that holds nothing yet (the first writer's start)."""
LOST_EXIT: Final = 75
"""The exit code of a writer that lost the lease (EX_TEMPFAIL: start it again, as a standby)."""
TAKE_EVERY_SECONDS: Final = 1.0
"""How often a standby tries to take the lease."""
RETRY_RENEW_SECONDS: Final = 0.5
"""After a renewal that got no answer, the next try."""
STOP_SECONDS: Final = 75.0
"""The longest the writer's own stop may take (Litestream's last sync up to 40 s of it), after uvicorn's
up to 5 s for requests in flight: within the unit's 90 s."""


class Role:
    """One writer: standing by, taking over, then active until it stops or loses the lease."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.name = jetstream.writer_name()
        self.state = "connecting to the intake"
        self.nc: Client | None = None
        self.lease: Lease | None = None
        self.writer: AuditWriter | None = None
        self.applier: Applier | None = None
        self.replicator: replica.Replicator | None = None
        self.timer: CheckpointTimer | None = None
        self.delivery: LocalDelivery | None = None
        self.tasks: list[asyncio.Task[Any]] = []
        self.keeping: asyncio.Task[None] | None = None
        """Renewing the lease: the last thing a stop ends, just before it gives the lease up."""
        metrics.writer_lease.labels(self.name).set(0)

    # -- taking over -------------------------------------------------------------------------------
    async def run(self) -> None:
        settings = self.settings
        # the folders of takeovers cut short (a stop, a crash, a lost lease during a restore): the copy of
        # the log in one would escape every later erasure
        await asyncio.to_thread(scratch.remove_leftovers, settings.db.parent)
        while self.nc is None:
            try:
                self.nc = await jetstream.connect(settings, f"topic-audit writer {self.name}")
                js = self.nc.jetstream(timeout=5)
                await jetstream.ensure(js, settings)
            except Exception as exc:
                self.state = f"the intake is not reachable: {type(exc).__name__} {exc}"
                log.warning("%s; trying again", self.state)
                if self.nc is not None:
                    await self.nc.close()
                    self.nc = None
                await asyncio.sleep(TAKE_EVERY_SECONDS)
        js = self.nc.jetstream(timeout=5)
        key = settings.signing_key_path
        while not key.exists():  # a writer of its own key would sign what the pinned key does not
            self.state = (
                f"no signing key at {key}: every writer signs with the same key; copy it from the first "
                "writer (`topic-audit checkpoint` creates one once)"
            )
            log.error("%s", self.state)
            await asyncio.sleep(10 * TAKE_EVERY_SECONDS)
        kv = await js.key_value(jetstream.LEASE_BUCKET)
        ttl = (await kv.status()).ttl or settings.lease_seconds  # the bucket's, which expires the key
        if abs(ttl - settings.lease_seconds) > 0.01:
            log.warning(
                "the lease lasts %.1f s (the bucket %s was made so), not TOPIC_AUDIT_LEASE_SECONDS=%.1f: "
                "every writer uses the bucket's",
                ttl,
                jetstream.LEASE_BUCKET,
                settings.lease_seconds,
            )
        self.lease = lease = Lease(kv, self.name, ttl)
        while True:
            try:
                if await lease.take():
                    break
                self.state = f"standing by: {await lease.holder()} holds the writer lease"
            except Exception as exc:
                self.state = f"standing by: the lease cannot be read ({type(exc).__name__})"
            await asyncio.sleep(TAKE_EVERY_SECONDS)
        self.metrics.writer_lease.labels(self.name).set(1)
        self.keeping = asyncio.create_task(self._keep(lease), name="writer-lease")
        self.tasks.append(asyncio.create_task(jetstream.keep_leaders_apart(self.nc, js), name="apart"))
        self.state = "restoring from the replica" if settings.replica_url else "opening the log"
        if settings.replica_url is None:
            log.warning(
                "no replica (TOPIC_AUDIT_REPLICA_URL): a standby taking over from this writer has no copy of "
                "its log to restore (docs/cluster.md)"
            )
        await asyncio.to_thread(self._prepare)
        await asyncio.to_thread(self._start)
        assert self.writer is not None
        if settings.forward_url:
            self.delivery = LocalDelivery(settings, self.metrics, self.writer)
        self.tasks += retention.start(settings, self.metrics, self.writer, clock.now)
        replicator = self.replicator
        scrubber = Scrubber(
            js,
            settings.db,
            settings.checkpoint_path,
            (lambda: replicator.published) if replicator is not None else (lambda: None),
            self.metrics,
        )
        self.tasks.append(asyncio.create_task(scrubber.run(), name="intake-erasure"))
        assert self.writer is not None
        self.state = "catching up with the intake"
        self.applier = Applier(js, self.writer, settings.db, self.metrics, lease, settings.max_batch)
        self.tasks.append(asyncio.create_task(self._announce(self.applier), name="caught-up"))
        await self.applier.run()

    def _prepare(self) -> None:
        """The newest log this writer can have: the local file when it holds all the replica holds (its
        own, continued since), else the replica's. A store that cannot be read now is not "no replica":
        taking over on a stale local log would skip what the streams no longer keep, so this fails, and
        the writer is started again (exit 1) to try again."""
        settings = self.settings
        if settings.replica_url is not None:
            target = replica.Target.parse(settings.replica_url, settings.replica_endpoint)
            with tempfile.TemporaryDirectory(
                prefix=f"{scratch.PREFIX}takeover-{os.getpid()}-", dir=settings.db.parent
            ) as folder:
                copy = Path(folder) / settings.db.name
                try:
                    replica.restore(target, copy, litestream=settings.litestream)
                except RuntimeError as exc:
                    if NO_BACKUPS not in str(exc):
                        raise
                    log.warning("no replica yet (the first writer): using the local log")
                else:
                    if _continues(settings.db, copy):
                        log.info("the local log holds all the replica holds, and more: kept")
                    else:
                        _replace(settings.db, copy, settings.checkpoint_path)
                        log.info(
                            "restored the replica (%d intake messages applied)",
                            sum(last_applied(settings.db).values()),
                        )
        migrate(settings.db)

    def _start(self) -> None:
        """The replica, the writer thread and the checkpoint timer (blocking: on a thread)."""
        settings, metrics = self.settings, self.metrics
        if settings.replica_url is not None:
            target = replica.Target.parse(settings.replica_url, settings.replica_endpoint)
            self.replicator = replica.Replicator(
                settings.db, settings.checkpoint_path, target, metrics.replica_lag, settings.litestream
            )
            self.replicator.start()
        self.writer = writer = AuditWriter.serving(settings, metrics, create_key=False)
        writer.start()
        counts = writer.submit(jobs.Counts()).result()
        metrics.set_initial(*counts)
        self.timer = CheckpointTimer(settings)
        self.timer.start()

    async def _keep(self, lease: Lease) -> None:
        """Renew the lease; stop this process at once when another writer holds it."""
        pause = lease.renew_every
        while True:
            await asyncio.sleep(pause)
            pause = lease.renew_every
            try:
                await lease.renew()
            except Lost as exc:
                self.metrics.writer_lease.labels(self.name).set(0)
                log.critical("%s: this writer stops now (exit %d) and applies nothing more", exc, LOST_EXIT)
                logging.shutdown()
                os._exit(LOST_EXIT)
            except Exception as exc:  # no answer (a reconnect, an election): try again soon, not in ttl/4
                if time.monotonic() > lease.renewed_at + lease.ttl:  # expired: another may hold it now
                    self.metrics.writer_lease.labels(self.name).set(0)
                    log.critical(
                        "the writer lease expired unrenewed (%s: %s): this writer stops now (exit %d): its "
                        "checkpoints, replica and deliveries with it",
                        type(exc).__name__,
                        exc,
                        LOST_EXIT,
                    )
                    logging.shutdown()
                    os._exit(LOST_EXIT)
                pause = min(lease.renew_every, RETRY_RENEW_SECONDS)
                log.warning(
                    "the writer lease could not be renewed (%s: %s); trying again", type(exc).__name__, exc
                )

    async def _announce(self, applier: Applier) -> None:
        while True:
            await applier.caught_up.wait()
            if self.state != "active":
                log.info("writer %s is active: the intake is applied up to %s", self.name, applier.applied)
            self.state = "active"
            if self.delivery is not None:
                self.delivery.wake()
            await asyncio.sleep(0.5)
            if not applier.caught_up.is_set():
                self.state = f"catching up with the intake ({applier.why_not or 'applying'})"

    # -- stopping ----------------------------------------------------------------------------------
    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.delivery is not None:
            await self.delivery.stop()
        if self.writer is not None:
            await asyncio.to_thread(self.writer.stop)
        if self.timer is not None:
            await asyncio.to_thread(self.timer.stop)  # a last checkpoint covers everything applied
        if self.replicator is not None:
            await asyncio.to_thread(self.replicator.stop)
        if self.keeping is not None:  # renewed until here: a slow stop never lets a standby in early
            await tasks.end(self.keeping, log)  # and never after the release
        if self.lease is not None:
            await self.lease.release()
        self.metrics.writer_lease.labels(self.name).set(0)
        if self.nc is not None:  # a stop never waits on a server that is gone (nor on the close, cancelled)
            await asyncio.wait({asyncio.create_task(self.nc.close(), name="intake-close")}, timeout=2)

    def ready(self) -> str | None:
        """None when active and caught up; else why not."""
        if self.state != "active":
            return self.state
        if self.lease is None or not self.lease.valid():
            return "the writer lease is not confirmed: applying nothing until it is renewed"
        return None


def _continues(local: Path, copy: Path) -> bool:
    """Whether the local log holds the replica's head entry, the same (and so everything before it):
    this writer's own log, continued since the replica was made."""
    conn = read_only(copy)
    try:
        theirs = database.head(conn)
    finally:
        conn.close()
    if theirs[0] == 0:  # an empty replica
        return local.exists()
    if not local.exists():
        return False
    conn = read_only(local)
    try:
        if not database.exists(conn, "audit_log"):
            return False
        found = conn.execute("SELECT entry_hash FROM audit_log WHERE id = ?", (theirs[0],)).fetchone()
    finally:
        conn.close()
    return found is not None and found[0] == theirs[1]


def _replace(db: Path, copy: Path, checkpoint_file: Path) -> None:
    """Put the restored ``copy`` (and the checkpoints restored with it) in place of the local log, which
    is deleted: it is older than the replica, or not the log the replica continues, and a copy kept
    would escape every later erasure."""
    for suffix in ("", "-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    shutil.move(str(copy), db)
    restored = copy.with_name(copy.name + ".checkpoints.jsonl")
    if restored.exists():
        shutil.move(str(restored), checkpoint_file)


@get("/readyz")
async def readyz(state: State) -> Response[bytes]:
    """Ready: this writer holds the lease and has applied everything the intake stored."""
    why = state.role.ready()
    if why is None:
        return Response(models.OK_BODY, media_type=MediaType.JSON)
    return Response(models.answer_body(503, "not_ready", why), status_code=503, media_type=MediaType.JSON)


def create_app(settings: Settings, metrics: Metrics | None = None) -> Litestar:
    """The writer role's app: its health, readiness and metrics; the role runs for the app's lifetime."""
    metrics = metrics or Metrics()
    role = Role(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        running = asyncio.create_task(role.run(), name="writer-role")
        running.add_done_callback(_ended)
        try:
            yield
        finally:
            # A stop that does not end (a call that never returns) writes every thread's stack to the log
            # and exits 1, before systemd's TimeoutStopSec kills it without a word.
            with contextlib.suppress(Exception):  # a stderr without a file descriptor: no watchdog
                faulthandler.dump_traceback_later(STOP_SECONDS, exit=True)
            await tasks.end(running, log)  # its failure, if any, is _ended's to report
            await role.stop()
            faulthandler.cancel_dump_traceback_later()

    return Litestar(
        route_handlers=[healthz, readyz, metrics_endpoint],
        lifespan=[lifespan],
        state=State({"settings": settings, "metrics": metrics, "role": role}),
        openapi_config=None,
        logging_config=None,  # the one logging setup (settings.configure_logging): written at once, not queued
    )


def _ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("the writer role failed", exc_info=task.exception())
        logging.shutdown()
        os._exit(1)
