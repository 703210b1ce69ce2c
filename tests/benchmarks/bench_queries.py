"""Time every canned query, every dashboard chart query, the main table pages and the auditor's screens
(the HTML pages; beside each, the same page with Datasette's own templates, in the same run) through
Datasette on a large log (in process, the same settings as `topic-audit explore`, including its 1 s SQL
time limit).

Usage: python -m tests.benchmarks.bench_queries DB   (make one with: python -m tests.benchmarks.logs DB 1000000 30)
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from topic_audit.auditor import explore


def chart_sql(sql: str, filters: dict[str, str]) -> tuple[str, dict[str, str]]:
    """What datasette-dashboards runs: ``[[ … ]]`` blocks kept when their parameters are set."""

    def block(match: re.Match[str]) -> str:
        names = re.findall(r":(\w+)", match.group(1))
        return match.group(1) if all(filters.get(n) for n in names) else ""

    final = re.sub(r"\[\[(.*?)\]\]", block, sql, flags=re.DOTALL)
    return final, {k: v for k, v in filters.items() if f":{k}" in final}


def cases(db: Path) -> list[tuple[str, str, dict[str, str]]]:
    conn = sqlite3.connect(db)
    topic, group = conn.execute(
        "SELECT topic_id, group_id FROM topics WHERE created_at IS NOT NULL ORDER BY rowid DESC LIMIT 1"
    ).fetchone()
    last = conn.execute("SELECT max(received_at) FROM audit_log").fetchone()[0][:10]
    entry = conn.execute("SELECT max(id) / 2 FROM audit_log").fetchone()[0]  # one callback, mid-log
    conn.close()
    week = {"from": _days_before(last, 7), "to": "9999"}
    params = {"topic_id": topic, "group_id": group, "id": "123456", **week}
    metadata = explore.load_metadata()
    out: list[tuple[str, str, dict[str, str]]] = []
    for name, query in metadata["databases"]["audit"]["queries"].items():
        out.append(
            (
                f"query {name}",
                f"/audit/{name}.json",
                {k: v for k, v in params.items() if f":{k}" in query["sql"]},
            )
        )
    charts = metadata["plugins"]["datasette-dashboards"]["callbacks"]["charts"]
    for label, filters in (
        ("all time", {}),
        ("last 7 days", {"date_start": _days_before(last, 7), "date_end": last}),
    ):
        for name, chart in charts.items():
            sql, p = chart_sql(chart["query"], filters)
            out.append((f"chart {name} ({label})", "/audit.json", {"sql": sql, **p}))
    out += [
        ("page audit_log (facets)", "/audit/audit_log.json", {"_size": "50"}),
        ("page topics", "/audit/topics.json", {"_size": "50"}),
        (
            "search bodies, a rare word (one topic id)",
            "/audit/audit_log.json",
            {"_search": f'"{topic}"', "_size": "50"},
        ),
        (
            "search bodies, a word in 30% of them",
            "/audit/audit_log.json",
            {"_search": "renamed", "_size": "50"},
        ),
        (
            "search topic names, a word in half of them",
            "/audit/topics.json",
            {"_search": "renamed", "_size": "50"},
        ),
        (
            "search topic names, a word in all of them",
            "/audit/topics.json",
            {"_search": "topic", "_size": "50"},
        ),
        ("rejected, by facet", "/audit/audit_log.json", {"outcome": "rejected", "_size": "50"}),
        (
            "page audit_log filtered by one group",
            "/audit/audit_log.json",
            {"group_id": group, "_size": "50"},
        ),
        # the auditor's screens as a browser gets them (templates, and the plugin's queries for a callback)
        ("screen: the list audit_log (HTML, key columns)", "/audit/audit_log", {}),
        ("screen: the list audit_log (HTML, all columns)", "/audit/audit_log", {"_columns": "all"}),
        ("screen: the list topics (HTML)", "/audit/topics", {}),
        ("screen: the list deliveries (HTML)", "/audit/deliveries", {}),
        ("screen: one callback (HTML)", f"/audit/audit_log/{entry}", {}),
    ]
    return out


def _days_before(day: str, days: int) -> str:
    from datetime import date, timedelta

    return (date.fromisoformat(day) - timedelta(days=days)).isoformat()


async def measure(ds: Any, path: str, params: dict[str, str], runs: int = 3) -> tuple[float, int, str]:
    times, status, note = [], 0, ""
    for _ in range(runs):
        started = time.perf_counter()
        json = path.endswith(".json")
        response = await ds.client.get(path, params={**params, "_shape": "objects"} if json else params)
        times.append(time.perf_counter() - started)
        status = response.status_code
        if status != 200:
            note = response.json().get("error", "")[:60] if json else response.text[:60]
    return statistics.median(times), status, note


async def main(db: Path) -> None:
    ds = explore.make_datasette(db)
    await ds.invoke_startup()
    rows = sqlite3.connect(db).execute("SELECT count(*) FROM audit_log").fetchone()[0]
    print(f"{rows} log entries in {db}; median of 3 runs, through Datasette (1 s SQL time limit)\n")
    print(f"| {'what':<52} | ms | status |")
    print(f"|{'-' * 54}|---:|---|")
    slow = 0
    for label, path, params in cases(db):
        seconds, status, note = await measure(ds, path, params)
        slow += seconds >= 0.1
        print(f"| {label:<52} | {seconds * 1000:.0f} | {status} {note} |")
    print(f"\n{slow} of {len(cases(db))} at or over 100 ms")
    await compare_screens(db, [c for c in cases(db) if c[0].startswith("screen:")])


async def compare_screens(db: Path, screens: list[tuple[str, str, dict[str, str]]]) -> None:
    """Our screens beside the same pages as Datasette's own templates render them (the metadata alone)."""
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(explore.DASHBOARD / "metadata.yml", folder)
        (Path(folder) / "templates").mkdir()
        stock = explore.make_datasette(db, directory=Path(folder))
        ours = explore.make_datasette(db)
        for ds in (stock, ours):
            await ds.invoke_startup()
        print(f"\n| {'screen (HTML)':<52} | ms, ours | ms, Datasette's own templates | status |")
        print(f"|{'-' * 54}|---:|---:|---|")
        for label, path, params in screens:
            (mine, status, _), (theirs, _, _) = [await measure(ds, path, params) for ds in (ours, stock)]
            print(
                f"| {label.removeprefix('screen: '):<52} | {mine * 1000:.0f} | {theirs * 1000:.0f} | {status} |"
            )


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
