"""Generate a realistic audit log of any size, through the same checks, rows and writer path as serving.

The mix: topic lifecycles (create, a few info changes, some destroys), redeliveries, group callbacks,
and rejections (bad signatures, malformed bodies), in proportions a busy app would see.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

from topic_audit.log import search
from topic_audit.log.migrations import migrate
from topic_audit.receiver.app import build_row
from topic_audit.settings import Settings
from topic_audit.tencent import checks, models, samples
from topic_audit.writer import thread

APP_ID = "1400000000"
TOKEN = "bench-token"


def _request(body: bytes, query: str) -> checks.RawRequest:
    return checks.RawRequest(
        method="POST",
        path="/callback",
        query_string=query,
        headers=(
            ("host", "127.0.0.1:8000"),
            ("content-type", "application/json"),
            ("user-agent", "tencent-im"),
        ),
        body=body,
        remote_addr="203.0.113.10",
        declared_length=len(body),
    )


def _bodies(rng: random.Random, n: int) -> list[tuple[bytes, str]]:
    out: list[tuple[bytes, str]] = []
    topics: list[str] = []
    last: tuple[bytes, str] | None = None
    now = time.time()
    for i in range(n):
        roll = rng.random()
        group = f"@TGS#_g{rng.randrange(500)}"
        if roll < 0.30 or not topics:
            topic = f"{group}@TOPIC#_t{i}"
            topics.append(topic)
            body = samples.sample("after-create", GroupId=group, TopicId=topic, Name=f"topic {i}")
        elif roll < 0.60:
            body = samples.sample(
                "info-changed", GroupId=group, TopicId=rng.choice(topics), Name=f"renamed {i}"
            )
        elif roll < 0.68:
            body = samples.sample("destroyed", GroupId=group, TopicIdList=[rng.choice(topics)])
        elif roll < 0.75:
            body = samples.sample("before-create", Name=f"proposed {i}")
        elif roll < 0.85:
            body = samples.sample("group-created", GroupId=group)
        elif roll < 0.92 and last is not None:
            out.append(last)  # a redelivery of the previous callback
            continue
        elif roll < 0.96:
            raw = b'{"CallbackCommand": "Group.CallbackAfterCreateTopic", "GroupId": '
            out.append((raw, samples.query(APP_ID, models.AFTER_CREATE, TOKEN, now=now)))
            continue
        else:
            body = samples.sample("after-create", TopicId=f"forged{i}")
            out.append(
                (json.dumps(body).encode(), samples.query(APP_ID, models.AFTER_CREATE, "wrong", now=now))
            )
            continue
        raw_body = json.dumps(body, ensure_ascii=False).encode()
        last = (raw_body, samples.query(APP_ID, body["CallbackCommand"], TOKEN, now=now))
        out.append(last)
    return out


def decided(count: int, seed: int = 1) -> list[tuple[dict[str, Any], models.TopicEvent | None]]:
    """``count`` realistic (row, event) pairs, as the receiver would hand them to its writer."""
    settings = Settings(sdk_app_id=APP_ID, token=TOKEN)
    items = []
    for body, query in _bodies(random.Random(seed), count):
        request = _request(body, query)
        decision = checks.decide(request, settings, time.time())
        answer = models.answer_body(decision.status_code, decision.reason, decision.detail)
        items.append((build_row(request, decision, time.time(), 0.0005, answer), decision.event))
    return items


def generate_log(path: Path, rows: int, seed: int = 1, batch: int = 5000, span_days: float = 0) -> float:
    """Append ``rows`` realistic entries to the log at ``path``; returns the seconds it took.

    With ``span_days``, the entries' ``received_at`` are spread evenly over that many days up to now (as a
    long-running service's would be); otherwise they carry the time they were generated.
    """
    migrate(path)
    settings = Settings(sdk_app_id=APP_ID, token=TOKEN, db=path)
    rng = random.Random(seed)
    conn = thread.connect(path)
    conn.execute("PRAGMA synchronous=OFF")  # generation only: durability is not what is measured here
    started = time.perf_counter()
    first = time.time() - span_days * 86400
    step = span_days * 86400 / max(rows, 1)
    try:
        done = 0
        while done < rows:
            size = min(batch, rows - done)
            items = []
            for body, query in _bodies(rng, size):
                request = _request(body, query)
                now = time.time()
                decision = checks.decide(request, settings, now)
                answer = models.answer_body(decision.status_code, decision.reason, decision.detail)
                received = first + (done + len(items)) * step if span_days else now
                elapsed = rng.lognormvariate(-7.6, 0.6)  # ~0.5 ms typical, a long tail
                items.append((build_row(request, decision, received, elapsed, answer), decision.event))
            thread.append_batch(conn, items)
            done += size
        search.index_everything(conn)
    finally:
        conn.close()
    return time.perf_counter() - started


if __name__ == "__main__":
    import sys

    target = Path(sys.argv[1])
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
    days = float(sys.argv[3]) if len(sys.argv) > 3 else 30
    seconds = generate_log(target, count, span_days=days)
    conn = sqlite3.connect(target)
    print(
        f"{count} rows in {seconds:.1f} s; {conn.execute('select count(*) from topics').fetchone()[0]} topics"
    )
