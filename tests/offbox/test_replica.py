"""The off-box copy with a real S3-compatible store (SeaweedFS) and the real Litestream: the restore drill
after a SIGKILL under load, durability and group commit with the replica on, a Litestream crash survived,
the checkpoints published, and bad configuration refused with one line."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import (
    APP_ID,
    SUBJECT,
    SUBJECT_IP,
    TOKEN,
    Prometheus,
    Server,
    holding,
    message,
    metric,
    require_tool,
    rows,
    run_cli,
    send,
    wait_for,
)
from s3store import SeaweedFS
from topic_audit.tencent import samples

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    running = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    try:
        running.bucket("warmup")
        yield running
    finally:
        running.stop()


def replica_env(store: SeaweedFS, name: str, prefix: str = "prod") -> dict[str, str]:
    """One bucket for every test (the store makes volumes per bucket), a prefix of its own for each."""
    store.bucket("audit")
    return {
        **store.env,
        "TOPIC_AUDIT_REPLICA_URL": f"s3://audit/{name}/{prefix}",
        "TOPIC_AUDIT_REPLICA_ENDPOINT": store.endpoint,
        "TOPIC_AUDIT_CHECKPOINT_SECONDS": "1",
    }


class Load:
    """Callbacks from 8 threads until stopped; remembers when each was acknowledged (200)."""

    def __init__(self, server: Server, prefix: str) -> None:
        self.url, self.prefix = f"{server.url}/callback", prefix
        self.acknowledged: list[tuple[float, str]] = []
        self.failed = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(8)]
        for thread in self.threads:
            thread.start()

    def _run(self, worker: int) -> None:
        with httpx.Client(timeout=5) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                topic = f"@TGS#_g@TOPIC#_{self.prefix}{worker}x{n}"
                body = samples.sample("after-create", TopicId=topic)
                query = samples.query(APP_ID, body["CallbackCommand"], TOKEN)
                try:
                    answer = client.post(f"{self.url}?{query}", json=body)
                except httpx.HTTPError:
                    with self._lock:
                        self.failed += 1
                    continue
                with self._lock:
                    if answer.status_code == 200:
                        self.acknowledged.append((time.time(), topic))
                    else:
                        self.failed += 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self.threads:
            thread.join(10)


def litestream_pids(parent: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
        alive = not fields.get("State", "").startswith("Z")  # a killed child stays a zombie until reaped
        if (
            fields.get("Name", "").strip() == "litestream"
            and fields.get("PPid", "").strip() == str(parent)
            and alive
        ):
            found.append(int(status.parent.name))
    return found


def test_the_restore_drill(store: SeaweedFS, tmp_path: Path) -> None:
    """serve with a replica under load; SIGKILL; the database, its WAL and the checkpoint file deleted;
    restore; every callback acknowledged more than a sync interval before the kill is there; verify passes."""
    db = tmp_path / "audit.db"
    env = replica_env(store, "drill")
    server = Server(db, tmp_path / "server.log", env).start()
    assert server.process is not None
    try:
        load = Load(server, "drill")
        time.sleep(6)
        killed_at = time.time()
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(10)
        load.stop()
    finally:
        server.stop()
    wait_for(lambda: not litestream_pids(server.process.pid), 5, "litestream to die with serve")
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), Path(f"{db}.checkpoints.jsonl")):
        path.unlink(missing_ok=True)

    restored = tmp_path / "restored" / "audit.db"
    restored.parent.mkdir()
    started = time.monotonic()
    result = run_cli("restore", "--to", str(restored), env=env, timeout=300)
    restore_seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert "published checkpoints" in result.stdout
    checked = run_cli("verify", "--db", str(restored), "--json", env=env, timeout=300)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    present = {r["topic_id"] for r in rows(restored)}
    early = [topic for at, topic in load.acknowledged if at < killed_at - 1.0]
    late = [topic for at, topic in load.acknowledged if at >= killed_at - 1.0]
    missing = [topic for topic in early if topic not in present]
    lost_late = [topic for topic in late if topic not in present]
    print(
        f"\ndrill: {len(load.acknowledged)} acknowledged, {len(early)} more than 1 s before the kill, all restored: "
        f"{not missing}; of the last second's {len(late)}, {len(lost_late)} lost; restore {restore_seconds:.1f} s; "
        f"{json.loads(checked.stdout)['entries']} entries verified"
    )
    assert len(early) > 100 and missing == []


def test_durability_and_group_commit_hold_with_the_replica(store: SeaweedFS, tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    server = Server(db, tmp_path / "server.log", replica_env(store, "durable")).start()
    assert server.process is not None
    try:
        load = Load(server, "dur")
        time.sleep(3)
        batches = metric(server, "topic_audit_audit_batch_rows_count")
        committed = metric(server, "topic_audit_audit_batch_rows_sum")
        os.kill(server.process.pid, signal.SIGKILL)  # synchronous=FULL: every answer's row is on disk
        server.process.wait(10)
        load.stop()
    finally:
        server.stop()
    present = {r["topic_id"] for r in rows(db)}
    assert all(topic in present for _, topic in load.acknowledged)
    assert committed / batches > 1.5, (committed, batches)  # group commit: several rows per fsync
    assert len(load.acknowledged) > 100


def test_the_writer_keeps_synchronous_full_and_leaves_checkpoints_to_litestream(tmp_path: Path) -> None:
    from litestar.testing import TestClient
    from topic_audit.receiver.app import create_app
    from topic_audit.settings import Settings
    from topic_audit.writer import jobs

    settings = Settings(
        sdk_app_id=APP_ID, db=tmp_path / "audit.db", checkpoint_seconds=0, replica_url="s3://b/p"
    )
    with TestClient(create_app(settings)) as client:
        writer = client.app.state.writer
        pragmas = writer.submit(jobs.Pragmas()).result(timeout=5)
    assert pragmas == (2, 0, "wal")  # FULL; Litestream checkpoints; WAL


def test_a_litestream_crash_is_survived(store: SeaweedFS, tmp_path: Path) -> None:
    server = Server(tmp_path / "audit.db", tmp_path / "server.log", replica_env(store, "crash")).start()
    assert server.process is not None
    try:
        load = Load(server, "crash")
        time.sleep(2)
        (first,) = litestream_pids(server.process.pid)
        os.kill(first, signal.SIGKILL)
        # ~0.3 s under this load; the second before the restart adds to it
        wait_for(lambda: metric(server, "topic_audit_replica_lag_seconds") > 0.9, 10, "the lag to show")
        wait_for(lambda: litestream_pids(server.process.pid) not in ([], [first]), 15, "litestream restarted")
        (second,) = litestream_pids(server.process.pid)
        assert second != first
        wait_for(lambda: metric(server, "topic_audit_replica_lag_seconds") < 0.8, 30, "the lag to recover")
        load.stop()
    finally:
        server.stop()
    assert load.failed == 0 and len(load.acknowledged) > 50  # never an answer turned into a failure
    assert "litestream ended" in server.log.read_text()


def test_checkpoints_are_published_beside_the_replica(store: SeaweedFS, tmp_path: Path) -> None:
    server = Server(
        tmp_path / "audit.db", tmp_path / "server.log", replica_env(store, "published", "p/q")
    ).start()
    try:
        for n in range(5):
            body = samples.sample("after-create", TopicId=f"@TGS#_g@TOPIC#_pub{n}")
            httpx.post(
                f"{server.url}/callback?{samples.query(APP_ID, body['CallbackCommand'], TOKEN)}", json=body
            )
        wait_for(
            lambda: len(store.keys("audit", "published/p/q/checkpoints/")) >= 3, 20, "3 published checkpoints"
        )
    finally:
        server.stop()
    keys = store.keys("audit", "published/p/q/checkpoints/")
    assert keys[0] == "published/p/q/checkpoints/000000000001.json"
    local = (tmp_path / "audit.db.checkpoints.jsonl").read_text().splitlines()
    first = store.client().get_object(Bucket="audit", Key=keys[0])["Body"].read().decode()
    assert json.loads(first) == json.loads(local[0])
    assert any(k.startswith("published/p/q/db/") for k in store.keys("audit", "published/p/q/"))


@pytest.mark.parametrize("case", ["unreachable", "no bucket", "wrong credentials", "no binary"])
def test_bad_replica_configuration_is_refused_with_one_line(
    store: SeaweedFS, tmp_path: Path, case: str
) -> None:
    env = {
        **replica_env(store, "good"),
        "TOPIC_AUDIT_SDKAPPID": APP_ID,
        "TOPIC_AUDIT_DB": str(tmp_path / "a.db"),
    }
    expected = {
        "unreachable": "cannot reach",
        "no bucket": "does not exist",
        "wrong credentials": "refused the credentials",
        "no binary": "no litestream binary",
    }[case]
    if case == "unreachable":
        env["TOPIC_AUDIT_REPLICA_ENDPOINT"] = "http://127.0.0.1:9"
    elif case == "no bucket":
        env["TOPIC_AUDIT_REPLICA_URL"] = "s3://no-such-bucket/prod"
    elif case == "wrong credentials":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    else:
        env["TOPIC_AUDIT_LITESTREAM"] = str(tmp_path / "litestream")
    started = time.monotonic()
    result = run_cli("serve", env=env, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert time.monotonic() - started < 30


def test_a_replica_that_falls_behind_alerts_and_never_fails_an_answer(
    store: SeaweedFS, tmp_path: Path
) -> None:
    """The store stops answering while serve keeps answering: the lag grows in the metric, the log says
    so, "Replica behind" fires in a real Prometheus; when the store is back, the replica catches up."""
    from grafana_files import alert_rules, evaluate

    binary = require_tool("prometheus")
    server = Server(tmp_path / "audit.db", tmp_path / "server.log", replica_env(store, "behind")).start()
    prometheus = Prometheus(binary, f"127.0.0.1:{server.port}", tmp_path)
    rule = next(r for r in alert_rules() if r["uid"] == "topic-audit-replica-behind")
    try:
        load = Load(server, "behind")
        wait_for(
            lambda: prometheus.query("topic_audit_replica_lag_seconds"),
            30,
            "Prometheus to scrape the lag",
            0.2,
        )
        assert not evaluate(rule, prometheus.query)
        store.pause()
        paused = time.monotonic()
        try:
            wait_for(lambda: evaluate(rule, prometheus.query), 60, "Replica behind to fire")
            fired = time.monotonic() - paused
        finally:
            store.resume()
        wait_for(lambda: metric(server, "topic_audit_replica_lag_seconds") < 2, 60, "the replica to catch up")
        load.stop()
    finally:
        prometheus.stop()
        server.stop()
    print(f"\nReplica behind fired {fired:.1f} s after the store stopped answering")
    assert load.failed == 0 and len(load.acknowledged) > 100
    assert "the replica is" in server.log.read_text() and "the replica caught up" in server.log.read_text()


def test_a_restore_after_an_erasure_holds_no_erased_value(store: SeaweedFS, tmp_path: Path) -> None:
    """erase while serve replicates; once the replica has caught up, the latest copy restored elsewhere
    holds no erased value (older snapshots in the store keep them until their retention expires)."""
    db = tmp_path / "audit.db"
    env = replica_env(store, "erased")
    server = Server(db, tmp_path / "server.log", env).start()
    try:
        for i in range(5):
            assert send(server.url, message(SUBJECT if i % 2 else "leckie", f"text {i}")).status_code == 200
        erased = run_cli(
            "erase", "--db", str(db), "--account", SUBJECT, "--reason", "drill", "--yes", env=env, timeout=300
        )
        assert erased.returncode == 0, erased.stdout + erased.stderr
        assert (
            "erased 2 entries" in erased.stdout and "off-box replica keeps older snapshots" in erased.stdout
        )
        # Litestream holds the WAL open, so erase says whether it could truncate it (README, Privacy)
        assert send(server.url, message("leckie", "after")).status_code == 200
        wait_for(
            lambda: metric(server, "topic_audit_replica_lag_seconds") == 0, 30, "the replica to catch up"
        )
        time.sleep(1)  # a sync interval past the last change
    finally:
        server.stop()
    restored = tmp_path / "restored" / "audit.db"
    restored.parent.mkdir()
    result = run_cli("restore", "--to", str(restored), env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(rows(restored)) == 6
    assert holding(restored, SUBJECT.encode()) == [] and holding(restored, b"leckie")
    checked = run_cli("verify", "--db", str(restored), "--json", env=env, timeout=300)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def _copies(db: Path, needle: bytes) -> list[str]:
    """Every file of the database and of Litestream's local folder whose raw bytes hold ``needle``."""
    found = []
    for path in sorted(db.parent.rglob("*")):
        named = path.name.startswith(db.name) or any(p.name.startswith(f".{db.name}") for p in path.parents)
        if path.is_file() and named and needle in path.read_bytes():
            found.append(str(path.relative_to(db.parent)))
    return found


