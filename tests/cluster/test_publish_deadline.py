"""A receiver in cluster mode answers 503 by its deadline even when a publish swallows the timeout's
cancellation: what Python 3.11's ``asyncio.wait_for`` inside nats-py's request does when the answer comes
at the moment the timeout cancels it (seen once in ~3 full runs as a callback left waiting for the quorum
to come back, 30 s later). That race cannot be produced on demand with real servers, so the publish here
is a stand-in that always swallows the cancellation, named so: ``SwallowingJetStream``."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from conftest import APP_ID, TOKEN
from topic_audit.cluster.publisher import ANSWER_BY_SECONDS, StreamWriter
from topic_audit.metrics import Metrics
from topic_audit.settings import Settings
from topic_audit.tencent import samples
from topic_audit.writer.requests import AppendError


class SwallowingJetStream:
    """A JetStream context whose publish never answers, and which ignores the first time it is cancelled
    (a stand-in)."""

    def __init__(self) -> None:
        self.tries = 0
        self.swallowed = False

    async def publish(self, subject: str, payload: bytes, timeout: float, headers: dict[str, str]) -> Any:
        self.tries += 1
        try:
            await asyncio.sleep(timeout)
        except asyncio.CancelledError:
            if self.swallowed:
                raise
            self.swallowed = True  # the cancellation is lost, as in asyncio.wait_for's race
            await asyncio.sleep(timeout)
        raise nats.errors.TimeoutError


def test_a_publish_that_swallows_the_timeout_still_ends_by_the_deadline(tmp_path: Path) -> None:
    writer = StreamWriter(Settings(sdk_app_id=APP_ID, token=TOKEN, db=tmp_path / "audit.db"), Metrics())
    stand_in = SwallowingJetStream()
    writer.js = stand_in  # type: ignore[assignment]
    row = {"callback_command": "Group.CallbackAfterCreateTopic", "elapsed_ms": 0.5}
    row |= {"request_body": samples.sample("after-create", TopicId="late")}

    async def append() -> float:
        started = time.monotonic()
        with pytest.raises(AppendError, match="did not acknowledge in time"):
            await asyncio.wait_for(writer.append(row), 10)  # without the deadline: 10 s, then a timeout
        return time.monotonic() - started

    took = asyncio.run(append())
    assert took < ANSWER_BY_SECONDS + 0.5, took  # 503 in time for Tencent's 2 s
    assert stand_in.tries >= 2 and stand_in.swallowed  # the other stream was tried; the race happened
