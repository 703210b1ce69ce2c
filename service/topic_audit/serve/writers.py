"""The writer processes ``serve`` runs (:mod:`topic_audit.serve.writer_process`), as its supervisor sees them.

One per generation of receivers: the current generation's, and, after a reload, the earlier
generations' while their receivers drain (each receiver feeds the writer it was started with). A writer
that ends unasked -- the current one or one of an earlier generation -- is started again on its own socket
with its own settings, when :class:`topic_audit.restarts.Backoff` says (at once after a steady run, else
after a pause from :data:`FIRST_PAUSE_SECONDS` doubling up to :data:`MOST_PAUSE_SECONDS`). Meanwhile its
receivers answer 503 for what they cannot have committed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from topic_audit.restarts import Backoff
from topic_audit.serve.children import Child
from topic_audit.settings import Settings

log = logging.getLogger("topic_audit.serve")

FIRST_PAUSE_SECONDS: Final = 0.25
MOST_PAUSE_SECONDS: Final = 5.0


@dataclass
class _Restart:
    settings: Settings
    backoff: Backoff = field(default_factory=lambda: Backoff(FIRST_PAUSE_SECONDS, MOST_PAUSE_SECONDS))
    due: float | None = None
    """When the writer that ended is to be started again (None: it runs)."""


@dataclass
class Writers:
    """``spawn(settings, socket)`` starts a writer process; ``ended(writer)`` releases what an ended one
    held; ``crashed()`` counts a writer that ended unasked."""

    spawn: Callable[[Settings, str], Child]
    folder: str
    ended: Callable[[Child], None]
    crashed: Callable[[], None]
    current: Child | None = None
    retiring: list[Child] = field(default_factory=list)
    """Writers of earlier generations, stopped once no receiver of theirs is left."""
    generation: int = 0
    _restarts: dict[str, _Restart] = field(default_factory=dict)

    def start(self, settings: Settings) -> Child:
        """A writer on the socket of a new generation (made current by :meth:`promote`)."""
        self.generation += 1
        socket_path = os.path.join(self.folder, f"writer-{self.generation}.sock")
        self._restarts[socket_path] = _Restart(settings)
        return self.spawn(settings, socket_path)

    def promote(self, writer: Child) -> None:
        """``writer`` serves the new generation; the current one serves the draining receivers."""
        if self.current is not None:
            self.retiring.append(self.current)
        self.current = writer

    def everyone(self) -> list[Child]:
        return [*self.retiring, *([self.current] if self.current is not None else [])]

    def forget(self, writers: list[Child]) -> None:
        """``writers`` were stopped: no longer watched."""
        for writer in writers:
            self._restarts.pop(writer.socket, None)
        self.retiring = [w for w in self.retiring if w not in writers]
        if self.current in writers:
            self.current = None

    def reap(self) -> None:
        """Start again, when due, every writer that ended unasked."""
        now = time.monotonic()
        if self.current is not None:
            self.current = self._again(self.current, now)
        self.retiring = [self._again(writer, now) for writer in self.retiring]

    def _again(self, writer: Child, now: float) -> Child:
        restart = self._restarts[writer.socket]
        if restart.due is None:
            if writer.process.poll() is None:
                return writer
            pause = restart.backoff.ended(now)
            restart.due = now + pause
            log.error(
                "the writer process %s ended unasked (exit code %s); starting another%s",
                writer.process.pid,
                writer.process.returncode,
                f" in {pause:g} s" if pause else "",
            )
            self.ended(writer)
            self.crashed()
        if now < restart.due:
            return writer
        restart.due = None
        restart.backoff.started(now)
        return self.spawn(restart.settings, writer.socket)
