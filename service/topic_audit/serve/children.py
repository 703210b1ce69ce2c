"""The child processes of ``serve`` as its supervisor sees them: a receiver (or, with granian, a group of
them) or a writer process, with what it said on its readiness pipe; how they are started
(:class:`Launcher`), waited for (:func:`wait_ready`) and stopped (:func:`stop_all`)."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

from prometheus_client import multiprocess

from topic_audit.settings import WORKER_SETTINGS, Settings
from topic_audit.writer.client import WRITER_SOCKET

log = logging.getLogger("topic_audit.serve")

LISTEN_FD = "TOPIC_AUDIT_LISTEN_FD"
"""The child's environment: the listening socket's fd, the ready pipe's, the HTTP server, how many
serving processes (:mod:`topic_audit.serve.receiver_process` reads them)."""
READY_FD = "TOPIC_AUDIT_READY_FD"
SERVER = "TOPIC_AUDIT_SERVER"
THREADS = "TOPIC_AUDIT_WORKERS"
READY_SECONDS = 60.0
"""Longest a new receiver may take to start before the reload gives up on it."""
DRAIN_SECONDS = 45.0
"""Longest a draining receiver may take before it is killed."""

Kind = Literal["receiver", "writer"]
MODULES: dict[Kind, str] = {
    "receiver": "topic_audit.serve.receiver_process",
    "writer": "topic_audit.serve.writer_process",
}
"""What each kind of child runs."""


@dataclass
class Child:
    """One child process of ``serve`` that says when it is ready on a pipe: a receiver (with granian: one
    process group serving ``expected`` workers) or the writer process."""

    process: subprocess.Popen[bytes]
    ready_fd: int
    expected: int
    pids: set[int] = field(default_factory=set)
    versions: set[str] = field(default_factory=set)
    buffer: bytes = b""
    drain_deadline: float | None = None
    socket: str = ""
    """The writer process's socket (a writer's own; the one a receiver feeds)."""
    kind: Kind = "receiver"
    """What it is, as messages name it."""

    @property
    def ready(self) -> bool:
        return len(self.pids) >= self.expected

    def read(self) -> None:
        chunk = os.read(self.ready_fd, 4096)
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            _, pid, version = line.decode().split(" ", 2)
            self.pids.add(int(pid))
            self.versions.add(version)

    def kill(self) -> None:
        """SIGKILL to its whole process group (granian's workers too)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def ended(self, metrics_dir: str) -> None:
        """Once it has ended: its pipe closed, its metrics marked dead (once, however often told)."""
        if self.ready_fd < 0:
            return
        os.close(self.ready_fd)
        self.ready_fd = -1
        for pid in {*self.pids, self.process.pid}:
            multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]


@dataclass
class Launcher:
    """Starts ``serve``'s children: each inherits the listening socket ``sock`` and says on a pipe when
    it is ready."""

    sock: socket.socket
    server: str
    """The HTTP server the receivers run (``uvicorn``, ``granian``)."""
    wake_socket: str = ""
    """The delivery process's wake socket (:mod:`topic_audit.serve.delivery`), told to every receiver."""

    def start(
        self,
        settings: Settings,
        expected: int,
        socket_path: str,
        kind: Kind = "receiver",
    ) -> Child:
        """A ``kind`` process (its module in :data:`MODULES`) in a fresh interpreter, expected to say
        ``expected`` pids on its pipe; it feeds (or, a writer, listens on) ``socket_path``."""
        read, write = os.pipe()
        env = {
            **os.environ,
            WORKER_SETTINGS: replace(settings, checkpoint_seconds=0).for_workers(),
            LISTEN_FD: str(self.sock.fileno()),
            READY_FD: str(write),
            SERVER: self.server,
            THREADS: str(expected),
            WRITER_SOCKET: socket_path,
        }
        if settings.forward_url:  # only a receiver that forwards wakes the delivery process
            from topic_audit.forwarding.loop import DELIVERY_SOCKET

            env[DELIVERY_SOCKET] = self.wake_socket
        env.pop("TOPIC_AUDIT_TOKEN", None)
        if settings.token is not None:
            env["TOPIC_AUDIT_TOKEN"] = settings.token
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", MODULES[kind]],
                env=env,
                pass_fds=(self.sock.fileno(), write),
                process_group=0,  # signals to serve's group (a terminal's ^C, a hangup) are serve's to pass on
            )
        finally:
            os.close(write)
        return Child(process, read, expected, kind=kind)


def wait_ready(receivers: list[Child], meanwhile: Callable[[], None]) -> str | None:
    """None once every one of ``receivers`` has started; otherwise why not. ``meanwhile`` is called
    between looks."""
    deadline = time.monotonic() + READY_SECONDS
    while not all(r.ready for r in receivers):
        meanwhile()
        for receiver in receivers:
            if receiver.process.poll() is not None and not receiver.ready:
                return f"{receiver.kind} process {receiver.process.pid} ended (exit code {receiver.process.returncode}) before it was ready (its lines above say why)"
        if time.monotonic() > deadline:
            late = next(r for r in receivers if not r.ready)
            return f"a {late.kind} process did not start within {READY_SECONDS:g} s"
        waiting = [r.ready_fd for r in receivers if not r.ready]
        readable, _, _ = select.select(waiting, [], [], 0.2)
        for receiver in receivers:
            if receiver.ready_fd in readable:
                receiver.read()
    return None


def stop_all(metrics_dir: str, receivers: list[Child]) -> bool:
    """SIGTERM to every receiver, and wait for them to drain; False when one had to be killed."""
    for receiver in receivers:
        if receiver.process.poll() is None:
            receiver.process.send_signal(signal.SIGTERM)
    clean = True
    deadline = time.monotonic() + DRAIN_SECONDS
    for receiver in receivers:
        try:
            receiver.process.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            log.error("receiver process %s did not stop in time; killing it", receiver.process.pid)
            receiver.kill()
            receiver.process.wait()
            clean = False
        receiver.ended(metrics_dir)
    return clean
