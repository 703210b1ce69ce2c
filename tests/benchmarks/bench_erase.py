"""How long erasing one data subject takes on a large log, phase by phase, and what it reclaims.

    python -m tests.benchmarks.bench_erase LOG [--copy]

LOG is a generated log (``python -m tests.benchmarks.logs LOG 1000000 30``). A subject's callbacks are
appended to it (40 messages and topic events naming one account), indexed, then erased the way
``topic-audit erase --account`` does, each phase timed: finding the entries (one pass over the bodies),
the erasure records (one transaction per 500 entries), and the purge (merging the full-text indexes,
zeroing free pages, truncating the WAL). Then both full-text indexes are rebuilt beside the ones in
use, the way a purge does once their structure grew too long (:mod:`topic_audit.log.reindex`): the steps
and the longest any held the write lock, against rebuilding in place in one transaction. Prints the
tables quoted in docs/performance.md.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from topic_audit import clock
from topic_audit.log import reindex, search
from topic_audit.log.database import connect
from topic_audit.privacy import erasure, purge, subjects
from topic_audit.receiver.app import build_row
from topic_audit.settings import Settings
from topic_audit.tencent import checks, models, samples
from topic_audit.writer import append

SUBJECT = "bench_subject_7"
APP_ID, TOKEN = "1400000001", "bench-token"


def _subject_rows(count: int) -> list[append.Append]:
    settings = Settings(sdk_app_id=APP_ID, token=TOKEN)
    out = []
    for i in range(count):
        if i % 2:
            body = {
                "CallbackCommand": "Group.CallbackAfterSendMsg",
                "GroupId": "@TGS#_bench",
                "From_Account": SUBJECT,
                "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": f"private note {i}"}}],
            }
        else:
            body = samples.sample(
                "after-create",
                TopicId=f"@TGS#_bench@TOPIC#_{i}",
                Operator_Account=SUBJECT,
                Owner_Account=SUBJECT,
            )
        raw = json.dumps(body).encode()
        query = samples.query(APP_ID, body["CallbackCommand"], TOKEN) + "&ClientIP=203.0.113.9"
        request = checks.RawRequest("POST", "/callback", query, {}, raw, "127.0.0.1")
        decision = checks.decide(request, settings, time.time())
        answer = models.answer_body(decision.status_code, decision.reason, decision.detail)
        out.append(append.Append(build_row(request, decision, time.time(), 0.001, answer), decision.event))
    return out


def sizes(db: Path) -> dict[str, int]:
    return {
        s or "db": Path(f"{db}{s}").stat().st_size if Path(f"{db}{s}").exists() else 0 for s in ("", "-wal")
    }


def main(db: Path) -> None:
    conn = connect(db)
    append.commit(conn, _subject_rows(40))
    search.index_everything(conn)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    total = conn.execute("SELECT count(*) FROM audit_log").fetchone()[0]
    conn.close()
    before = sizes(db)
    conn = purge.connect(db)
    started = time.perf_counter()
    ids = list(subjects.select(conn, subjects.Selector("account", SUBJECT)))
    found = time.perf_counter()
    records = []
    for start in range(0, len(ids), erasure.BATCH):
        batch = erasure.erase_batch(
            conn, ids[start : start + erasure.BATCH], "request", "bench", None, clock.now()
        )
        assert batch is not None
        records.append(batch)
    erased = time.perf_counter()
    free_before = conn.execute("PRAGMA freelist_count").fetchone()[0]
    purge.purge(conn, merge=any(r.indexed for r in records))
    purged = time.perf_counter()
    free_after = conn.execute("PRAGMA freelist_count").fetchone()[0]
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    after = sizes(db)
    print(f"log of {total:,} entries; erase --account: {len(ids)} entries in {len(records)} records")
    print("| phase | seconds |\n|---|---:|")
    print(f"| find the entries (one pass over the bodies) | {found - started:.2f} |")
    print(f"| erase (records, content, indexes, projection) | {erased - found:.2f} |")
    print(
        f"| purge (merge the full-text indexes, zero free pages, truncate the WAL) | {purged - erased:.2f} |"
    )
    print(f"| total | {purged - started:.2f} |")
    print(
        f"files before: db {before['db']:,} B, wal {before['-wal']:,} B; after: db {after['db']:,} B, "
        f"wal {after['-wal']:,} B; free pages {free_before:,} -> {free_after:,} ({page} B each, zeroed)"
    )


def rebuilds(db: Path) -> None:
    """Each index rebuilt beside itself, step by step, then in place (the same index, the same run)."""
    conn = purge.connect(db)
    print("| index | steps | total s | median step ms | longest step ms | in place, one transaction s |")
    print("|---|---:|---:|---:|---:|---:|")
    for index in purge.INDEXES:
        steps = []
        started = time.perf_counter()
        while True:
            at = time.perf_counter()
            done = reindex.step(conn, index, most_levels=0)
            steps.append(time.perf_counter() - at)
            if done:
                break
        total = time.perf_counter() - started
        at = time.perf_counter()
        conn.execute(f"INSERT INTO {index} ({index}) VALUES ('rebuild')")
        in_place = time.perf_counter() - at
        steps.sort()
        print(
            f"| {index} | {len(steps)} | {total:.2f} | {steps[len(steps) // 2] * 1000:.1f} | "
            f"{steps[-1] * 1000:.1f} | {in_place:.2f} |"
        )
    conn.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    rebuilds(Path(sys.argv[1]))
