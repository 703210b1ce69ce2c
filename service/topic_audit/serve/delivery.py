"""The delivery process ``serve`` runs (:mod:`topic_audit.serve.delivery_process`), as its supervisor sees
it: one per ``serve``, whatever the number of receivers, started once the receivers answer and again at
every reload (with the new settings, feeding the new writer), stopped after the receivers and before the
writer (the attempts it has made are recorded through the writer).

:class:`DeliveryProcess` spawns it, restarts it when it ends unasked (:class:`topic_audit.restarts.Backoff`),
applies its metric reports (:func:`topic_audit.forwarding.forwarder.apply`: ``serve``'s metrics, in the
multiprocess folder every receiver's ``/metrics`` merges) and stops it. The receivers wake it themselves,
on its socket (:class:`topic_audit.forwarding.loop.Waker`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
from typing import Final

from topic_audit.forwarding.forwarder import apply
from topic_audit.forwarding.loop import DELIVERY_SOCKET
from topic_audit.forwarding.sending import destination_label
from topic_audit.metrics import Metrics
from topic_audit.restarts import Backoff
from topic_audit.settings import WORKER_SETTINGS, Settings
from topic_audit.writer.client import WRITER_SOCKET

log = logging.getLogger("topic_audit.forward")

FIRST_PAUSE_SECONDS: Final = 1.0
MOST_PAUSE_SECONDS: Final = 30.0
"""The pauses before another delivery process is started."""
STOP_SECONDS: Final = 15.0


class DeliveryProcess:
    """Starts the delivery process, restarts it if it dies, applies its reports, stops it."""

    def __init__(self, settings: Settings, metrics: Metrics, writer_socket: str, wake_socket: str) -> None:
        self.settings = settings
        self.metrics = metrics
        self.writer_socket, self.wake_socket = writer_socket, wake_socket
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._backoff = Backoff(FIRST_PAUSE_SECONDS, MOST_PAUSE_SECONDS)

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        for destination in self.settings.forward_url:
            self.metrics.forwarding_to(destination_label(destination))
        self._spawn()
        self._supervisor = threading.Thread(target=self._supervise, name="delivery-supervisor", daemon=True)
        self._supervisor.start()

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """End of file on its stdin: it stops, recording what it has attempted (killed after ``timeout``)."""
        self._stopping.set()
        process = self._process
        if process is not None:
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("the delivery process did not stop in %g s; killing it", timeout)
                process.kill()
                process.wait(5)
        if self._supervisor is not None:
            self._supervisor.join(timeout)
        if self._process is not process and self._process is not None:  # restarted meanwhile
            self._process.kill()
            self._process.wait(5)

    def _spawn(self) -> None:
        env = {
            **os.environ,
            WORKER_SETTINGS: self.settings.for_workers(),
            WRITER_SOCKET: self.writer_socket,
            DELIVERY_SOCKET: self.wake_socket,
        }
        env.pop("TOPIC_AUDIT_TOKEN", None)
        if self.settings.token is not None:
            env["TOPIC_AUDIT_TOKEN"] = self.settings.token
        self._backoff.started()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "topic_audit.serve.delivery_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            process_group=0,  # signals to serve's group (a terminal's ^C) are serve's to pass on
        )

    def _supervise(self) -> None:
        """Apply the child's reports; when it ends unasked, start another."""
        while True:
            process = self._process
            assert process is not None and process.stdout is not None
            for line in process.stdout:
                try:
                    apply(self.metrics, line)
                except (ValueError, KeyError, TypeError):
                    log.warning("unreadable report from the delivery process: %r", line[:200])
            code = process.wait()
            if self._stopping.is_set():
                return
            pause = self._backoff.ended()
            log.error("the delivery process ended (exit code %s); starting another in %g s", code, pause)
            if self._stopping.wait(pause):
                return
            self._spawn()
