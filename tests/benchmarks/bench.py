"""The benchmark suite (`make bench`): measures in one run and prints a Markdown table.

0. The targets, each beside its baseline from the same run (tests/benchmarks/targets.py), and the cold
   start of `serve` against the bare endpoint's (tests/benchmarks/bench_start.py).
1. HTTP: `topic-audit serve` against a bare Litestar+msgspec endpoint (tests/benchmarks/bare.py), same
   uvicorn settings, same load generator (wrk, every request a unique signed delivery), at 1, 32 and 128
   connections and at a steady ~200/s, alternating ROUNDS times to cancel drift. The headline is
   audited/bare. With BENCH_BEFORE=<git ref>, that version of the receiver runs in the same rounds.
   Then `serve --server/--workers`, and the receiver on an empty log against logs of GROWN_ROWS entries.
2. The writer alone: rows/s at group sizes 1, 8 and 64 (synchronous=FULL, a fresh file).
3. Database bytes per audited callback (the documented after-create sample).
4. Resident memory of `serve` before and after DELIVERIES deliveries.
5. `verify` and `rebuild-projection` on a log of LOG_ROWS entries (BENCH_LOG reuses an existing file).
7. The off-box copy (SeaweedFS as the store): throughput and p99 with the replica off and on, the lag
   under that load, RPO (what a SIGKILL under load loses), RTO (restore + verify of the LOG_ROWS log,
   after its first upload) and the cost of a `watch` round by new entries.
6. Forwarding: the receiver at 32 connections with forwarding off and on (to the bare endpoint as a fast
   local destination), alternating; the outbox's delivery rate against the receiver's; Before-callback
   latency with a destination that answers in 50 ms.

Environment: BENCH_SECONDS (per wrk run, 10), BENCH_ROUNDS (2), BENCH_CONNECTIONS ("1,32,128"),
BENCH_WRITER_ROWS (20000), BENCH_DELIVERIES (1000000), BENCH_LOG_ROWS (1000000), BENCH_LOG,
BENCH_BEFORE_REQUESTS (2000), BENCH_RPO_RUNS (3), BENCH_SETTLE (seconds before each HTTP run, 3),
BENCH_BEFORE (a git ref), BENCH_GROWN_ROWS
("1000000,5000000"), BENCH_GROWN_DIR (where the grown logs are kept; default a temporary folder),
BENCH_ONLY (sections to run, "targets,start,http,servers,grown,writer,memory,log,forward,replica").
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from topic_audit.log.migrations import migrate
from topic_audit.tencent import samples
from topic_audit.writer import thread

HERE = Path(__file__).resolve().parent
APP_ID, TOKEN = "1400000000", "bench-token"
ENV = os.environ


def setting(name: str, default: str) -> str:
    return ENV.get(f"BENCH_{name}", default)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


class Process:
    def __init__(self, args: list[str], env: dict[str, str], url: str) -> None:
        self.process = subprocess.Popen(
            args, env={**ENV, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.url = url
        wait_up(url)

    def memory_kib(self) -> dict[str, dict[str, int]]:
        """Memory of this process and each of its descendants (``serve``'s writer, receivers and delivery
        process), by what each runs, in KiB: ``Pss`` (resident, shared pages divided among their sharers:
        these add up), ``VmRSS`` and ``VmHWM`` (the highest resident so far)."""
        found: dict[str, dict[str, int]] = {}
        pids = [self.process.pid]
        while pids:
            pid = pids.pop()
            try:
                fields = (
                    Path(f"/proc/{pid}/status").read_text() + Path(f"/proc/{pid}/smaps_rollup").read_text()
                )
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except (FileNotFoundError, ProcessLookupError):  # it ended meanwhile
                continue
            for task in Path(f"/proc/{pid}/task").glob("*"):
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that ended
                    pids.extend(int(c) for c in (task / "children").read_text().split())
            name = argv[2].decode().rsplit(".", 1)[-1] if argv[1:2] == [b"-m"] else argv[0].decode()
            name = {"cli": "serve (the supervisor)"}.get(name, name)
            mine = found.setdefault(name, {"Pss": 0, "VmRSS": 0, "VmHWM": 0})
            for line in fields.splitlines():
                key = line.split(":", 1)[0]
                if key in mine:
                    mine[key] += int(line.split()[1])
        return found

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)


def serve(db: Path, code: Path | None = None, **extra: str) -> Process:
    """``topic-audit serve`` on ``db``; with ``code``, the receiver of another checkout (its ``service/``
    first on the path), so that an earlier version is measured in the same run."""
    port = free_port()
    env = {
        **extra,
        "TOPIC_AUDIT_DB": str(db),
        "TOPIC_AUDIT_SDKAPPID": APP_ID,
        "TOPIC_AUDIT_TOKEN": TOKEN,
        "TOPIC_AUDIT_PORT": str(port),
        "TOPIC_AUDIT_LOG_LEVEL": "warning",
    }
    if code is not None:
        env["PYTHONPATH"] = str(code / "service")
    return Process(
        [sys.executable, "-m", "topic_audit.cli", "serve"], env, f"http://127.0.0.1:{port}/healthz"
    )


@contextlib.contextmanager
def checkout(ref: str) -> Iterator[Path | None]:
    """A worktree of ``ref`` (BENCH_BEFORE, e.g. the commit before a change), or None without one."""
    if not ref:
        yield None
        return
    root = HERE.parent.parent
    folder = Path(tempfile.mkdtemp(prefix="bench-before-"))
    subprocess.run(
        ["git", "-C", str(root), "worktree", "add", "--detach", str(folder), ref],
        check=True,
        capture_output=True,
    )
    try:
        yield folder
    finally:
        subprocess.run(
            ["git", "-C", str(root), "worktree", "remove", "--force", str(folder)],
            check=False,
            capture_output=True,
        )


def bare_command(port: int) -> list[str]:
    """The bare endpoint (tests/benchmarks/bare.py) under uvicorn, as the receiver runs: one worker,
    httptools, uvloop, no access log."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "tests.benchmarks.bare:create_app",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
        "--no-server-header",
    ]


