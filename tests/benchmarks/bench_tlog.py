"""The transparency log measured (`python -m tests.benchmarks.bench_tlog`), each figure with a baseline
taken in the same run, printed as Markdown.

1. The tree of a 1,000,000-entry log: stored from scratch (the first checkpoint after the upgrade), one
   checkpoint interval's worth (300,000 entries: 60 s at 5,000/s) and one keeper round (5,000), against
   the floor of reading every ``entry_hash`` and the tree computed in memory without storing it.
2. The writer alone appending TLOG_APPEND_ROWS entries with the tree keeper off and on, alternating.
3. Receipts (``receipts.receipt``) and consistency proofs on the 1M log and on a 5M log, per proof,
   against a point lookup of the same entry; and ``topic-audit prove`` as a process against
   ``topic-audit --version``.
4. ``topic-audit verify`` on the 1M log with the tree check and without it (disabled in the process).

Environment: TLOG_DIR (where the logs are kept between runs; default a temporary folder), TLOG_LOG (an
existing 1,000,000-entry log to copy instead of generating one), TLOG_APPEND_ROWS (50000), TLOG_PROOFS
(300), TLOG_ROUNDS (3, of the append section), TLOG_ONLY (sections, "tree,append,prove,prove5m,process,verify").
The 5M log is built by repeating the 1M log's rows: the tree reads only ``entry_hash``, so the chain
need not hold.
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from topic_audit import clock
from topic_audit.log import chain
from topic_audit.log.migrations import migrate
from topic_audit.transparency import receipts, tlog, tree
from topic_audit.transparency.checkpoints import Signer, make_checkpoint
from topic_audit.writer.thread import connect

from tests.benchmarks.logs import generate_log

ENV = os.environ
MILLION = 1_000_000


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def prepare(folder: Path) -> Path:
    db = folder / "tlog-1m.db"
    if not db.exists():
        given = ENV.get("TLOG_LOG")
        if given:
            shutil.copy(given, db)
        else:
            generate_log(db, MILLION, span_days=30)
    migrate(db)
    return db


def grow_to_5m(one: Path, folder: Path) -> Path:
    db = folder / "tlog-5m.db"
    if db.exists():
        return db
    shutil.copy(one, db)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    for name in ("audit_log_append_only", "audit_log_no_update", "audit_log_no_delete"):
        conn.execute(f"DROP TRIGGER IF EXISTS {name}")
    columns = ", ".join(chain.COLUMNS)
    shifted = ", ".join(f"{c} + {{k}}" if c in ("id",) else c for c in chain.COLUMNS)
    for k in range(1, 5):
        conn.execute("BEGIN")
        conn.execute(
            f"INSERT INTO audit_log ({columns}) SELECT {shifted.format(k=k * MILLION)} FROM audit_log "
            f"WHERE id <= {MILLION}"
        )
        conn.execute("COMMIT")
    conn.execute("DELETE FROM tree_hashes")
    conn.close()
    return db


def tree_section(db: Path) -> list[str]:
    conn = connect(db)
    conn.execute("DELETE FROM tree_hashes")
    size = tree.leaf_count(conn)
    read = lambda: conn.execute("SELECT entry_hash FROM audit_log ORDER BY id").fetchall()  # noqa: E731
    floor = min(timed(read), timed(read))  # the second from the page cache, as the runs below read it

    def in_memory() -> None:
        tlog.Frontier().extend(tree.leaf_hashes(conn, 0, size))

    memory = timed(in_memory)
    full = timed(lambda: tree.update(conn))
    rows = [
        ("read floor: every `entry_hash`, in id order", floor),
        ("the tree in memory, not stored (`tlog.Frontier`)", memory),
        (f"stored from scratch: {size:,} entries (`tree.update`)", full),
    ]
    for label, entries in (
        ("a checkpoint interval: 300,000 new entries", 300_000),
        ("a keeper round: 5,000 new entries", 5_000),
    ):
        conn.execute("DELETE FROM tree_hashes")
        tree.update(conn, size - entries)
        rows.append((label, timed(lambda: tree.update(conn))))
    conn.close()
    lines = ["| tree of the 1M log | seconds | ÷ read floor |", "|---|---:|---:|"]
    lines += [f"| {label} | {s:.2f} | {s / floor:.2f} |" for label, s in rows]
    return lines


class Keeper:
    """An experiment measured and not kept (the Performance page): keeps the stored tree level with the log from a thread of its own, on its own connection, so that
    the checkpoint job (which runs on the writer) finds at most a second of entries left to store.

    Its commits are a few rows each (``synchronous=NORMAL``: every hash can be recomputed from the
    log); its hashing, a few microseconds an entry, is spread over the second instead of stalling the
    writer for the whole checkpoint interval's entries at once.
    """

    def __init__(self, path: Path, interval: float = 1.0) -> None:
        self.path, self.interval = path, interval
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="tree-keeper", daemon=True)

    def start(self) -> Keeper:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join()

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        try:
            conn.execute("PRAGMA synchronous=NORMAL")
            while not self.stopping.is_set():
                try:
                    tree.update(conn)
                except sqlite3.Error:
                    print("could not store the tree's new hashes; will retry", file=sys.stderr)
                self.stopping.wait(self.interval)
        finally:
            conn.close()


def append_section(folder: Path) -> list[str]:
    count = int(ENV.get("TLOG_APPEND_ROWS", "50000"))
    runs: dict[str, list[float]] = {"off": [], "on": []}
    for round_ in range(int(ENV.get("TLOG_ROUNDS", "3"))):
        for mode in ("off", "on"):
            db = folder / f"append-{mode}-{round_}.db"
            migrate(db)
            keeper = Keeper(db).start() if mode == "on" else None
            try:
                runs[mode].append(count / generate_log(db, count, seed=round_))
            finally:
                if keeper is not None:
                    keeper.stop()
            if mode == "on":
                conn = sqlite3.connect(db)
                assert tree.stored_count(conn, 1) >= (count // 256) - 20, "the keeper fell behind"
                conn.close()
            db.unlink()
    off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
    return [
        f"| the writer alone, {count:,} entries | entries/s | ÷ keeper off |",
        "|---|---:|---:|",
        f"| tree keeper off | {off:,.0f} | 1.00 |",
        f"| tree keeper on (stores the tree every second) | {on:,.0f} | {on / off:.2f} |",
    ]


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return f"{p(0.5):.2f} | {p(0.99):.2f} | {ordered[-1] * 1000:.2f}"


def prove_section(db: Path, label: str) -> list[str]:
    conn = connect(db)
    tree.update(conn)
    signer, _ = Signer.load_or_create(db.with_name("tlog-bench.key"))
    make_checkpoint(
        conn,
        signer,
        db.with_name(db.name + ".checkpoints.jsonl"),
        clock.now(),
        origin="topic-audit/bench",
    )
    conn.close()
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    size = tree.leaf_count(conn)
    rng = random.Random(7)
    ids = [rng.randrange(1, size + 1) for _ in range(int(ENV.get("TLOG_PROOFS", "300")))]
    lookups, proofs, consistency = [], [], []
    for entry_id in ids:
        lookups.append(
            timed(lambda i=entry_id: conn.execute("SELECT * FROM audit_log WHERE id = ?", (i,)).fetchone())
        )
        proofs.append(timed(lambda i=entry_id: receipts.receipt(conn, i)))
        consistency.append(
            timed(lambda i=entry_id: tlog.consistency_proof(tree.StoredTree(conn, size), i, size))
        )
    conn.close()
    return [
        f"| {label}: {size:,} entries, {len(ids)} random ids, ms | p50 | p99 | max |",
        "|---|---:|---:|---:|",
        f"| baseline: the entry's row (`SELECT * … WHERE id = ?`) | {percentiles(lookups)} |",
        f"| a receipt (`receipts.receipt`: checks the signed root, then the inclusion proof) | {percentiles(proofs)} |",
        f"| a consistency proof from size id to {size:,} | {percentiles(consistency)} |",
    ]


def process_section(db: Path) -> list[str]:
    def run(*argv: str) -> float:
        return timed(
            lambda: subprocess.run(
                [sys.executable, "-m", "topic_audit.cli", *argv], check=True, capture_output=True
            )
        )

    version = statistics.median(run("--version") for _ in range(5))
    prove = statistics.median(
        run("prove", "--db", str(db), "--id", str(i * 100_003 % MILLION + 1)) for i in range(5)
    )
    return [
        "| as a process, median of 5, s | seconds |",
        "|---|---:|",
        f"| baseline: `topic-audit --version` (start-up) | {version:.2f} |",
        f"| `topic-audit prove --id N` on the 1M log | {prove:.2f} |",
    ]


WITHOUT_TREE = """
import sys
from topic_audit.cli import main
from topic_audit.integrity.tree import Tree
Tree.advance = lambda self, snapshot: []  # verify as it was before the tree check
main(["verify", "--db", sys.argv[1]])
"""


def verify_section(db: Path) -> list[str]:
    def run(*argv: str) -> float:
        return timed(lambda: subprocess.run([sys.executable, *argv], capture_output=True, check=False))

    runs: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(2):
        runs["without"].append(run("-c", WITHOUT_TREE, str(db)))
        runs["with"].append(run("-m", "topic_audit.cli", "verify", "--db", str(db)))
    without, with_tree = min(runs["without"]), min(runs["with"])
    from topic_audit.integrity import Checker
    from topic_audit.integrity.tree import Tree

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    with Checker(db.with_name(db.name + ".checkpoints.jsonl")).snapshot(conn) as snapshot:
        alone = timed(lambda: Tree().advance(snapshot))
    conn.close()
    return [
        "| `verify` on the 1M log, best of 2, alternating | seconds | ÷ without |",
        "|---|---:|---:|",
        f"| without the tree check | {without:.1f} | 1.00 |",
        f"| with it (the tree recomputed, every note and tile checked) | {with_tree:.1f} | {with_tree / without:.2f} |",
        f"| the tree check alone, in process | {alone:.1f} | {alone / without:.2f} |",
    ]


def main() -> None:
    folder = Path(ENV.get("TLOG_DIR") or tempfile.mkdtemp(prefix="tlog-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    one = prepare(folder)
    out = [
        f"Transparency log ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start)",
        "",
    ]
    only = ENV.get("TLOG_ONLY", "tree,append,prove,prove5m,process,verify").split(",")
    sections = {
        "tree": lambda: tree_section(one),
        "append": lambda: append_section(folder),
        "prove": lambda: prove_section(one, "1M log"),
        "prove5m": lambda: prove_section(grow_to_5m(one, folder), "5M log"),
        "process": lambda: process_section(one),
        "verify": lambda: verify_section(one),
    }
    for name in only:
        lines = sections[name]()
        print("\n".join(lines), "", sep="\n", flush=True)
        out += [*lines, ""]


if __name__ == "__main__":
    main()
