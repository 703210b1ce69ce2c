"""Callbacks refused, failed and the slowest answer across a reload and across a SIGTERM + start.

    python -m tests.benchmarks.restarts            # ~200/s and 1,000/s, 12 s each (RESTARTS_RATES, RESTARTS_SECONDS)

Each row runs a real ``serve`` (one worker, uvicorn) under steady load, half over kept-alive connections
and half over a new connection per callback, and restarts it in the middle: ``kill -HUP`` twice, or a
SIGTERM and a new ``serve`` on the same socket held as systemd holds it (socket activation). The
baseline row of the same run is the same load with no restart. Every answered callback is then looked up
in the log (by its topic id) and the chain is verified.

:class:`Load` is also what ``tests/serve/test_restarts.py`` drives.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from topic_audit.tencent import samples

APP_ID, TOKEN = "1400000000", "restarts-token"


@dataclass
class Result:
    topic: str
    started: float
    seconds: float
    status: int | None
    error: str | None


@dataclass
class Load:
    """Open-loop load at ``rate`` callbacks a second until stopped; half kept-alive, half new connections."""

    url: str
    rate: float
    timeout: float = 60.0
    """Longer than a stop and start: what waits in the socket's queue is answered late, not failed."""
    results: list[Result] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        kept = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout)
        fresh = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True), timeout=timeout
        )
        tasks: set[asyncio.Task[None]] = set()
        started, n = time.monotonic(), 0
        try:
            while not self._stop.is_set():
                n += 1
                session = kept if n % 2 else fresh
                task = asyncio.create_task(self._one(session, f"rs-{os.getpid()}-{n}"))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(max(started + n / self.rate - time.monotonic(), 0))
            await asyncio.gather(*tasks)
        finally:
            await kept.close()
            await fresh.close()

    async def _one(self, session: aiohttp.ClientSession, topic: str) -> None:
        body = json.dumps(samples.sample("after-create", TopicId=topic)).encode()
        query = samples.query(APP_ID, "Group.CallbackAfterCreateTopic", TOKEN)
        began = time.monotonic()
        status, error = None, None
        try:
            async with session.post(f"{self.url}/callback?{query}", data=body) as response:
                status = response.status
                answer = await response.json(content_type=None)
                if answer.get("ActionStatus") != "OK":
                    error = f"answer {answer}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        self.results.append(Result(topic, began, time.monotonic() - began, status, error))

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=asyncio.run, args=(self.run(),), daemon=True)
        thread.start()
        return thread

    def stop(self, thread: threading.Thread) -> None:
        self._stop.set()
        thread.join(30)

    # -- what it saw ---------------------------------------------------------------------------------
    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if r.error is not None or r.status != 200]

    @property
    def slowest(self) -> float:
        return max((r.seconds for r in self.results), default=0.0)

    def missing_from(self, db: Path) -> list[str]:
        """Topics answered OK that the log does not hold."""
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            logged = {
                row[0] for row in conn.execute("SELECT topic_id FROM audit_log WHERE status_code = 200")
            }
        finally:
            conn.close()
        return [
            r.topic for r in self.results if r.status == 200 and r.error is None and r.topic not in logged
        ]


def serve_command(held: socket.socket | None = None) -> list[str]:
    """``topic-audit serve``; with ``held``, as systemd starts it: the socket as fd 3, LISTEN_FDS/LISTEN_PID."""
    command = [sys.executable, "-m", "topic_audit.cli", "serve"]
    if held is None:
        return command
    fd = held.fileno()
    wrapper = (
        f"import os, sys; {fd} == 3 or (os.dup2({fd}, 3), os.close({fd})); "
        "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid())); os.execv(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", wrapper, *command]


def start_serve(env: dict[str, str], log: Path, held: socket.socket | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            serve_command(held),
            env=env,
            stdout=out,
            stderr=out,
            pass_fds=(held.fileno(),) if held is not None else (),
        )


def wait_ready(url: str, timeout: float = 30) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not become ready")


def environment(db: Path, port: int, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "TOPIC_AUDIT_SDKAPPID": APP_ID,
        "TOPIC_AUDIT_TOKEN": TOKEN,
        "TOPIC_AUDIT_DB": str(db),
        "TOPIC_AUDIT_PORT": str(port),
        **extra,
    }


def _row(name: str, rate: float, seconds: float, restart: Restart | None, held: bool) -> str:
    with tempfile.TemporaryDirectory(prefix="restarts-") as folder:
        db, log = Path(folder) / "audit.db", Path(folder) / "serve.log"
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(2048)
        port = sock.getsockname()[1]
        if not held:
            sock.close()
        env = environment(db, port)
        process = start_serve(env, log, sock if held else None)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        load = Load(url, rate)
        thread = load.start()
        time.sleep(seconds / 3)
        if restart is not None:
            process = restart(process, env, log, sock if held else None)
        time.sleep(seconds * 2 / 3)
        load.stop(thread)
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
        sock.close()
        verified = subprocess.run(
            [sys.executable, "-m", "topic_audit.cli", "verify", "--db", str(db)], capture_output=True
        ).returncode
        missing = load.missing_from(db)
        return (
            f"| {name} | {rate:g} | {len(load.results)} | {len(load.failed)} | {load.slowest * 1000:.0f} "
            f"| {len(missing)} | {'ok' if verified == 0 and code == 0 else 'FAILED'} |"
        )


Restart = Callable[
    [subprocess.Popen[bytes], dict[str, str], Path, socket.socket | None], subprocess.Popen[bytes]
]


def reload_twice(process: subprocess.Popen[bytes], *_: object) -> subprocess.Popen[bytes]:
    for _ in range(2):
        process.send_signal(signal.SIGHUP)
        time.sleep(2.5)
    return process


def stop_and_start(
    process: subprocess.Popen[bytes], env: dict[str, str], log: Path, held: socket.socket | None
) -> subprocess.Popen[bytes]:
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
    return start_serve(env, log, held)


def main() -> None:
    rates = [float(r) for r in os.environ.get("RESTARTS_RATES", "200,1000").split(",")]
    seconds = float(os.environ.get("RESTARTS_SECONDS", "12"))
    print(
        "| restart | callbacks/s | sent | refused or failed | slowest answer (ms) | answered, not in log | exit 0, verify |"
    )
    print("|---|---|---|---|---|---|---|")
    for rate in rates:
        print(_row("none (baseline)", rate, seconds, None, held=False), flush=True)
        print(_row("kill -HUP, twice", rate, seconds, reload_twice, held=False), flush=True)
        print(
            _row("SIGTERM + start, socket activation", rate, seconds, stop_and_start, held=True), flush=True
        )


if __name__ == "__main__":
    main()
