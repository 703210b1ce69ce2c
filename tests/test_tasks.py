"""Ending a task for sure (:func:`topic_audit.tasks.end`): Python 3.11's ``asyncio.wait_for``, inside every
nats-py request, drops a cancellation that comes as its answer does, and the task runs on. The writer
role's stop waited for such a task for ever (seen once in CI, reproduced by widening the window)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from topic_audit import tasks


async def drops_cancellations(times: int, cleaned: list[str]) -> None:
    """A loop that, like a request whose answer came as it was cancelled, carries on ``times`` times."""
    dropped = 0
    try:
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if dropped == times:
                    raise
                dropped += 1
    finally:
        await asyncio.sleep(0)  # its own clean-up, which the first cancellation lets run
        cleaned.append("done")


def test_a_task_that_drops_a_cancellation_is_ended_all_the_same() -> None:
    async def main() -> tuple[bool, bool]:
        cleaned: list[str] = []
        twice = asyncio.create_task(drops_cancellations(2, cleaned))
        await asyncio.sleep(0.05)
        twice.cancel()
        done, _ = await asyncio.wait({twice}, timeout=0.5)
        ran_on = not done  # cancelled once, it runs on: what the stop awaited for ever
        async with asyncio.timeout(5):  # a failure, not a test that hangs
            await tasks.end(twice, logging.getLogger("test"), again=0.1)  # it drops one more
        return ran_on, twice.cancelled() and cleaned == ["done"]

    assert asyncio.run(main()) == (True, True)


def test_a_task_that_runs_on_is_said_where_it_is(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tasks, "SAY_AFTER_SECONDS", 0.2)

    async def main() -> None:
        stubborn = asyncio.create_task(drops_cancellations(5, []), name="stubborn")
        await asyncio.sleep(0.05)
        async with asyncio.timeout(5):
            await tasks.end(stubborn, logging.getLogger("test"), again=0.1)

    with caplog.at_level(logging.WARNING, logger="test"):
        asyncio.run(main())
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith("stubborn runs on"), said
    assert "drops_cancellations" in said[0]  # its stack
