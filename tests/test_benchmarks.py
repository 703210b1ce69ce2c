"""Smoke runs of the benchmarks with tiny numbers, so that they cannot rot (the figures mean nothing)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
from benchmarks.bench_cluster import needs_nats
from benchmarks.logs import generate_log
from conftest import ROOT, require_tool

pytestmark = pytest.mark.slow


def smoke(
    argv: tuple[str, ...] | str, env: Mapping[str, str], timeout: int
) -> subprocess.CompletedProcess[str]:
    """``python -m <argv>`` from the repository's root; it must exit 0."""
    args = (argv,) if isinstance(argv, str) else argv
    result = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_bench_suite_smoke() -> None:
    require_tool("wrk")
    env = {
        **os.environ,
        "BENCH_SECONDS": "1",
        "BENCH_ROUNDS": "1",
        "BENCH_CONNECTIONS": "1,4",
        "BENCH_WRITER_ROWS": "200",
        "BENCH_DELIVERIES": "300",
        "BENCH_LOG_ROWS": "500",
        "BENCH_BEFORE_REQUESTS": "40",
        "BENCH_RPO_RUNS": "1",
        "BENCH_SETTLE": "0",
        "BENCH_GROWN_ROWS": "300",
        "BENCH_BEFORE": "HEAD",  # an earlier version measured in the same run (here: this one again)
        # every section but the cold start's (its own smoke run below)
        "BENCH_ONLY": "targets,http,servers,grown,writer,memory,log,forward,replica",
    }
    result = smoke("tests.benchmarks.bench", env, 600)
    out = result.stdout
    for heading in (
        "The targets, each beside its same-run baseline",
        "audited vs bare",
        "before/bare",
        "A grown log",
        "Database size",
        "The writer alone",
        "Memory",
        "verify and rebuild",
        "Forwarding",
        "The off-box copy",
    ):
        assert heading in out, out
    assert "Every answered request committed" in out and "(OK)" in out, out
    memory = re.findall(r"^  (.+?): [\d.]+ → [\d.]+ MiB", out, re.M)
    assert {"receiver_process", "writer_process", "serve (the supervisor)", "all"} <= set(memory), out
    targets = re.findall(
        r"^\| (.+?) \| (≥|≤)[^|]* \| ([\d.+]+)[^|]* \| [^|]+ \| (yes|\*\*no\*\*) \|$", out, re.M
    )
    assert len(targets) == 8, out  # the writer, four of HTTP, three of forwarding: each measured, each judged
    assert "| 64 |" in out and "| `verify` (chain" in out and "projection emptied first, all cores |" in out
    assert (
        "Throughput with forwarding on ÷ off" in out and "Before-callbacks, the app answering in 50 ms" in out
    )


def test_query_benchmark_smoke(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    generate_log(db, 300, span_days=3)
    result = smoke(("tests.benchmarks.bench_queries", str(db)), os.environ, 300)
    assert "query topic_history" in result.stdout and "chart latency" in result.stdout
    assert "| 500" not in result.stdout  # every query answered 200


@needs_nats
def test_cluster_bench_smoke() -> None:
    require_tool("wrk")
    env = {
        **os.environ,
        "BENCH_SECONDS": "1",
        "BENCH_ROUNDS": "1",
        "BENCH_WRITER_ROWS": "300",
        "BENCH_SETTLE": "0",
    }
    result = smoke("tests.benchmarks.bench_cluster", env, 300)
    out = result.stdout
    for figure in ("~200/s", "flat out, 32 connections"):
        for what in ("answers/s", "p50 ms", "p99 ms"):
            assert re.search(
                rf"^\| {re.escape(figure)}.*: {what} \| [\d,.]+ \| [\d,.]+ \| [\d.]+ \|$", out, re.M
            ), out
        assert re.search(rf"^\| {re.escape(figure)}.*: non-2xx \| 0 \| 0 \| \|$", out, re.M), out  # all 200s
    assert re.search(r"^\| the writer's rows/s .* \| [\d,]+ \| [\d,]+ \| [\d.]+ \|$", out, re.M), out
    assert out.count("(OK)") == 2 and "300 rows applied" in out and "### Where it goes" in out, out


def test_ceiling_benchmark_smoke() -> None:
    env = {**os.environ, "CEILING_ROWS": "600", "CEILING_ROUNDS": "1"}
    result = smoke("tests.benchmarks.bench_ceiling", env, 300)
    out = result.stdout
    assert re.search(r"^\| its rows alone, no secondary index \| [\d,]+ \| [\d.]+ \|$", out, re.M), out
    steps = re.findall(r"^\| [a-z][^|]* \| ([\d.]+) \|$", out, re.M)
    assert len(steps) == 5 and all(float(s) > 0 for s in steps), out  # every step measured
    assert re.search(r"^\| \*\*left for everything else\*\* .* \| \*\*-?[\d.]+\*\* \|$", out, re.M), out


def test_start_benchmark_smoke() -> None:
    require_tool("wrk")
    env = {**os.environ, "BENCH_ONLY": "start", "BENCH_START_RUNS": "1", "BENCH_START_ROWS": "300"}
    result = smoke("tests.benchmarks.bench", env, 600)
    out = result.stdout
    for target in ("bare endpoint (same-run baseline)", "`serve`, empty log", "`serve`, 300-entry log"):
        assert re.search(rf"^\| {re.escape(target)} \| [\d.]+ / [\d.]+ \| (yes|no) \| 0 \|$", out, re.M), out
    assert re.search(
        r"^\| SIGTERM \+ start \| [\d.]+ / [\d.]+ \| [\d.]+ \| \d+ \| 0 \| (yes|no) \|$", out, re.M
    ), out