def bare() -> Process:
    port = free_port()
    return Process(bare_command(port), {}, f"http://127.0.0.1:{port}/healthz")


def wrk(url: str, connections: int, seconds: int, delay_ms: int = 0) -> dict[str, float]:
    query = samples.query(APP_ID, "Group.CallbackAfterCreateTopic", TOKEN)
    result = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(HERE / "deliveries.lua"),
            url.replace("/healthz", "/callback"),
        ],
        capture_output=True,
        text=True,
        env={**ENV, "QUERY": query, "DELAY_MS": str(delay_ms)},
        timeout=seconds + 60,
    )
    out = result.stdout
    if "Requests/sec" not in out:
        raise RuntimeError(f"wrk failed: {result.stdout} {result.stderr}")

    def latency(p: str) -> float:
        match = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        if not match:
            return float("nan")
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return {
        "rps": rps,
        "p50": latency("50"),
        "p99": latency("99"),
        "errors": int(non_2xx.group(1)) if non_2xx else 0,
        "requests": requests,
    }


SETTLE_SECONDS = float(setting("SETTLE", "3"))
"""Before each run: what the previous target does once its load stops (indexing what it was behind on,
checkpointing the WAL) would otherwise run during the next target's measurement."""
STEADY = (4, 20)
"""Tencent's documented create_topic peak, ~200 callbacks/s: 4 connections, each waiting 20 ms between
requests (wrk's delay), so that latency is measured at a steady rate rather than flat out."""


def http_benchmark(folder: Path, before: Path | None) -> tuple[list[str], Path]:
    """The receiver against the bare endpoint (and, with BENCH_BEFORE, against its earlier version), at
    each connection count and at a steady ~200/s, alternating ROUNDS times to cancel drift."""
    seconds = int(setting("SECONDS", "10"))
    rounds = int(setting("ROUNDS", "2"))
    db = folder / "http.db"
    targets = {"bare": bare(), "after": serve(db)}
    if before is not None:
        targets["before"] = serve(folder / "http-before.db", before)
    names = [n for n in ("bare", "before", "after") if n in targets]
    audited = [n for n in names if n != "bare"]
    head = "| load | " + " | ".join(f"{n} req/s" for n in names) + " | "
    head += " | ".join(f"{n}/bare" for n in audited) + " | "
    head += " | ".join(f"{n} p50 / p99 ms" for n in names) + " | non-2xx |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    answered = 0
    loads = [
        (f"{c} connections", c, 0) for c in (int(c) for c in setting("CONNECTIONS", "1,32,128").split(","))
    ]
    loads.append(("~200/s (4 connections, 20 ms apart)", *STEADY))
    try:
        for label, connections, delay in loads:
            runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
            for round_ in range(rounds):  # alternate to cancel drift, each round in another order
                for n in names[round_ % len(names) :] + names[: round_ % len(names)]:
                    time.sleep(SETTLE_SECONDS)
                    runs[n].append(wrk(targets[n].url, connections, seconds, delay))
            mean = {n: {k: sum(r[k] for r in runs[n]) / rounds for k in ("rps", "p50", "p99")} for n in names}
            errors = sum(int(r["errors"]) for n in audited for r in runs[n])
            answered += sum(int(r["requests"]) - int(r["errors"]) for r in runs["after"])
            cells = [f"{mean[n]['rps']:.0f}" for n in names]
            cells += [f"{mean[n]['rps'] / mean['bare']['rps']:.2f}" for n in audited]
            cells += [f"{mean[n]['p50']:.2f} / {mean[n]['p99']:.2f}" for n in names]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {errors} |")
    finally:
        for process in targets.values():
            process.stop()
    rows = sqlite3.connect(db).execute("SELECT count(*) FROM audit_log").fetchone()[0]
    lines.append(
        f"\nEvery answered request committed: {rows} rows for {answered} answered 2xx "
        f"({'OK' if rows >= answered else 'MISSING ROWS'})."
    )
    return lines, db


