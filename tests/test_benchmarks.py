"""Smoke runs of the benchmarks with tiny numbers, so that they cannot rot (the figures mean nothing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks.logs import generate_log
from conftest import ROOT, require_tool

pytestmark = pytest.mark.slow


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
    }
    result = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.bench"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for heading in (
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
    assert "| 64 |" in out and "| `verify` (chain" in out and "projection emptied first, all cores |" in out
    assert (
        "Throughput with forwarding on ÷ off" in out and "Before-callbacks, the app answering in 50 ms" in out
    )


def test_query_benchmark_smoke(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    generate_log(db, 300, span_days=3)
    result = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.bench_queries", str(db)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "query topic_history" in result.stdout and "chart latency" in result.stdout
    assert "| 500" not in result.stdout  # every query answered 200
