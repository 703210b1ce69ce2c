"""A child process of ``serve`` as its supervisor sees it: a receiver (or, with granian, a group of
them) or a writer process, with what it said on its readiness pipe."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass, field

from prometheus_client import multiprocess


@dataclass
class Receiver:
    """One receiver process (with granian: one process group serving ``expected`` workers)."""

    process: subprocess.Popen[bytes]
    ready_fd: int
    expected: int
    pids: set[int] = field(default_factory=set)
    versions: set[str] = field(default_factory=set)
    buffer: bytes = b""
    drain_deadline: float | None = None
    socket: str = ""
    """The writer process's socket (a writer's own; the one a receiver feeds)."""

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