def grown_benchmark(folder: Path) -> list[str]:
    """Throughput and p99 at 32 connections on an empty log and on logs of GROWN_ROWS entries (generated
    once into BENCH_GROWN_DIR, kept between runs), alternating ROUNDS times."""
    seconds = int(setting("SECONDS", "10"))
    rounds = int(setting("ROUNDS", "2"))
    sizes = [int(n) for n in setting("GROWN_ROWS", "1000000,5000000").split(",")]
    keep = Path(setting("GROWN_DIR", str(folder)))
    keep.mkdir(parents=True, exist_ok=True)
    from tests.benchmarks.logs import generate_log

    dbs = {0: folder / "grown-empty.db"}
    for size in sizes:
        dbs[size] = keep / f"log-{size}.db"
        if not dbs[size].exists():
            generate_log(dbs[size], size, span_days=30)
        migrate(dbs[size])  # before serving: a migration of a large log can take longer than start-up may
        sign_once(dbs[size])
    runs: dict[int, list[dict[str, float]]] = {size: [] for size in dbs}
    for _ in range(rounds):
        for size, db in dbs.items():
            process = serve(db)
            try:
                runs[size].append(wrk(process.url, 32, seconds))
            finally:
                process.stop()
    lines = ["| entries in the log | req/s at 32 | ÷ empty | p50 / p99 ms |", "|---:|---:|---:|---|"]
    empty = sum(r["rps"] for r in runs[0]) / rounds
    for size, found in runs.items():
        rps = sum(r["rps"] for r in found) / rounds
        p50, p99 = (sum(r[k] for r in found) / rounds for k in ("p50", "p99"))
        lines.append(f"| {size:,} | {rps:.0f} | {rps / empty:.2f} | {p50:.2f} / {p99:.2f} |")
    return lines


def sign_once(db: Path) -> None:
    """A checkpoint of a generated log, before it is served (untimed): the first of a log's life verifies
    every entry (minutes on millions), and a stop of ``serve`` meanwhile waits for it."""
    subprocess.run(
        [sys.executable, "-m", "topic_audit.cli", "checkpoint"],
        env={
            **ENV,
            "TOPIC_AUDIT_DB": str(db),
            "TOPIC_AUDIT_SDKAPPID": APP_ID,
            "TOPIC_AUDIT_LOG_LEVEL": "warning",
        },
        check=False,  # a log signed already (by another key too) has its first checkpoint behind it
        capture_output=True,
        timeout=3600,
    )


