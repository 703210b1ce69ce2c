"""The performance targets, each beside its baseline measured in the same run (`make bench`'s first
section; alone: `BENCH_ONLY=targets make bench`).

- The writer: the writer process fed over its socket by a synthetic producer (as the receivers feed
  it), against SQLite taking the very rows it stored INSERTed alone, with no secondary index
  (:mod:`tests.benchmarks.bench_ceiling`'s floor), alternating ROUNDS times; its CPU a row beside it.
- HTTP at 32 connections and at a steady ~200/s: ``serve`` against the bare endpoint, rotating the order
  each round.
- Forwarding on (to a bare endpoint as the destination) against the bare endpoint alone, at 32
  connections; how long the outbox took to drain after the load.

The cold start has its own table (:mod:`tests.benchmarks.bench_start`, `BENCH_ONLY=start`).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from tests.benchmarks import bench, bench_ceiling
from tests.benchmarks.logs import decided

STEADY_LABEL = "~200/s (4 connections, 20 ms apart)"


def targets_benchmark(folder: Path) -> list[str]:
    rounds = int(bench.setting("ROUNDS", "2"))
    rows: list[tuple[str, str, str, str, str]] = []
    rows += _writer(folder, rounds)
    rows += _http(folder, rounds)
    rows += _forwarding(folder, rounds)
    lines = [
        "| target | goal | measured | same-run baseline | met |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return lines


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _writer(folder: Path, rounds: int) -> list[tuple[str, str, str, str, str]]:
    count = int(bench.setting("WRITER_ROWS", "20000"))
    items = decided(count, 5)
    _, stored = bench_ceiling.appended(folder, items)  # the rows the floor INSERTs alone
    floor, writer, cpu = [], [], []
    for round_ in range(rounds):
        for which in ("floor", "writer")[round_ % 2 :] + ("floor", "writer")[: round_ % 2]:
            if which == "floor":
                floor.append(bench_ceiling.inserted(folder, stored, indexes=False))
            else:
                rate, per_row, _ = bench.writer_process_rate(folder, items)
                writer.append(rate)
                cpu.append(per_row)
    ratio = statistics.median(writer) / statistics.median(floor)
    return [
        (
            "the writer process fed over its socket ÷ SQLite's rows alone, no secondary index",
            "≥ 0.40",
            f"{ratio:.2f} ({statistics.median(writer):,.0f} rows/s, "
            f"{statistics.median(cpu):.0f} µs of its CPU a row)",
            f"{statistics.median(floor):,.0f} rows/s (groups of {bench_ceiling.GROUP}, synchronous=FULL)",
            _met(ratio >= 0.4),
        )
    ]


def _http(folder: Path, rounds: int) -> list[tuple[str, str, str, str, str]]:
    seconds = int(bench.setting("SECONDS", "10"))
    targets = {"bare": bench.bare(), "audited": bench.serve(folder / "targets-http.db")}
    runs: dict[tuple[int, int, str], list[dict[str, float]]] = {}
    loads = ((32, 0), bench.STEADY)
    try:
        for connections, delay in loads:
            for round_ in range(rounds):
                names = ["bare", "audited"][round_ % 2 :] + ["bare", "audited"][: round_ % 2]
                for name in names:
                    time.sleep(bench.SETTLE_SECONDS)
                    found = bench.wrk(targets[name].url, connections, seconds, delay)
                    runs.setdefault((connections, delay, name), []).append(found)
    finally:
        for process in targets.values():
            process.stop()

    def mean(connections: int, delay: int, name: str, key: str) -> float:
        return statistics.mean(r[key] for r in runs[connections, delay, name])

    rps = mean(32, 0, "audited", "rps") / mean(32, 0, "bare", "rps")
    p99 = mean(32, 0, "audited", "p99") / mean(32, 0, "bare", "p99")
    steady = bench.STEADY
    p50_more = mean(*steady, "audited", "p50") - mean(*steady, "bare", "p50")
    p99_more = mean(*steady, "audited", "p99") - mean(*steady, "bare", "p99")
    bare32 = f"{mean(32, 0, 'bare', 'rps'):,.0f} req/s, p99 {mean(32, 0, 'bare', 'p99'):.2f} ms"
    bare_steady = f"p50 {mean(*steady, 'bare', 'p50'):.2f} ms, p99 {mean(*steady, 'bare', 'p99'):.2f} ms"
    return [
        (
            "HTTP at 32 connections: audited ÷ bare",
            "≥ 0.65",
            f"{rps:.2f} ({mean(32, 0, 'audited', 'rps'):,.0f} req/s)",
            bare32,
            _met(rps >= 0.65),
        ),
        (
            "HTTP at 32 connections: p99 ÷ bare's",
            "≤ 2 times",
            f"{p99:.1f} times ({mean(32, 0, 'audited', 'p99'):.2f} ms)",
            bare32,
            _met(p99 <= 2),
        ),
        (
            f"{STEADY_LABEL}: median minus bare's",
            "≤ +2 ms",
            f"+{p50_more:.2f} ms ({mean(*steady, 'audited', 'p50'):.2f} ms)",
            bare_steady,
            _met(p50_more <= 2),
        ),
        (
            f"{STEADY_LABEL}: p99 minus bare's",
            "≤ +5 ms",
            f"+{p99_more:.2f} ms ({mean(*steady, 'audited', 'p99'):.2f} ms)",
            bare_steady,
            _met(p99_more <= 5),
        ),
    ]


def _forwarding(folder: Path, rounds: int) -> list[tuple[str, str, str, str, str]]:
    seconds = int(bench.setting("SECONDS", "10"))
    destination, reference = bench.bare(), bench.bare()
    target = destination.url.replace("/healthz", "/callback")
    alone: list[dict[str, float]] = []
    on: list[dict[str, float]] = []
    try:
        for round_ in range(rounds):
            for which in ("alone", "on")[round_ % 2 :] + ("alone", "on")[: round_ % 2]:
                time.sleep(bench.SETTLE_SECONDS)
                if which == "alone":
                    alone.append(bench.wrk(reference.url, 32, seconds))
                    continue
                db = folder / f"targets-forward-{round_}.db"
                process = bench.serve(db, TOPIC_AUDIT_FORWARD_URL=target)
                try:
                    found = bench.wrk(process.url, 32, seconds)
                    found |= bench.drain(db, seconds)
                finally:
                    process.stop()
                on.append(found)
    finally:
        destination.stop()
        reference.stop()
    rps = statistics.mean(r["rps"] for r in on) / statistics.mean(r["rps"] for r in alone)
    p99 = statistics.mean(r["p99"] for r in on) / statistics.mean(r["p99"] for r in alone)
    drained = max(r["drain"] for r in on)
    baseline = (
        f"{statistics.mean(r['rps'] for r in alone):,.0f} req/s, "
        f"p99 {statistics.mean(r['p99'] for r in alone):.2f} ms"
    )
    return [
        (
            "forwarding on, 32 connections: ÷ bare",
            "≥ 0.40",
            f"{rps:.2f} ({statistics.mean(r['rps'] for r in on):,.0f} req/s)",
            baseline,
            _met(rps >= 0.4),
        ),
        (
            "forwarding on, 32 connections: p99 ÷ bare's",
            "≤ 3 times",
            f"{p99:.1f} times ({statistics.mean(r['p99'] for r in on):.2f} ms)",
            baseline,
            _met(p99 <= 3),
        ),
        (
            "forwarding on: the outbox drained after the load",
            "≤ 2 s",
            f"{drained:.1f} s (the longest of {rounds})",
            "—",
            _met(drained <= 2),
        ),
    ]
