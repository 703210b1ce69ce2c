"""How ``serve``'s supervisor keeps its writer processes (:mod:`topic_audit.serve.writers`): stand-in
processes (named so: ``sleep``, not writers) on real pids, killed for real."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from topic_audit.restarts import Backoff
from topic_audit.serve import writers
from topic_audit.serve.children import Child
from topic_audit.settings import Settings


def stand_in(settings: Settings, socket: str) -> Child:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    read, write = os.pipe()
    os.close(write)
    return Child(process, read, 1, socket=socket)


def test_a_writer_that_ends_is_started_again_on_its_socket_after_a_growing_pause(tmp_path: Path) -> None:
    ended: list[int] = []
    crashes: list[int] = []
    kept = writers.Writers(
        stand_in, str(tmp_path), lambda w: ended.append(w.process.pid), lambda: crashes.append(1)
    )
    old = kept.start(Settings(sdk_app_id="1", token="t", max_batch=7))
    kept.promote(old)
    new = kept.start(Settings(sdk_app_id="1", token="t"))
    kept.promote(new)
    assert kept.retiring == [old] and kept.current is new and old.socket != new.socket
    try:
        pauses = []
        for _ in range(3):  # the retiring one: its draining receivers still feed it
            dying = kept.retiring[0]
            dying.process.kill()
            dying.process.wait()
            died = time.monotonic()
            kept.reap()
            assert ended[-1] == dying.process.pid and kept.retiring == [dying]  # not yet: a pause first
            while kept.retiring[0] is dying:
                time.sleep(0.01)
                kept.reap()
            pauses.append(time.monotonic() - died)
            assert kept.retiring[0].socket == old.socket and kept.current is new
        assert len(crashes) == 3
        expected = [writers.FIRST_PAUSE_SECONDS * 2**n for n in range(3)]  # each within a minute of its start
        assert all(want <= got < want + 0.3 for want, got in zip(expected, pauses, strict=True)), pauses
        current = kept.current
        assert current is not None
        current.process.kill()
        current.process.wait()
        while kept.current is current:
            time.sleep(0.01)
            kept.reap()
        assert kept.current is not None and kept.current.socket == new.socket
    finally:
        for writer in kept.everyone():
            writer.process.kill()
            writer.process.wait()


def test_one_restart_policy_doubles_to_a_ceiling_and_forgets_after_a_steady_run() -> None:
    backoff = Backoff(first=1.0, most=5.0, steady=60.0)
    backoff.started(now=0.0)
    pauses = []
    for _ in range(5):  # each ends a second after its start
        pauses.append(backoff.ended(now=backoff.since + 1))
        backoff.started(now=backoff.since + 1 + pauses[-1])
    assert pauses == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff.ended(now=backoff.since + 60) == 0.0  # it had run steadily: at once
    backoff.started(now=backoff.since + 60)
    assert backoff.ended(now=backoff.since + 1) == 1.0  # and the doubling starts over
