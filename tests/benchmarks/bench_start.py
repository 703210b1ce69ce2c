"""Cold start of ``topic-audit serve``: from its exec to the first callback answered 200.

    python -m tests.benchmarks.bench_start     # BENCH_START_RUNS (5), BENCH_START_LOG, BENCH_START_BEFORE,
                                               # BENCH_START_ROWS (1000000: the log generated without one)

Each run execs a process and, from that moment, posts one signed after-create callback on a new
connection every ~10 ms until one is answered 200 (a refused connection is tried again; one accepted by
the kernel waits in the listening socket's queue, as Tencent's would). The targets, alternating:

- the bare endpoint (``tests/benchmarks/bare.py`` under uvicorn, as ``bench.bare()`` starts it): what a
  Python ASGI process costs to start on this machine, the same-run baseline;
- ``serve`` on an empty (migrated) log;
- ``serve`` on a log of 1,000,000 entries (BENCH_START_LOG, else generated once with
  :mod:`tests.benchmarks.logs` into BENCH_GROWN_DIR or the run's folder);
- with BENCH_START_BEFORE=<git ref>, that version's ``serve`` on both logs, in the same rounds.

The first answer must be in the log (it is looked up among the last entries once serve has stopped).
Each target runs once first, unmeasured (the first stop signs a checkpoint of a log that has none), and
the code is byte-compiled first, as an installed wheel is.
Then SIGTERM + start under socket activation (the socket held as systemd holds it,
:func:`tests.benchmarks.restarts.serve_command`): callbacks at :data:`LOAD_RATE` a second (half kept
alive, :class:`tests.benchmarks.restarts.Load`) while serve on the 1,000,000-entry log stops and a new
one starts; the row is the longest any of them waited for its answer.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from topic_audit.log.migrations import migrate
from topic_audit.settings import default_signing_key
from topic_audit.tencent import samples

from tests.benchmarks.bench import HERE, bare_command, checkout, free_port, setting
from tests.benchmarks.restarts import APP_ID, TOKEN, Load, environment, serve_command

TARGET_SECONDS = 2.0
"""Tencent waits 2 s for an answer."""
POLL_SECONDS = 0.01
LOAD_RATE = 50.0
"""Callbacks a second sent across a SIGTERM + start."""
GIVE_UP_SECONDS = 120.0
LOG_ROWS = int(os.environ.get("BENCH_START_ROWS", "1000000"))
"""Entries of the grown log when it is generated (a smoke run makes a small one)."""


def post(port: int, topic: str, timeout: float = 60.0) -> int | None:
    """One signed after-create callback for ``topic`` on a new connection: the answer's status, or None
    when the connection was refused or dropped (nothing listens yet)."""
    body = json.dumps(samples.sample("after-create", TopicId=topic)).encode()
    query = samples.query(APP_ID, "Group.CallbackAfterCreateTopic", TOKEN)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", f"/callback?{query}", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    except (ConnectionRefusedError, ConnectionResetError, http.client.RemoteDisconnected):
        return None
    finally:
        conn.close()


def first_answer(port: int, topic: str, began: float, process: subprocess.Popen[bytes]) -> float:
    """Seconds from ``began`` until a callback for ``topic`` is answered 200 (RuntimeError after
    :data:`GIVE_UP_SECONDS`, or when the process ends first)."""
    status = None
    while time.monotonic() - began < GIVE_UP_SECONDS:
        if process.poll() is not None:
            raise RuntimeError(f"the process ended (exit code {process.returncode}) before answering")
        status = post(port, topic)
        if status == 200:
            return time.monotonic() - began
        time.sleep(POLL_SECONDS)
    raise RuntimeError(f"no 200 within {GIVE_UP_SECONDS:g} s (the last answer: {status})")


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(120)


def logged(db: Path, topic: str) -> bool:
    """Whether one of the log's last entries is the callback for ``topic``."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT topic_id FROM audit_log ORDER BY id DESC LIMIT 50").fetchall()
    finally:
        conn.close()
    return any(row[0] == topic for row in rows)


Target = Callable[[str], tuple[float, bool]]


def serve_environment(db: Path, port: int, code: Path | None) -> dict[str, str]:
    env = environment(db, port, TOPIC_AUDIT_LOG_LEVEL="warning")
    if code is not None:
        env["PYTHONPATH"] = str(code / "service")
    return env


def cold_start(db: Path | None, log: Path, code: Path | None = None) -> Target:
    """A target: ``serve`` on ``db`` (the bare endpoint without one), from ``code``'s ``service/`` if
    given; each call starts it, times its first answer, stops it and says whether that answer is logged."""

    def run(topic: str) -> tuple[float, bool]:
        port = free_port()
        if db is None:
            command, env = bare_command(port), dict(os.environ)
        else:
            command, env = serve_command(), serve_environment(db, port, code)
        with log.open("ab") as out:
            began = time.monotonic()
            process = subprocess.Popen(command, env=env, stdout=out, stderr=out)
        try:
            seconds = first_answer(port, topic, began, process)
        finally:
            code_ = stop(process)
        if db is None:
            return seconds, True
        return seconds, code_ == 0 and logged(db, topic)

    return run


