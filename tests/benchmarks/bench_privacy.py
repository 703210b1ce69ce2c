"""Retention's cost to the answers, and what the body policy saves: figures with a same-run baseline.

    python -m tests.benchmarks.bench_privacy

1. Answers at ~200/s (4 connections) for 20 s against ``serve`` on a log of 30,000 entries received over
   the last 3 days, with ``TOPIC_AUDIT_RETENTION_DAYS=1`` (its first run erases two thirds of the log
   while the load runs) and, in the same run, without retention: p50, p99, max, failed answers.
2. Bytes per callback for a message-heavy mix (9 message callbacks to 1 topic event) with
   ``TOPIC_AUDIT_STORE_BODIES=all`` and ``topics``.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conftest import APP_ID, TOKEN, Server
from topic_audit.demo import load
from topic_audit.tencent import samples

from benchmarks.logs import generate_log


def erased(db: Path) -> int:
    conn = sqlite3.connect(db, timeout=5)
    try:
        return int(conn.execute("SELECT count(*) FROM erased_entries").fetchone()[0])
    finally:
        conn.close()


def paced(server: Server, seconds: float) -> load.Report:
    return load.run_blocking(
        url=f"{server.url}/callback",
        sdk_app_id=APP_ID,
        token=TOKEN,
        rate=200,
        duration=seconds,
        concurrency=4,
        mix=load.parse_mix("good=1"),
    )


def retention_round(folder: Path, days: str | None) -> tuple[load.Report, int]:
    db = folder / "audit.db"
    generate_log(db, 30_000, seed=5, span_days=3)
    env = {"TOPIC_AUDIT_RETENTION_DAYS": days} if days else {}
    server = Server(db, folder / "server.log", env).start()
    try:
        report = paced(server, 20)
    finally:
        server.stop()
    return report, erased(db)


def bytes_per_callback(folder: Path, policy: str, count: int = 3000) -> float:
    db = folder / "audit.db"
    server = Server(db, folder / "server.log", {"TOPIC_AUDIT_STORE_BODIES": policy}).start()
    text = "a message of ordinary length, about as long as people write in a group chat " * 2
    try:
        with httpx.Client(timeout=5) as client:
            for i in range(count):
                if i % 10:
                    body = {
                        "CallbackCommand": "Group.CallbackAfterSendMsg",
                        "GroupId": "@TGS#_b",
                        "From_Account": f"user{i % 97}",
                        "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": f"{text} {i}"}}],
                    }
                else:
                    body = samples.sample("after-create", TopicId=f"@TGS#_b@TOPIC#_{i}")
                query = samples.query(APP_ID, body["CallbackCommand"], TOKEN)
                client.post(f"{server.url}/callback?{query}", content=json.dumps(body))
    finally:
        server.stop()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    pages, size = (
        conn.execute("PRAGMA page_count").fetchone()[0],
        conn.execute("PRAGMA page_size").fetchone()[0],
    )
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    conn.close()
    return (pages - free) * size / count


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rounds = {}
        for name, days in (
            ("without retention", None),
            ("retention 1 day", "1"),
            ("without retention ", None),
        ):
            folder = Path(tmp) / name.strip().replace(" ", "-") / str(len(rounds))
            folder.mkdir(parents=True)
            rounds[name] = retention_round(folder, days)
        print(
            "\n| ~200/s, 4 connections, 20 s | answers | failed | p50 ms | p99 ms | max ms | entries erased meanwhile |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, (r, gone) in rounds.items():
            failed = sum(n for code, n in r.statuses.items() if code != 200) + r.errors
            print(
                f"| {name.strip()} | {r.sent} | {failed} | {r.percentile(50) * 1000:.2f} | "
                f"{r.percentile(99) * 1000:.2f} | {max(r.latencies) * 1000:.1f} | {gone} |"
            )
        sizes = {}
        for policy in ("all", "topics"):
            folder = Path(tmp) / f"bodies-{policy}"
            folder.mkdir()
            sizes[policy] = bytes_per_callback(folder, policy)
        print("\n| message-heavy mix (9 messages : 1 topic event), 3,000 callbacks | bytes per callback |")
        print("|---|---:|")
        for policy, value in sizes.items():
            print(f"| TOPIC_AUDIT_STORE_BODIES={policy} | {value:,.0f} |")


if __name__ == "__main__":
    main()
