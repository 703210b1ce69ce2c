"""Crash safety: the real ``serve`` process is killed with SIGKILL at random moments under concurrent
load and restarted on the same file; every request answered OK is in the log and the projection, and
``verify`` (chain, checkpoints, projection) passes. TOPIC_AUDIT_CRASH_ROUNDS sets the rounds (10)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from conftest import APP_ID, TOKEN, Server, run_cli
from topic_audit.tencent import samples

OK = {"ActionStatus": "OK", "ErrorInfo": "", "ErrorCode": 0}


def load_until(url: str, prefix: str, acknowledged: set[str], stop: threading.Event) -> int:
    """Post unique creates from 16 connections until ``stop``; record the TopicIds answered OK."""
    sent = 0

    async def worker(client: httpx.AsyncClient, n: int) -> None:
        nonlocal sent
        serial = 0
        while not stop.is_set():
            serial += 1
            topic = f"{prefix}-{n}-{serial}"
            body = samples.sample("after-create", TopicId=topic)
            query = samples.query(APP_ID, body["CallbackCommand"], TOKEN)
            try:
                response = await client.post(f"{url}/callback?{query}", json=body)
            except httpx.HTTPError:
                await asyncio.sleep(0.01)
                continue
            sent += 1
            if response.status_code == 200 and response.json() == OK:
                acknowledged.add(topic)

    async def main() -> None:
        async with httpx.AsyncClient(timeout=5, limits=httpx.Limits(max_connections=16)) as client:
            await asyncio.gather(*(worker(client, n) for n in range(16)))

    asyncio.run(main())
    return sent


def test_sigkill_under_load_loses_nothing_acknowledged(db_path: Path, tmp_path: Path, capsys: object) -> None:
    rounds = int(os.environ.get("TOPIC_AUDIT_CRASH_ROUNDS", "10"))
    rng = random.Random(20261125)
    acknowledged: set[str] = set()
    sent = 0
    for round_ in range(rounds):
        server = Server(db_path, tmp_path / "server.log", env={"TOPIC_AUDIT_CHECKPOINT_SECONDS": "1"}).start()
        stop = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            load = pool.submit(load_until, server.url, f"r{round_}", acknowledged, stop)
            time.sleep(rng.uniform(0.2, 1.2))
            assert server.process is not None
            server.process.send_signal(signal.SIGKILL)
            server.process.wait(timeout=10)
            stop.set()
            sent += load.result(timeout=30)
    Server(db_path, tmp_path / "server.log").start().stop()  # opens cleanly after the last crash

    conn = sqlite3.connect(db_path)
    logged = {r[0] for r in conn.execute("SELECT topic_id FROM audit_log WHERE outcome = 'accepted'")}
    projected = {r[0] for r in conn.execute("SELECT topic_id FROM topics")}
    entries = conn.execute("SELECT count(*) FROM audit_log").fetchone()[0]
    conn.close()
    assert acknowledged, "no request was acknowledged: the test proves nothing"
    assert acknowledged - logged == set(), "acknowledged requests missing from the log"
    assert acknowledged - projected == set(), "acknowledged requests missing from the projection"
    result = run_cli("verify", "--db", str(db_path))
    assert result.returncode == 0, result.stdout
    with capsys.disabled():  # type: ignore[attr-defined]
        print(
            f"\n{rounds} SIGKILL rounds: {sent} requests sent, {len(acknowledged)} acknowledged, all found; "
            f"{entries} log entries, verify OK"
        )