def restart(db: Path, log: Path, code: Path | None = None) -> tuple[float, float, int, int]:
    """SIGTERM + start on a held socket under load: the slowest answer (s), the stop's seconds, the
    callbacks sent, and those refused or failed."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(2048)
    port = held.getsockname()[1]
    env = serve_environment(db, port, code)

    def start() -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            return subprocess.Popen(
                serve_command(held), env=env, stdout=out, stderr=out, pass_fds=(held.fileno(),)
            )

    try:
        process = start()
        first_answer(port, f"warm-{time.time_ns()}", time.monotonic(), process)
        load = Load(f"http://127.0.0.1:{port}", LOAD_RATE)
        thread = load.start()
        time.sleep(1.0)
        stopping = time.monotonic()
        if stop(process) != 0:
            raise RuntimeError("serve did not exit 0 on SIGTERM")
        stopped = time.monotonic() - stopping
        process = start()
        first_answer(port, f"after-{time.time_ns()}", time.monotonic(), process)
        time.sleep(1.0)
        load.stop(thread)
        stop(process)
    finally:
        held.close()
    return load.slowest, stopped, len(load.results), len(load.failed)


def grown_log(folder: Path) -> Path:
    """The 1,000,000-entry log: BENCH_START_LOG, else one generated once (BENCH_GROWN_DIR keeps it)."""
    given = os.environ.get("BENCH_START_LOG")
    if given:
        return Path(given)
    keep = Path(setting("GROWN_DIR", str(folder)))
    keep.mkdir(parents=True, exist_ok=True)
    path = keep / f"log-{LOG_ROWS}.db"
    if not path.exists():
        from tests.benchmarks.logs import generate_log

        generate_log(path, LOG_ROWS, span_days=30)
    return path


def _entries(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT coalesce(max(id), 0) FROM audit_log").fetchone()[0])
    finally:
        conn.close()


def _cell(seconds: list[float]) -> str:
    return f"{statistics.median(seconds):.2f} / {max(seconds):.2f}"


def start_benchmark(folder: Path) -> list[str]:
    """The cold-start table, and the SIGTERM + start row, as Markdown lines."""
    try:
        return _measured(folder)
    finally:  # the empty log's signing key, made by serve in its default place beside ``folder``
        shutil.rmtree(default_signing_key(folder / "start-empty.db").parent, ignore_errors=True)


def _measured(folder: Path) -> list[str]:
    runs = int(os.environ.get("BENCH_START_RUNS", "5"))
    empty, grown = folder / "start-empty.db", grown_log(folder)
    migrate(empty)
    migrate(grown)  # a migration of a large log is not what is measured here
    entries = f"{_entries(grown):,}-entry log"
    log = folder / "start.log"
    with checkout(os.environ.get("BENCH_START_BEFORE", "")) as before:
        targets: dict[str, Target] = {"bare endpoint (same-run baseline)": cold_start(None, log)}
        if before is not None:
            targets["`serve`, empty log (before)"] = cold_start(empty, log, before)
        targets["`serve`, empty log"] = cold_start(empty, log)
        if before is not None:
            targets[f"`serve`, {entries} (before)"] = cold_start(grown, log, before)
        targets[f"`serve`, {entries}"] = cold_start(grown, log)
        for code in (HERE.parent.parent, before):
            if code is not None:
                subprocess.run([sys.executable, "-m", "compileall", "-q", str(code / "service")], check=True)
        seconds: dict[str, list[float]] = {name: [] for name in targets}
        unlogged: dict[str, int] = dict.fromkeys(targets, 0)
        for target in targets.values():
            target(f"warm-{os.getpid()}-{time.time_ns()}")
        for n in range(runs):
            for name, target in targets.items():
                took, ok = target(f"start-{os.getpid()}-{n}-{time.time_ns()}")
                seconds[name].append(took)
                unlogged[name] += not ok
                print(f"{name}: {took:.3f} s", file=sys.stderr, flush=True)
        lines = [
            f"| exec → first callback answered 200 | median / max s ({runs} runs) | ≤ {TARGET_SECONDS:g} s "
            "| answered, not in log or exit ≠ 0 |",
            "|---|---:|---|---:|",
        ]
        for name, found in seconds.items():
            within = "yes" if max(found) <= TARGET_SECONDS else "no"
            lines.append(f"| {name} | {_cell(found)} | {within} | {unlogged[name]} |")
        restarts: dict[str, list[tuple[float, float, int, int]]] = {}
        for label, code in (("before", before), ("", None)) if before is not None else (("", None),):
            restarts[label] = [restart(grown, log, code) for _ in range(max(runs // 2, 1))]
    lines += [
        "",
        f"| SIGTERM + start, socket activation, {entries}, {LOAD_RATE:g} callbacks/s "
        "| slowest answer, median / max s | stop s, median | sent | refused or failed | ≤ 2 s |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for label, found in restarts.items():
        slowest = [r[0] for r in found]
        name = "SIGTERM + start" + (f" ({label})" if label else "")
        lines.append(
            f"| {name} | {_cell(slowest)} | {statistics.median(r[1] for r in found):.2f} "
            f"| {sum(r[2] for r in found)} | {sum(r[3] for r in found)} "
            f"| {'yes' if max(slowest) <= TARGET_SECONDS else 'no'} |"
        )
    return lines


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-start-") as tmp:
        lines = start_benchmark(Path(tmp))
    print("\n### Cold start\n")
    print("\n".join(lines))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