def servers_benchmark(folder: Path) -> list[str]:
    """`serve --server/--workers` at 1 and 32 connections (the choice docs/performance.md's sizing advice rests on)."""
    seconds = int(setting("SECONDS", "10"))
    lines = [
        "| server | workers | req/s at 1 | p50 ms at 1 | req/s at 32 | p50 / p99 ms at 32 |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for server, workers in (("uvicorn", "1"), ("granian", "1"), ("uvicorn", "2"), ("granian", "2")):
        process = serve(
            folder / f"{server}-{workers}.db", TOPIC_AUDIT_SERVER=server, TOPIC_AUDIT_WORKERS=workers
        )
        try:
            one, many = wrk(process.url, 1, seconds), wrk(process.url, 32, seconds)
        finally:
            process.stop()
        lines.append(
            f"| {server} | {workers} | {one['rps']:.0f} | {one['p50']:.2f} | {many['rps']:.0f} | "
            f"{many['p50']:.2f} / {many['p99']:.2f} |"
        )
    return lines


def writer_benchmark(folder: Path) -> list[str]:
    from tests.benchmarks.logs import decided

    count = int(setting("WRITER_ROWS", "20000"))
    lines = ["| rows per transaction | rows/s (synchronous=FULL) |", "|---:|---:|"]
    for size in (1, 8, 64):
        db = folder / f"writer-{size}.db"
        migrate(db)
        items = decided(count, size)
        conn = thread.connect(db)
        started = time.perf_counter()
        for i in range(0, count, size):
            thread.append_batch(conn, items[i : i + size])
        elapsed = time.perf_counter() - started
        conn.close()
        lines.append(f"| {size} | {count / elapsed:.0f} |")
    return lines


def writer_process_benchmark(folder: Path) -> list[str]:
    """The writer process alone, fed by a synthetic producer over its socket (as the receivers feed it)."""
    from tests.benchmarks.logs import decided

    count = int(setting("WRITER_ROWS", "20000"))
    window = int(setting("WRITER_WINDOW", "512"))
    rate, per_row, share = writer_process_rate(folder, decided(count, 7))
    return [
        f"The writer process, fed over its socket ({window} rows in flight, synchronous=FULL): "
        f"{rate:.0f} rows/s, {per_row:.0f} µs of the writer's CPU a row ({share:.0%} of a core)"
    ]


def writer_process_rate(folder: Path, items: list[Any]) -> tuple[float, float, float]:
    """Rows/s of a fresh writer process committing ``items`` (WRITER_WINDOW in flight), its CPU µs a row,
    and the share of a core it used."""
    import asyncio

    from topic_audit.settings import Settings
    from topic_audit.writer.client import RemoteWriter

    count = len(items)
    window = int(setting("WRITER_WINDOW", "512"))
    db, sock = folder / "writer-process.db", folder / "thread.sock"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    read, write = os.pipe()
    env = {
        **ENV,
        "TOPIC_AUDIT_WORKER_SETTINGS": Settings(sdk_app_id=APP_ID, token=TOKEN, db=db).for_workers(),
        "TOPIC_AUDIT_WRITER_SOCKET": str(sock),
        "TOPIC_AUDIT_READY_FD": str(write),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "topic_audit.serve.writer_process"], env=env, pass_fds=(write,)
    )
    os.close(write)
    with os.fdopen(read, "rb") as ready:
        ready.readline()

    async def produce() -> tuple[float, float]:
        client = RemoteWriter(sock)
        client.start()
        await client.connect(10)
        gate = asyncio.Semaphore(window)

        async def one(item: tuple[dict[str, object], object]) -> None:
            async with gate:
                await client.append(*item)  # type: ignore[arg-type]

        started, cpu = time.perf_counter(), _cpu_seconds(process.pid)
        await asyncio.gather(*(one(item) for item in items))
        elapsed, cpu = time.perf_counter() - started, _cpu_seconds(process.pid) - cpu
        client.stop()
        return elapsed, cpu

    try:
        elapsed, cpu = asyncio.run(produce())
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    conn = sqlite3.connect(db)
    committed = conn.execute("SELECT count(*) FROM audit_log").fetchone()[0]
    conn.close()
    if committed != count:
        raise RuntimeError(f"the writer process committed {committed} of {count} rows")
    return count / elapsed, cpu / count * 1e6, cpu / elapsed


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bytes_per_callback(db: Path, label: str = "") -> list[str]:
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    rows = conn.execute("SELECT count(*) FROM audit_log").fetchone()[0]
    body = conn.execute("SELECT avg(request_body_bytes) FROM audit_log").fetchone()[0]
    conn.close()
    size = db.stat().st_size
    return [
        f"Database bytes per audited callback{label}: {size / rows:.0f} (file {size} bytes, {rows} rows; "
        f"request bodies average {body:.0f} bytes; log + projection + indexes + full-text index)"
    ]


def memory_benchmark(folder: Path) -> list[str]:
    deliveries = int(setting("DELIVERIES", "1000000"))
    process = serve(folder / "memory.db")
    try:
        from topic_audit.demo import load

        warm = load.run_blocking(
            url=process.url.replace("/healthz", "/callback"),
            sdk_app_id=APP_ID,
            token=TOKEN,
            rate=0,
            duration=2,
            concurrency=32,
            mix={"good": 9, "duplicate": 1, "bad": 0},
        )
        before = process.memory_kib()
        seconds = max(int(deliveries / 1500), 1)
        sent = 0
        started = time.monotonic()
        while sent < deliveries:
            query = samples.query(APP_ID, "Group.CallbackAfterCreateTopic", TOKEN)
            result = subprocess.run(
                [
                    "wrk",
                    "-t1",
                    "-c32",
                    f"-d{min(60, seconds)}s",
                    "-s",
                    str(HERE / "deliveries.lua"),
                    process.url.replace("/healthz", "/callback"),
                ],
                capture_output=True,
                text=True,
                env={**ENV, "QUERY": query},
                timeout=600,
            )
            sent += int(re.search(r"(\d+) requests in", result.stdout).group(1))  # type: ignore[union-attr]
        after = process.memory_kib()
        took = time.monotonic() - started
    finally:
        process.stop()
    lines = [
        f"Memory of serve's processes after {warm.sent} warm-up deliveries, then after {sent} more ({took:.0f} s); "
        "proportional (shared pages divided among their sharers: they add up), resident, highest resident:"
    ]
    total = {
        when: {k: sum(m[k] for m in seen.values()) for k in ("Pss", "VmRSS")}
        for when, seen in (("before", before), ("after", after))
    }
    for name in [*sorted(before.keys() | after.keys()), "all"]:
        was = total["before"] if name == "all" else before.get(name, {"Pss": 0, "VmRSS": 0})
        now = total["after"] if name == "all" else after.get(name, {"Pss": 0, "VmRSS": 0, "VmHWM": 0})
        growth = f" ({(now['Pss'] - was['Pss']) / was['Pss'] * 100:+.1f}%)" if was["Pss"] else ""
        line = f"  {name}: {was['Pss'] / 1024:.1f} → {now['Pss'] / 1024:.1f} MiB{growth}; resident {was['VmRSS'] / 1024:.1f} → {now['VmRSS'] / 1024:.1f} MiB"
        lines.append(line + (f", highest {now['VmHWM'] / 1024:.1f} MiB" if "VmHWM" in now else ""))
    return lines


