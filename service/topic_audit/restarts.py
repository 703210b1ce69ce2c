"""When a child process that ended unasked is started again: one policy for every child ``serve`` keeps
(the writer processes, :mod:`topic_audit.serve.writers`; the delivery process,
:mod:`topic_audit.serve.delivery`; Litestream, :mod:`topic_audit.offbox.replica`).

A child that had run :attr:`Backoff.steady` seconds or more is started again at once: it was working, and
what it serves is down until it is back. One that ends sooner is started again after a pause, ``first``
at first, doubling at each quick end up to ``most``, so that a child that cannot start does not take a
core starting again and again, and is back within ``most`` once the cause is gone.
"""

from __future__ import annotations

import time
from typing import Final

STEADY_SECONDS: Final = 60.0
"""A child that ran this long before it ended is started again at once."""


class Backoff:
    """The restart pauses of one child: :meth:`ended` when it ends, :meth:`started` when another starts."""

    def __init__(self, first: float, most: float, steady: float = STEADY_SECONDS) -> None:
        self.first, self.most, self.steady = first, most, steady
        self.pause = 0.0
        """The pause before the latest start (0: at once)."""
        self.since = time.monotonic()
        """When the child now running was started."""

    def started(self, now: float | None = None) -> None:
        self.since = time.monotonic() if now is None else now

    def ended(self, now: float | None = None) -> float:
        """The child ended: the seconds to wait before starting another."""
        now = time.monotonic() if now is None else now
        if now - self.since >= self.steady:
            self.pause = 0.0
        else:
            self.pause = min(max(self.pause * 2, self.first), self.most)
        return self.pause
