"""``serve``'s main process: it holds the listening socket and runs the receiver processes.

Why a supervisor: a callback refused while ``serve`` restarts is lost (Tencent does not retry), so no
restart may close the listening socket or leave it without a process that answers.

- **One socket, kept.** The supervisor binds the socket (or takes the one systemd hands over,
  :mod:`topic_audit.serve.sockets`) and never closes it while it runs. Every receiver process
  (:mod:`topic_audit.serve.receiver_process`, a fresh interpreter: it runs the code installed *now*) inherits it and
  accepts from it; a connection that arrives while no receiver accepts waits in the kernel's queue.
- **Reload (SIGHUP), in every configuration.** The settings are read again (the environment and the
  ``--env-file``); if they are invalid, one line says why and nothing else happens. Otherwise a new
  generation of receivers starts beside the old one; once every new process has said on its pipe that its
  app has started (and a second more, to warm up), the old ones are sent SIGTERM and drain
  (:mod:`topic_audit.serve.receiver_process`): they stop accepting, finish what is in flight and close kept-alive
  connections after their next answer. A new
  process that fails to start is stopped and the old ones keep serving (one line says why).
- **What exists once stays here, with one owner throughout:** the Litestream child (and the checkpoints'
  publication, :mod:`topic_audit.offbox.replica`), the checkpoint timer (:mod:`topic_audit.writer.checkpoint_timer`;
  the receivers run with theirs off) and, when forwarding, the delivery process
  (:mod:`topic_audit.serve.delivery`), which the receivers wake on its socket; a reload starts another
  with the new settings, and the old one stops (it holds ``<db>.forwarder.lock`` until then, so exactly
  one delivers at any time). Settings these read (the database, the address, the replica, the checkpoint
  files) take effect at the next start; a reload that changes them says so.
- **One writer process** (:mod:`topic_audit.serve.writer_process`) commits for every receiver: it starts
  beside them (each waits for it to listen before it says it is ready), listens on a Unix socket in a
  folder of ``serve``'s own (0700), and the receivers feed it (:class:`topic_audit.writer.client.RemoteWriter`). A writer that ends unasked, of this generation
  or of one still draining, is started again on the same socket (``kind="crash"``; at once, then after
  a growing pause while it keeps ending: :mod:`topic_audit.serve.writers`); meanwhile its receivers answer 503
  for what it did not commit, never OK. A reload starts a new writer beside the old one (two writers on one file take
  SQLite's lock in turn: one contiguous chain) for the new generation; the old writer stops once the
  receivers it served have drained.
- **SIGTERM/SIGINT:** every receiver drains and commits, then the delivery process records what it
  attempted and stops, then the writer stops, then the last checkpoint is signed, Litestream is
  stopped, and ``serve`` exits 0. A receiver that ends unasked is started again (``kind="crash"``).
- **Metrics:** every process writes to one ``PROMETHEUS_MULTIPROC_DIR`` (``/metrics`` of any receiver
  merges them); the files of ended processes' live gauges are removed, so that
  ``topic_audit_build_info{version,pid}`` lists the processes running now.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from topic_audit import scratch
from topic_audit.metrics import Metrics
from topic_audit.serve import sockets
from topic_audit.serve.children import DRAIN_SECONDS, Child, Launcher, stop_all, wait_ready
from topic_audit.serve.writers import Writers
from topic_audit.settings import Settings, SettingsError

if TYPE_CHECKING:  # loaded once the first receivers answer, or only when forwarding: serve starts sooner
    from topic_audit.serve.delivery import DeliveryProcess
    from topic_audit.writer.checkpoint_timer import CheckpointTimer

log = logging.getLogger("topic_audit.serve")

RESPAWN_SECONDS = 1.0
WARM_SECONDS = 1.0
"""How long both generations accept before the old one drains (its kept-alive clients then move over)."""
OWNED_HERE = (
    "host",
    "port",
    "db",
    "replica_url",
    "replica_endpoint",
    "litestream",
    "checkpoint_file",
    "signing_key",
)
"""Settings of what the supervisor holds; a reload keeps them (they change at the next start)."""


class Supervisor:
    checkpoint_timer: CheckpointTimer
    """Made once the first generation is ready (:meth:`_serve`)."""

    def __init__(
        self,
        sock: socket.socket,
        settings: Settings,
        load: Callable[[], Settings],
        server: str,
        workers: int,
        metrics: Metrics,
        metrics_dir: str,
    ) -> None:
        self.sock, self.settings, self.load = sock, settings, load
        self.server, self.workers, self.metrics, self.metrics_dir = server, workers, metrics, metrics_dir
        self.current: list[Child] = []
        self.draining: list[Child] = []
        self.signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.intake = settings.role == "receiver"
        """Cluster mode's receivers: they publish to the intake; no writer, delivery or checkpoint here."""
        self.folder = scratch.folder("writer")  # 0700: only this user reaches the writer
        self.launcher = Launcher(sock, server, os.path.join(self.folder, "delivery.sock"))
        self.delivery: DeliveryProcess | None = None
        self._retired_deliveries: list[threading.Thread] = []
        """Delivery processes of earlier settings, stopping."""
        self.writers = Writers(
            self._spawn_writer,
            self.folder,
            lambda writer: writer.ended(self.metrics_dir),
            self.metrics.restarts.labels("crash").inc,
        )

    # -- the main loop -----------------------------------------------------------------------------
    def run(self) -> int:
        for handled in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(handled, lambda signum, _frame: self.signals.put(signum))
        try:
            return self._serve()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _serve(self) -> int:
        # The receivers start beside their writer, not after it (each waits for its socket): the first
        # callback is answered one interpreter's start sooner.
        writer = None if self.intake else self.writers.start(self.settings)
        self.current = self._generation(self.settings, writer)
        failed = self._ready([*([] if writer is None else [writer]), *self.current])
        if writer is not None and not failed:
            self.writers.promote(writer)
        if failed:
            for receiver in self.current:
                if not receiver.pids:  # still starting (waiting for the writer): it has accepted nothing
                    receiver.kill()
            stop_all(self.metrics_dir, self.current)
            self._stop_writers([] if writer is None else [writer])
            log.error("serve could not start: %s", failed)
            return 1
        from topic_audit.writer.checkpoint_timer import CheckpointTimer

        self.checkpoint_timer = CheckpointTimer(self.settings)
        if not self.intake:
            self.checkpoint_timer.start()
            self._start_delivery(self.settings)
        # The processes that sign report their interval; the receivers report 0 (they sign none), and so
        # does cluster mode's receiver `serve` (its active writer signs).
        self.metrics.checkpoint_interval.set(0 if self.intake else self.checkpoint_timer.interval)
        self._announce("serving")
        sockets.notify("READY=1")
        while True:
            try:
                signum: int | None = self.signals.get(timeout=0.25)
            except queue.Empty:
                signum = None
            if signum in (signal.SIGTERM, signal.SIGINT):
                break
            if signum == signal.SIGHUP:
                self.reload()
            self._reap()
        sockets.notify("STOPPING=1")
        clean = stop_all(self.metrics_dir, self.current + self.draining)
        self._stop_delivery()  # it records its attempts through the writer
        clean = self._stop_writers(self.writers.everyone()) and clean  # once every receiver committed
        self.checkpoint_timer.stop()  # the last checkpoint covers everything answered
        return 0 if clean else 1

    def reload(self) -> None:
        sockets.notify("RELOADING=1")
        try:
            settings = self.load()
        except SettingsError as exc:
            log.error("reload refused: %s; the running processes keep serving", exc)
            sockets.notify("READY=1")
            return
        changed = [name for name in OWNED_HERE if getattr(settings, name) != getattr(self.settings, name)]
        if changed:
            log.warning("reload: %s take effect at the next start", ", ".join(changed))
        settings = replace(settings, **{name: getattr(self.settings, name) for name in OWNED_HERE})
        writer = None if self.intake else self.writers.start(settings)
        failed = None if writer is None else self._ready([writer])
        fresh = [] if failed else self._generation(settings, writer)
        failed = failed or self._ready(fresh)
        if failed:
            stop_all(self.metrics_dir, fresh)
            self._stop_writers([] if writer is None else [writer])
            log.error("reload failed: %s; the running processes keep serving", failed)
            sockets.notify("READY=1")
            return
        time.sleep(WARM_SECONDS)  # both generations accept: the new one warms up on part of the load
        old, self.current, self.settings = self.current, fresh, settings
        if writer is not None:
            self.writers.promote(writer)
            self._start_delivery(settings)
        self.checkpoint_timer.interval = settings.checkpoint_seconds
        self.metrics.checkpoint_interval.set(settings.checkpoint_seconds)
        deadline = time.monotonic() + DRAIN_SECONDS
        for receiver in old:
            receiver.drain_deadline = deadline
            receiver.process.send_signal(signal.SIGTERM)
        self.draining += old
        self.metrics.restarts.labels("reload").inc()
        self._announce("reloaded", old)
        sockets.notify("READY=1")

    # -- the delivery process ---------------------------------------------------------------------
    def _start_delivery(self, settings: Settings) -> None:
        """One delivery process for ``settings`` (none without forwarding), feeding the current writer; the
        one before stops in the background (the new one waits for its lock meanwhile)."""
        old, self.delivery = self.delivery, None
        if old is not None:
            stopping = threading.Thread(target=old.stop, name="delivery-stop", daemon=True)
            stopping.start()
            self._retired_deliveries.append(stopping)
        if settings.forward_url:
            from topic_audit.serve.delivery import DeliveryProcess

            assert self.writers.current is not None
            self.delivery = DeliveryProcess(
                settings, self.metrics, self.writers.current.socket, self.launcher.wake_socket
            )
            self.delivery.start()

    def _stop_delivery(self) -> None:
        if self.delivery is not None:
            self.delivery.stop()
        for stopping in self._retired_deliveries:
            stopping.join()

    # -- receivers ---------------------------------------------------------------------------------
    def _generation(self, settings: Settings, writer: Child | None = None) -> list[Child]:
        socket_path = self._writer_socket(writer)
        if self.server == "granian":  # granian runs its own workers in one process group
            return [self.launcher.start(settings, self.workers, socket_path)]
        return [self.launcher.start(settings, 1, socket_path) for _ in range(self.workers)]

    def _writer_socket(self, writer: Child | None = None) -> str:
        """The socket of the writer that receivers of ``writer``'s generation (default: the current one)
        feed; none for cluster mode's receivers."""
        if self.intake:
            return ""
        writer = writer or self.writers.current
        assert writer is not None
        return writer.socket

    def _spawn_writer(self, settings: Settings, socket_path: str) -> Child:
        writer = self.launcher.start(settings, 1, socket_path, kind="writer")
        writer.socket = socket_path
        return writer

    def _ready(self, receivers: list[Child]) -> str | None:
        """None once every one of ``receivers`` has started; otherwise why not. The running writers are
        watched meanwhile (a reload waits here)."""
        return wait_ready(receivers, self.writers.reap)

    def _reap(self) -> None:
        self.writers.reap()
        self._retired_deliveries = [t for t in self._retired_deliveries if t.is_alive()]
        # The receivers and the delivery process they served are gone (the old delivery process records
        # its last attempts through them as it stops).
        if self.writers.retiring and not self.draining and not self._retired_deliveries:
            self._stop_writers(self.writers.retiring)
        for receiver in list(self.draining):
            if receiver.process.poll() is None:
                if receiver.drain_deadline is not None and time.monotonic() > receiver.drain_deadline:
                    log.warning("receiver process %s still draining; killing it", receiver.process.pid)
                    receiver.kill()
                continue
            self.draining.remove(receiver)
            receiver.ended(self.metrics_dir)
        for index, receiver in enumerate(self.current):
            if receiver.process.poll() is None:
                continue
            log.error(
                "receiver process %s ended unasked (exit code %s); starting another",
                receiver.process.pid,
                receiver.process.returncode,
            )
            receiver.ended(self.metrics_dir)
            time.sleep(RESPAWN_SECONDS)
            self.current[index] = self.launcher.start(self.settings, receiver.expected, self._writer_socket())
            self.metrics.restarts.labels("crash").inc()

    def _stop_writers(self, writers: list[Child]) -> bool:
        self.writers.forget(writers)
        return stop_all(self.metrics_dir, writers)

    def _announce(self, what: str, old: list[Child] | None = None) -> None:
        pids = sorted(pid for r in self.current for pid in r.pids)
        versions = sorted({v for r in self.current for v in r.versions})
        message = (
            f"{what}: receiver processes {', '.join(map(str, pids))} answer (version {', '.join(versions)})"
        )
        if old:
            message += f"; {', '.join(str(pid) for r in old for pid in sorted(r.pids))} drain"
        log.info("%s", message)