READ_FLOOR = """
import sqlite3, sys
conn = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
for row in conn.execute("SELECT * FROM audit_log"):
    pass
"""
REBUILD = """
import sqlite3, sys
from topic_audit.log import rebuild
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
print(f"{rebuild.rebuild(conn, processes=int(sys.argv[2]) or None).locked:.2f}")
"""


def log_benchmark(folder: Path) -> list[str]:
    """verify and rebuild-projection against one pass that only reads every entry into Python."""
    rows = int(setting("LOG_ROWS", "1000000"))
    given = ENV.get("BENCH_LOG")
    db = Path(given) if given else folder / "big.db"
    if not given:
        from tests.benchmarks.logs import generate_log

        generate_log(db, rows, span_days=30)
    count = sqlite3.connect(db).execute("SELECT count(*) FROM audit_log").fetchone()[0]
    copy = folder / "rebuilt.db"
    shutil.copy(db, copy)  # rebuild-projection writes; the given log stays as it was
    os.sync()  # not measured: the copy's write-back would slow the runs below

    def timed(*argv: str) -> tuple[float, str]:
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, *argv], check=True, capture_output=True, text=True, timeout=3600
        )
        return time.perf_counter() - started, done.stdout.strip()

    def empty_topics() -> None:
        conn = sqlite3.connect(copy)
        conn.execute("DELETE FROM topics")
        conn.commit()
        conn.close()

    runs = [
        ("read floor: every column of every entry into Python, one process", ("-c", READ_FLOOR, str(db))),
        (
            "`verify` (chain, checkpoints, projection; all cores)",
            ("-m", "topic_audit.cli", "verify", "--db", str(db)),
        ),
        ("`rebuild-projection`, projection intact, one process", ("-c", REBUILD, str(copy), "1")),
        ("`rebuild-projection`, projection intact, all cores", ("-c", REBUILD, str(copy), "0")),
        ("`rebuild-projection`, projection emptied first, all cores", ("-c", REBUILD, str(copy), "0")),
    ]
    lines = [
        "| run | seconds | entries/s | ÷ read floor | write lock held, s |",
        "|---|---:|---:|---:|---:|",
    ]
    floor = 0.0
    for label, argv in runs:
        if "emptied" in label:
            empty_topics()
        elapsed, locked = timed(*argv)
        floor = floor or elapsed
        locked = locked if "rebuild" in label else ""
        lines.append(
            f"| {label} | {elapsed:.1f} | {count / elapsed:,.0f} | {elapsed / floor:.2f} | {locked} |"
        )
    return [f"On a log of {count:,} entries ({os.cpu_count()} cores):", "", *lines]


FORWARD_LOADS = (
    ("flat out, 32 connections", 32, 0),
    ("~1,000/s (8 connections, 8 ms apart)", 8, 8),
    ("~200/s (4 connections, 20 ms apart)", 4, 20),
)


