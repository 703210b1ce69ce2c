"""Ending an asyncio task for sure, on Python 3.11.

Python 3.11's ``asyncio.wait_for`` -- inside every nats-py request -- returns an answer that arrived at
the moment its task was cancelled, and drops the cancellation (3.12 keeps it): a task cancelled once may
run on, and whoever awaits it waits for ever. :func:`end` cancels until the task has ended.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from typing import Any, Final

AGAIN_SECONDS: Final = 1.0
"""How long a cancelled task has to end (its own clean-up included) before it is cancelled again."""
SAY_AFTER_SECONDS: Final = 5.0
"""After this long, where the task is, logged once."""


async def end(task: asyncio.Task[Any], log: logging.Logger, again: float = AGAIN_SECONDS) -> None:
    """Cancel ``task``, again every ``again`` seconds while it runs on, until it has ended (said on
    ``log`` if it takes long); what it ended with is the task's to report, not this."""
    started = time.monotonic()
    said = False
    task.cancel()
    while not task.done():
        await asyncio.wait({task}, timeout=again)
        if task.done():
            break
        task.cancel()
        if not said and time.monotonic() - started >= SAY_AFTER_SECONDS:
            stack = io.StringIO()
            task.print_stack(file=stack)
            log.warning(
                "%s runs on %.0f s after it was cancelled, cancelled again; it is at:\n%s",
                task.get_name(),
                time.monotonic() - started,
                stack.getvalue().rstrip(),
            )
            said = True