def test_erase_says_no_copy_remains_only_when_none_does(store: SeaweedFS, tmp_path: Path) -> None:
    """With serve replicating, Litestream holds the WAL open and keeps local copies of recent pages: no
    run of erase may say "no copy remains" while a file still holds an erased value; once serve has
    stopped, erase purges the WAL and Litestream's local folder, and a raw scan of every file agrees."""
    db = tmp_path / "audit.db"
    env = replica_env(store, "purge-status")
    secret = b"zqxjkv-purge-status"
    erase = ("erase", "--db", str(db), "--account", SUBJECT, "--reason", "status", "--yes")
    server = Server(db, tmp_path / "server.log", env).start()
    try:
        for i in range(6):
            if i % 2:
                sent = send(server.url, message(SUBJECT, f"{secret.decode()} {i}"), client_ip=SUBJECT_IP)
            else:
                sent = send(server.url, message("leckie", f"text {i}"))
            assert sent.status_code == 200
        litestream = f".{db.name}-litestream"
        wait_for(
            lambda: any(c.startswith(litestream) for c in _copies(db, SUBJECT.encode())),
            30,
            "Litestream to copy the pages holding them",
        )
        assert _copies(db, SUBJECT.encode())
        for _ in range(2):  # the review's second run said "no copy remains" while the WAL held them
            done = run_cli(*erase, env=env, timeout=300)
            assert done.returncode == 0, done.stdout + done.stderr
            held = {needle: _copies(db, needle) for needle in (SUBJECT.encode(), secret, SUBJECT_IP.encode())}
            assert "no copy remains" not in done.stdout or not any(held.values()), (done.stdout, held)
            assert "NOT YET PURGED" in done.stdout and f"{db.name}-wal" in done.stdout, done.stdout
    finally:
        server.stop()
    last = run_cli(*erase, env=env, timeout=300)
    assert last.returncode == 0, last.stdout + last.stderr
    assert "no copy remains" in last.stdout, last.stdout
    for needle in (SUBJECT.encode(), secret, SUBJECT_IP.encode()):
        assert _copies(db, needle) == [], needle
    assert not (tmp_path / f".{db.name}-litestream").exists()