def forward_benchmark(folder: Path) -> list[str]:
    """The receiver with forwarding off and on (to the bare endpoint: a fast local destination), at
    each load of FORWARD_LOADS, alternating off and on ROUNDS times."""
    seconds = int(setting("SECONDS", "10"))
    rounds = int(setting("ROUNDS", "2"))
    destination = bare()
    reference = bare()  # the bare endpoint measured alone, in the same rounds
    target = destination.url.replace("/healthz", "/callback")
    lines = [
        "| load | forwarding | req/s | p50 / p99 ms | delivered during the run /s | backlog at the end | drained after, s |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    ratios, of_bare = [], []
    try:
        for load, connections, delay in FORWARD_LOADS:
            runs: dict[str, list[dict[str, float]]] = {"bare": [], "off": [], "on": []}
            for round_ in range(rounds):
                runs["bare"].append(wrk(reference.url, connections, seconds, delay))
                for mode in ("off", "on"):
                    db = folder / f"forward-{mode}-{connections}-{round_}.db"
                    extra = {"TOPIC_AUDIT_FORWARD_URL": target} if mode == "on" else {}
                    process = serve(db, **extra)
                    try:
                        result = wrk(process.url, connections, seconds, delay)
                        if mode == "on":
                            result |= drain(db, seconds)
                    finally:
                        process.stop()
                    runs[mode].append(result)
            for mode in ("bare", "off", "on"):
                keys = ("rps", "p50", "p99", "rate", "backlog", "drain")
                got = {k: sum(r.get(k, 0.0) for r in runs[mode]) / rounds for k in keys}
                tail = (
                    f"{got['rate']:.0f} | {got['backlog']:.0f} | {got['drain']:.1f}"
                    if mode == "on"
                    else "— | — | —"
                )
                mode = "bare endpoint alone" if mode == "bare" else mode
                lines.append(
                    f"| {load} | {mode} | {got['rps']:.0f} | {got['p50']:.2f} / {got['p99']:.2f} | {tail} |"
                )
            off, on, alone = (sum(r["rps"] for r in runs[m]) / rounds for m in ("off", "on", "bare"))
            p99_on, p99_alone = (sum(r["p99"] for r in runs[m]) / rounds for m in ("on", "bare"))
            ratios.append(f"{load}: {on / off:.2f}")
            of_bare.append(f"{load}: {on / alone:.2f}, p99 {p99_on / p99_alone:.1f} times bare's")
    finally:
        destination.stop()
        reference.stop()
    lines.append(f"\nThroughput with forwarding on ÷ off: {'; '.join(ratios)}.")
    lines.append(f"With forwarding on ÷ the bare endpoint alone: {'; '.join(of_bare)}.")
    lines += ["", *before_latency(folder)]
    return lines


def drain(db: Path, seconds: int) -> dict[str, float]:
    """The outbox after a wrk run: what was delivered while it ran, what was left, how long that took."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        delivered = conn.execute("SELECT count(*) FROM deliveries WHERE error IS NULL").fetchone()[0]
        backlog = conn.execute("SELECT count(*) FROM outbox WHERE state = 'pending'").fetchone()[0]
        started = time.monotonic()
        while conn.execute("SELECT count(*) FROM outbox WHERE state = 'pending'").fetchone()[0]:
            if time.monotonic() - started > 120:
                break
            time.sleep(0.05)
        return {"rate": delivered / seconds, "backlog": backlog, "drain": time.monotonic() - started}
    finally:
        conn.close()


def before_latency(folder: Path) -> list[str]:
    """Before-callbacks forwarded to a destination that answers in 50 ms: what Tencent waits."""
    import asyncio
    import statistics

    sys.path.insert(0, str(HERE.parent))
    from destination import Destination  # tests/destination.py

    count = int(setting("BEFORE_REQUESTS", "2000"))
    app = Destination("slow", delay=0.050)
    process = serve(folder / "before.db", TOPIC_AUDIT_FORWARD_URL=app.url)
    url = process.url.replace("/healthz", "/callback")
    body = samples.sample("before-create")

    async def run() -> list[float]:
        latencies: list[float] = []
        async with httpx.AsyncClient(timeout=5) as client:

            async def worker(n: int) -> None:
                for _ in range(n):
                    query = samples.query(APP_ID, body["CallbackCommand"], TOKEN)
                    started = time.perf_counter()
                    answer = await client.post(f"{url}?{query}", json=body)
                    latencies.append(time.perf_counter() - started)
                    assert answer.status_code == 200

            await asyncio.gather(*(worker(count // 8) for _ in range(8)))
        return latencies

    try:
        latencies = sorted(asyncio.run(run()))
    finally:
        process.stop()
        app.stop()
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
    return [
        f"Before-callbacks, the app answering in 50 ms, 8 at a time: p50 {p50:.1f} ms, p99 {p99:.1f} ms "
        f"({len(latencies)} requests; what topic-audit adds: p50 {p50 - 50:.1f} ms)"
    ]


def replica_benchmark(folder: Path) -> list[str]:
    import functools
    import statistics

    sys.path.insert(0, str(HERE.parent))
    from s3store import SeaweedFS  # tests/s3store.py

    seconds = int(setting("SECONDS", "10"))
    rounds = int(setting("ROUNDS", "2"))
    store = SeaweedFS(folder / "weed")
    lines: list[str] = []
    try:
        store.bucket("bench")
        replica = {
            **store.env,
            "TOPIC_AUDIT_REPLICA_URL": "s3://bench/http",
            "TOPIC_AUDIT_REPLICA_ENDPOINT": store.endpoint,
        }
        runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
        for round_ in range(rounds):
            for mode in ("off", "on"):
                extra = (
                    {**replica, "TOPIC_AUDIT_REPLICA_URL": f"s3://bench/http{round_}"} if mode == "on" else {}
                )
                process = serve(folder / f"replica-{mode}-{round_}.db", **extra)
                lags: list[float] = []
                done = threading.Event()
                sample = functools.partial(
                    _sample_lag, process.url.replace("/healthz", "/metrics"), lags, done
                )
                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                try:
                    result = wrk(process.url, 32, seconds)
                finally:
                    done.set()
                    sampler.join()
                    process.stop()
                result["lag_p50"] = statistics.median(lags) if lags else 0.0
                result["lag_max"] = max(lags, default=0.0)
                runs[mode].append(result)
        lines += [
            "| replica | req/s at 32 | p50 / p99 ms | lag during the run, p50 / max s |",
            "|---|---:|---|---|",
        ]
        for mode in ("off", "on"):
            got = {
                k: sum(r[k] for r in runs[mode]) / rounds for k in ("rps", "p50", "p99", "lag_p50", "lag_max")
            }
            lag = f"{got['lag_p50']:.2f} / {got['lag_max']:.2f}" if mode == "on" else "—"
            lines.append(f"| {mode} | {got['rps']:.0f} | {got['p50']:.2f} / {got['p99']:.2f} | {lag} |")
        off, on = (sum(r["rps"] for r in runs[m]) / rounds for m in ("off", "on"))
        lines.append(f"\nThroughput with the replica on ÷ off: {on / off:.2f}.\n")
        lines += rpo(folder, replica)
        lines += rto_and_watch(folder, store, replica)
    finally:
        store.stop()
    return lines


def _sample_lag(url: str, lags: list[float], done: threading.Event) -> None:
    """``topic_audit_replica_lag_seconds`` twice a second until ``done``."""
    while not done.wait(0.5):
        with contextlib.suppress(httpx.HTTPError):
            found = re.search(
                r"^topic_audit_replica_lag_seconds ([\d.e+-]+)$", httpx.get(url, timeout=2).text, re.M
            )
            if found:
                lags.append(float(found.group(1)))


def rpo(folder: Path, replica: dict[str, str]) -> list[str]:
    """SIGKILL serve (Litestream dies with it) in the middle of a flat-out load; restore; count."""
    out = []
    for run in range(int(setting("RPO_RUNS", "3"))):
        db = folder / f"rpo-{run}.db"
        env = {**replica, "TOPIC_AUDIT_REPLICA_URL": f"s3://bench/rpo{run}"}
        process = serve(db, **env)
        query = samples.query(APP_ID, "Group.CallbackAfterCreateTopic", TOKEN)
        load = subprocess.Popen(
            [
                "wrk",
                "-t1",
                "-c32",
                "-d20s",
                "-s",
                str(HERE / "deliveries.lua"),
                process.url.replace("/healthz", "/callback"),
            ],
            env={**ENV, "QUERY": query},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(5)
        process.process.send_signal(signal.SIGKILL)
        process.process.wait(10)
        load.terminate()
        load.wait(10)
        time.sleep(1)
        target = folder / f"rpo-{run}-restored.db"
        done = subprocess.run(
            [sys.executable, "-m", "topic_audit.cli", "restore", "--to", str(target)],
            env={**ENV, **env},
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr)

        def last(path: Path) -> tuple[int, str]:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                return conn.execute(
                    "SELECT id, received_at FROM audit_log ORDER BY id DESC LIMIT 1"
                ).fetchone()
            finally:
                conn.close()

        (kept, kept_at), (restored, restored_at) = last(db), last(target)
        from datetime import datetime

        lost = (
            datetime.fromisoformat(kept_at[:-1]) - datetime.fromisoformat(restored_at[:-1])
        ).total_seconds()
        out.append((kept - restored, lost, kept))
    return [
        "RPO, SIGKILL of serve in the middle of a flat-out load (32 connections), then `restore`: "
        + "; ".join(f"{n:,} of {total:,} entries lost ({lost:.2f} s of callbacks)" for n, lost, total in out),
        "",
    ]


def rto_and_watch(folder: Path, store: object, replica: dict[str, str]) -> list[str]:
    """RTO: the LOG_ROWS log replicated (its first upload timed), then restored and verified. Then the
    cost of a watch round on it, by new entries, and on a log a tenth of its size."""
    from topic_audit.integrity.watch import Watch
    from topic_audit.offbox import replica as offbox

    from tests.benchmarks.logs import generate_log

    rows = int(setting("LOG_ROWS", "1000000"))
    given = ENV.get("BENCH_LOG")
    db = folder / "rto.db"
    if given:
        shutil.copy(given, db)
    else:
        generate_log(db, rows, span_days=30)
    count = sqlite3.connect(db).execute("SELECT count(*) FROM audit_log").fetchone()[0]
    saved = {k: os.environ.get(k) for k in replica}
    os.environ.update(replica)
    try:
        target = offbox.Target.parse("s3://bench/rto", replica["TOPIC_AUDIT_REPLICA_ENDPOINT"])
        replicator = offbox.Replicator(db, db.with_name("rto.db.checkpoints.jsonl"), target)
        started = time.perf_counter()
        replicator.start()
        deadline = time.monotonic() + 1800
        while (
            replicator.replicated == 0 or replicator.replicated < replicator.local
        ) and time.monotonic() < deadline:
            time.sleep(0.5)
        upload = time.perf_counter() - started
        replicator.stop()
        restored = folder / "rto-restored.db"
        started = time.perf_counter()
        offbox.restore(target, restored)
        restore_seconds = time.perf_counter() - started
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "topic_audit.cli", "verify", "--db", str(restored)],
        check=True,
        capture_output=True,
        timeout=3600,
    )
    verify_seconds = time.perf_counter() - started
    size = db.stat().st_size / 2**30
    lines = [
        f"RTO on a log of {count:,} entries ({size:.1f} GiB): `restore` {restore_seconds:.1f} s + `verify` "
        f"{verify_seconds:.1f} s = {restore_seconds + verify_seconds:.1f} s (its first upload to the store took "
        f"{upload:.1f} s).",
        "",
        "| `watch` round (sweep 10,000) | new entries | seconds |",
        "|---|---:|---:|",
    ]
    small = folder / "watch-small.db"
    generate_log(small, max(count // 10, 1000), span_days=3)
    for label, path in ((f"log of {count:,}", restored), (f"log of {max(count // 10, 1000):,}", small)):
        watch = Watch(path, path.with_name(path.name + ".checkpoints.jsonl"))
        started = time.perf_counter()
        watch.round()
        lines.append(
            f"| first round, {label} (everything) | {count if path == restored else count // 10:,} | {time.perf_counter() - started:.2f} |"
        )
        for new in (0, 1000, 10000):
            if new:
                generate_log(path, new, seed=new)
            started = time.perf_counter()
            result = watch.round()
            assert not result.findings, result.findings
            lines.append(f"| {label} | {result.new_entries:,} | {time.perf_counter() - started:.3f} |")
    return lines


def main() -> None:
    if shutil.which("wrk") is None:
        sys.exit("wrk is required (apt-get install wrk)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sections: list[tuple[str, list[str]]] = []
        only = setting("ONLY", "targets,start,http,servers,grown,writer,memory,log,forward,replica").split(
            ","
        )
        if "targets" in only:
            from tests.benchmarks.targets import targets_benchmark

            sections.append(("The targets, each beside its same-run baseline", targets_benchmark(folder)))
        if "start" in only:
            from tests.benchmarks.bench_start import start_benchmark

            sections.append(("Cold start (exec → first answered callback)", start_benchmark(folder)))
        if "http" in only:
            with checkout(setting("BEFORE", "")) as before:
                http, db = http_benchmark(folder, before)
            sections.append(("HTTP: audited vs bare (wrk, unique signed deliveries)", http))
            size = bytes_per_callback(db)
            if before is not None:
                size += bytes_per_callback(folder / "http-before.db", " (before)")
            sections.append(("Database size", size))
        if "grown" in only:
            sections.append(("A grown log (wrk, 32 connections)", grown_benchmark(folder)))
        if "servers" in only:
            sections.append(("Servers and workers (audited)", servers_benchmark(folder)))
        if "writer" in only:
            sections.append(
                ("The writer alone", [*writer_benchmark(folder), "", *writer_process_benchmark(folder)])
            )
        if "memory" in only:
            sections.append(("Memory", memory_benchmark(folder)))
        if "log" in only:
            sections.append(("verify and rebuild-projection", log_benchmark(folder)))
        if "forward" in only:
            sections.append(("Forwarding", forward_benchmark(folder)))
        if "replica" in only:
            sections.append(("The off-box copy", replica_benchmark(folder)))
    for title, lines in sections:
        print(f"\n### {title}\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
