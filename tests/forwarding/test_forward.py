"""Forwarding, end to end: a real ``serve`` process in front of a real destination server (tests/destination.py)
that succeeds, vetoes, fails, hangs, flaps, redirects or answers garbage."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    APP_ID,
    TOKEN,
    Server,
    alter,
    deliver_concurrently,
    listening_port,
    metric,
    rows,
    run_cli,
    wait_for,
)
from destination import OK, VETO, Destination
from topic_audit.forwarding.sending import destination_label
from topic_audit.tencent import checks, samples

BEFORE = "Group.CallbackBeforeCreateTopic"


@pytest.fixture
def destination() -> Iterator[Destination]:
    running = Destination()
    yield running
    running.stop()


def start(tmp_path: Path, *destinations: Destination | str, **settings: str) -> Server:
    urls = " ".join(d if isinstance(d, str) else d.url for d in destinations)
    env = {"TOPIC_AUDIT_FORWARD_URL": urls, "TOPIC_AUDIT_CHECKPOINT_SECONDS": "0"}
    env |= {f"TOPIC_AUDIT_{name.upper()}": value for name, value in settings.items()}
    return Server(tmp_path / "audit.db", tmp_path / "server.log", env).start()


@pytest.fixture
def stopping() -> Iterator[list[Server]]:
    servers: list[Server] = []
    yield servers
    for server in servers:
        server.stop()


def deliver(server: Server, name: str, request_time: float | None = None, **changes: Any) -> httpx.Response:
    body = samples.sample(name, **changes)
    query = samples.query(APP_ID, body["CallbackCommand"], TOKEN, now=request_time)
    return httpx.post(
        f"{server.url}/callback?{query}",
        content=json.dumps(body).encode(),
        headers={"content-type": "application/json; charset=utf-8"},
        timeout=10,
    )


def table(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


def test_after_callbacks_arrive_byte_identical_and_freshly_signed(
    tmp_path: Path, destination: Destination, stopping: list[Server]
) -> None:
    server = start(tmp_path, destination)
    stopping.append(server)
    sent_at = time.time() - 40  # Tencent's signature is 40 s old by the time it is passed on
    for name in ("after-create", "info-changed", "destroyed", "group-created"):
        assert deliver(server, name, request_time=sent_at).status_code == 200
    bad = httpx.post(f"{server.url}/callback?{samples.query(APP_ID, 'X', 'wrong-token')}", content=b"{}")
    assert bad.status_code == 401  # never forwarded
    wait_for(lambda: len(table(server.db, "SELECT id FROM deliveries")) == 4, what="4 deliveries recorded")
    logged = {r["id"]: r for r in rows(server.db)}
    for got in destination.received:
        entry = logged[got.audit_id]  # type: ignore[index]
        assert got.body == entry["request_body"].encode()  # byte-identical
        assert got.headers["x-topic-audit-attempt"] == "1"
        assert got.headers["content-type"] == "application/json; charset=utf-8"
        assert got.path == "/im/callback"
        sent, forwarded = checks.parse_query(entry["query_string"]), got.query
        assert {k: v for k, v in forwarded.items() if k not in ("RequestTime", "Sign")} == {
            k: v for k, v in sent.items() if k not in ("RequestTime", "Sign")
        }
        assert abs(int(forwarded["RequestTime"]) - got.at) <= 2  # re-signed at the attempt
        assert forwarded["Sign"] == checks.sign(TOKEN, forwarded["RequestTime"])
        assert list(forwarded) == list(sent)  # same parameters in the same order
    deliveries = table(server.db, "SELECT * FROM deliveries ORDER BY id")
    assert sorted(d["audit_id"] for d in deliveries) == [1, 2, 3, 4]
    assert {(d["kind"], d["status_code"], d["error"], d["replay"]) for d in deliveries} == {
        ("after", 200, None, 0)
    }
    assert {r["state"] for r in table(server.db, "SELECT state FROM outbox")} == {"delivered"}
    # reported by the delivery process to serve's /metrics within a quarter of a second
    wait_for(
        lambda: metric(server, "topic_audit_forward_attempts_total", result="delivered") == 4, 5, "metrics"
    )
    server.stop()
    assert run_cli("verify", "--db", str(server.db)).returncode == 0


@pytest.mark.parametrize("mode", ["veto", "ok"])
def test_the_apps_answer_to_a_before_callback_is_relayed_byte_for_byte(
    tmp_path: Path, mode: str, stopping: list[Server]
) -> None:
    destination = Destination(mode)
    try:
        server = start(tmp_path, destination)
        stopping.append(server)
        answer = deliver(server, "before-create")
        expected = VETO if mode == "veto" else OK
        assert (answer.status_code, answer.content) == (200, expected)
        (got,) = destination.received
        assert "x-topic-audit-id" not in got.headers  # the entry has no id until the app has answered
        assert got.query["Sign"] == checks.sign(TOKEN, got.query["RequestTime"])
        (row,) = rows(server.db)
        assert row["response_body"].encode() == expected  # the log records what Tencent was answered
        assert "answered by the app's handler" in row["detail"]
        (delivery,) = table(server.db, "SELECT * FROM deliveries")
        assert (delivery["audit_id"], delivery["kind"], delivery["status_code"], delivery["error"]) == (
            1,
            "before",
            200,
            None,
        )
        assert table(server.db, "SELECT * FROM outbox") == []  # never retried
    finally:
        destination.stop()


@pytest.mark.parametrize(
    ("mode", "error", "cause"),
    [
        ("hang", "timeout", "no complete answer within 1.5 s"),
        ("fail", "http_error", "HTTP 500"),
        ("redirect", "http_error", "HTTP 302"),
        ("garbage", "http_error", "not a JSON object with ActionStatus and ErrorCode"),
        ("dead", "connection_error", "Cannot connect to host"),
    ],
)
@pytest.mark.parametrize("on_failure", ["allow", "reject"])
def test_a_before_callback_is_answered_within_2_s_whatever_the_app_does(
    tmp_path: Path, mode: str, error: str, cause: str, on_failure: str, stopping: list[Server]
) -> None:
    destination = Destination("ok" if mode == "dead" else mode)
    url = destination.url
    if mode == "dead":
        destination.stop()  # nothing listens there any more
    try:
        server = start(tmp_path, url, forward_before_on_failure=on_failure)
        stopping.append(server)
        started = time.monotonic()
        answer = deliver(server, "before-create")
        seconds = time.monotonic() - started
        assert seconds < 2.0, seconds
        body = answer.json()
        assert answer.status_code == 200
        assert body["ErrorCode"] == (0 if on_failure == "allow" else 1)
        (row,) = rows(server.db)
        assert row["response_body"] == answer.text
        assert f"answered {on_failure}" in row["detail"]
        (delivery,) = table(server.db, "SELECT * FROM deliveries")
        assert delivery["error"] == error and cause in delivery["detail"], delivery
        assert metric(server, "topic_audit_forward_attempts_total", result=error) == 1
    finally:
        destination.stop()


def test_the_retry_schedule_is_followed_recorded_and_replayed(tmp_path: Path, stopping: list[Server]) -> None:
    destination = Destination("fail")
    try:
        server = start(tmp_path, destination, forward_retry_schedule="0,1,2")
        stopping.append(server)
        assert deliver(server, "after-create").status_code == 200
        wait_for(
            lambda: table(server.db, "SELECT state FROM outbox") == [{"state": "failed"}],
            15,
            "the schedule to end",
        )
        attempts = table(server.db, "SELECT * FROM deliveries ORDER BY id")
        assert [(a["attempt"], a["status_code"], a["error"], a["detail"]) for a in attempts] == [
            (n, 500, "http_error", "HTTP 500") for n in (1, 2, 3)
        ]
        times = [r.at for r in destination.received]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert 0.9 <= gaps[0] < 1.9 and 1.9 <= gaps[1] < 2.9, gaps  # 1 s, then 2 s
        assert [r.headers["x-topic-audit-attempt"] for r in destination.received] == ["1", "2", "3"]
        (state,) = table(server.db, "SELECT * FROM outbox")
        assert (state["attempts"], state["last_error"]) == (3, "http_error: HTTP 500")
        wait_for(lambda: metric(server, "topic_audit_forward_failed_total") == 1, 5, "the exhausted metric")

        destination.mode = "ok"
        replayed = run_cli("replay", "--db", str(server.db), "--failed")
        assert replayed.returncode == 0 and "queued 1 deliveries" in replayed.stdout, replayed
        wait_for(
            lambda: table(server.db, "SELECT state FROM outbox") == [{"state": "delivered"}], 10, "the replay"
        )
        last = table(server.db, "SELECT * FROM deliveries ORDER BY id DESC LIMIT 1")[0]
        assert (last["attempt"], last["status_code"], last["replay"]) == (4, 200, 1)
        assert destination.received[-1].headers["x-topic-audit-attempt"] == "4"
    finally:
        destination.stop()


def test_a_flapping_destination_gets_everything(tmp_path: Path, stopping: list[Server]) -> None:
    destination = Destination("flap")
    try:
        server = start(tmp_path, destination, forward_retry_schedule="0,0,1,1,1")
        stopping.append(server)
        for n in range(10):
            assert deliver(server, "after-create", TopicId=f"@TGS#_g@TOPIC#_flap{n}").status_code == 200
        wait_for(
            lambda: (
                table(server.db, "SELECT count(*) AS n FROM outbox WHERE state = 'delivered'")[0]["n"] == 10
            ),
            20,
            "every delivery",
        )
        attempts = table(server.db, "SELECT error FROM deliveries")
        assert len(attempts) > 10 and {a["error"] for a in attempts} == {None, "http_error"}
        assert destination.ids() == set(range(1, 11))
    finally:
        destination.stop()


@pytest.mark.parametrize("dead", ["hang", "refused"])
def test_fan_out_where_one_destination_is_dead(tmp_path: Path, dead: str, stopping: list[Server]) -> None:
    live, stuck = Destination("ok"), Destination("hang")
    url = stuck.url
    if dead == "refused":
        stuck.stop()
    try:
        server = start(tmp_path, live, url, forward_timeout_seconds="30")
        stopping.append(server)
        latencies = []
        for n in range(60):
            started = time.monotonic()
            assert deliver(server, "after-create", TopicId=f"@TGS#_g@TOPIC#_fan{n}").status_code == 200
            latencies.append(time.monotonic() - started)
        wait_for(lambda: live.ids() == set(range(1, 61)), 15, "the live destination to get all 60")
        assert max(latencies) < 0.5, max(latencies)  # the dead one never slows Tencent's answers
        pending = table(
            server.db, "SELECT count(*) AS n FROM outbox WHERE destination = ? AND state = 'pending'", (url,)
        )[0]["n"]
        assert pending == 60
        wait_for(
            lambda: metric(server, "topic_audit_forward_pending", destination=url.split("/")[2]) == 60, 5
        )
    finally:
        live.stop()
        stuck.stop()


def test_sigkill_with_hundreds_of_deliveries_pending(tmp_path: Path, stopping: list[Server]) -> None:
    destination = Destination("hang")  # holds every attempt: the outbox fills up
    server = start(tmp_path, destination, forward_timeout_seconds="60")
    try:
        for n in range(300):
            assert deliver(server, "after-create", TopicId=f"@TGS#_g@TOPIC#_kill{n}").status_code == 200
        pending = table(server.db, "SELECT count(*) AS n FROM outbox WHERE state = 'pending'")[0]["n"]
        assert pending == 300
        assert server.process is not None
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=10)
    finally:
        destination.stop()
    revived = Destination("ok")
    try:
        env = {"TOPIC_AUDIT_FORWARD_URL": revived.url, "TOPIC_AUDIT_CHECKPOINT_SECONDS": "0"}
        again = Server(server.db, tmp_path / "server.log", env).start()
        stopping.append(again)
        # the outbox named the old destination: point it at the new port the way an operator would
        moved = run_cli(
            "replay", "--db", str(server.db), "--from-id", "1", "--to-id", "300", "--destination", revived.url
        )
        assert moved.returncode == 0, moved.stderr
        committed = {r["id"] for r in rows(server.db)}
        wait_for(lambda: revived.ids() >= committed, 30, "every committed row to reach the destination")
        assert len(committed) == 300
    finally:
        revived.stop()


def test_restart_delivers_what_was_pending_to_the_same_destination(
    tmp_path: Path, stopping: list[Server]
) -> None:
    destination = Destination("hang")
    server = start(tmp_path, destination, forward_timeout_seconds="60")
    for n in range(100):
        assert deliver(server, "after-create", TopicId=f"@TGS#_g@TOPIC#_r{n}").status_code == 200
    assert server.process is not None
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=10)
    destination.mode = "ok"
    destination._released.set()  # the hung attempts end; their answers reach nobody
    env = {k: v for k, v in server.env.items() if k.startswith("TOPIC_AUDIT_FORWARD")}
    again = Server(server.db, tmp_path / "server.log", env).start()
    stopping.append(again)
    try:
        wait_for(
            lambda: (
                table(server.db, "SELECT count(*) AS n FROM outbox WHERE state = 'delivered'")[0]["n"] == 100
            ),
            30,
            "the outbox to drain after the restart",
        )
        assert destination.ids() == set(range(1, 101))
    finally:
        destination.stop()


def test_deliveries_is_append_only_and_verify_catches_an_edit(
    tmp_path: Path, destination: Destination, stopping: list[Server]
) -> None:
    server = start(tmp_path, destination)
    stopping.append(server)
    for n in range(5):
        deliver(server, "after-create", TopicId=f"@TGS#_g@TOPIC#_v{n}")
    wait_for(lambda: len(table(server.db, "SELECT id FROM deliveries")) == 5, 10, "5 deliveries")
    server.stop()
    assert run_cli("checkpoint", "--db", str(server.db)).returncode == 0
    conn = sqlite3.connect(server.db)
    for statement in (
        "UPDATE deliveries SET status_code = 500 WHERE id = 2",
        "DELETE FROM deliveries WHERE id = 5",
    ):
        with pytest.raises(sqlite3.IntegrityError, match="deliveries is append-only"):
            conn.execute(statement)
    with pytest.raises(sqlite3.IntegrityError, match="ids must continue"):
        conn.execute(
            "INSERT INTO deliveries (id, audit_id, destination, kind, attempt, started_at, elapsed_ms, replay, "
            "prev_hash, entry_hash) VALUES (9, 1, 'x', 'after', 1, 'now', 1, 0, 'x', 'x')"
        )
    conn.close()
    assert run_cli("verify", "--db", str(server.db)).returncode == 0

    alter(server.db, "UPDATE deliveries SET status_code = 500, error = 'http_error' WHERE id = 2")
    found = run_cli("verify", "--db", str(server.db), "--json")
    assert found.returncode == 1
    checks_found = {f["check"]: f["message"] for f in json.loads(found.stdout)["findings"]}
    assert "delivery 2" in checks_found["delivery_hash"], checks_found


def test_a_cut_off_deliveries_tail_is_caught_by_the_checkpoints(
    tmp_path: Path, destination: Destination, stopping: list[Server]
) -> None:
    server = start(tmp_path, destination)
    stopping.append(server)
    for n in range(3):
        deliver(server, "after-create", TopicId=f"@TGS#_g@TOPIC#_t{n}")
    wait_for(lambda: len(table(server.db, "SELECT id FROM deliveries")) == 3, 10, "3 deliveries")
    server.stop()
    assert run_cli("checkpoint", "--db", str(server.db)).returncode == 0
    alter(server.db, "DELETE FROM deliveries WHERE id = 3")  # the chain alone still holds
    found = run_cli("verify", "--db", str(server.db), "--json")
    assert found.returncode == 1
    assert {f["check"] for f in json.loads(found.stdout)["findings"]} == {"checkpoint_deliveries"}


def test_replay_by_id_range_and_destination(
    tmp_path: Path, destination: Destination, stopping: list[Server]
) -> None:
    server = start(tmp_path, destination)
    stopping.append(server)
    deliver(server, "before-create")  # entry 1: a Before-callback, never replayed
    for n in range(4):
        deliver(server, "after-create", TopicId=f"@TGS#_g@TOPIC#_p{n}")
    wait_for(lambda: destination.ids() == {2, 3, 4, 5}, 10, "the first deliveries")
    other = Destination("ok")
    try:
        result = run_cli(
            "replay", "--db", str(server.db), "--from-id", "1", "--to-id", "3", "--destination", other.url
        )
        assert result.returncode == 0 and "queued 2 deliveries" in result.stdout, result
        wait_for(lambda: other.ids() == {2, 3}, 10, "the replay to the other destination")
        one = run_cli(
            "replay", "--db", str(server.db), "--id", "5", env={"TOPIC_AUDIT_FORWARD_URL": destination.url}
        )
        assert one.returncode == 0, one
        wait_for(lambda: [r.audit_id for r in destination.received].count(5) == 2, 10, "entry 5 again")
        replayed = "SELECT audit_id, destination, attempt FROM deliveries WHERE replay = 1 ORDER BY id"
        # attempts are recorded a few times a second, after the destination has them
        wait_for(lambda: len(table(server.db, replayed)) == 3, 10, "the replays recorded")
        replays = table(server.db, replayed)
        assert sorted((r["audit_id"], r["attempt"]) for r in replays) == [(2, 1), (3, 1), (5, 2)]
        nothing = run_cli("replay", "--db", str(server.db), "--id", "1", "--destination", other.url)
        assert "nothing to replay" in nothing.stdout
    finally:
        other.stop()


def delivery_processes(serve: int) -> list[int]:
    """The delivery processes below ``serve`` (its supervisor's child, however many workers)."""
    parents: dict[int, int] = {}
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if b"topic_audit.serve.delivery_process" in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile

    def below(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == serve:
                return True
        return False

    return [pid for pid in found if below(pid)]


def test_with_two_workers_each_callback_is_attempted_once_per_destination_per_round(
    tmp_path: Path, stopping: list[Server]
) -> None:
    """``serve --workers 2`` has one delivery process, which both workers wake: no callback reaches a
    destination twice in one round (nor is recorded twice)."""
    fast, slow = Destination("ok"), Destination("slow", delay=0.05)  # slow: attempts overlap the looks
    count = 80
    try:
        server = start(tmp_path, fast, slow, workers="2", server="uvicorn")
        stopping.append(server)
        assert server.process is not None
        pid = server.process.pid
        wait_for(lambda: len(delivery_processes(pid)) == 1, 20, "the delivery process")
        children = sorted(delivery_processes(pid))

        def niceness(process: int) -> int:
            return int(Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()[16])

        # the answers go first when the cores are short (set as the delivery process starts)
        yielding = min(niceness(pid) + 10, 19)  # (Linux stops at 19)
        wait_for(lambda: niceness(children[0]) == yielding, 10, "the delivery process to yield")

        answers = deliver_concurrently(server.url, count, "@TGS#_g@TOPIC#_w")
        assert [a.status_code for a in answers] == [200] * count
        settled = "SELECT count(*) AS n FROM outbox WHERE state = 'delivered'"
        wait_for(lambda: table(server.db, settled)[0]["n"] == 2 * count, 30, "the first round")
        urls = {"TOPIC_AUDIT_FORWARD_URL": f"{fast.url} {slow.url}"}
        replayed = run_cli(
            "replay", "--db", str(server.db), "--from-id", "1", "--to-id", str(count), env=urls
        )
        assert replayed.returncode == 0 and f"queued {2 * count} deliveries" in replayed.stdout, replayed
        wait_for(lambda: table(server.db, settled)[0]["n"] == 2 * count, 30, "the replayed round")
        assert (
            sorted(delivery_processes(pid)) == children
        )  # the same one: it did not die and was not replaced
        server.stop()  # the delivery process records what it attempted, and nothing is sent afterwards
    finally:
        fast.stop()
        slow.stop()
    ids = set(range(1, count + 1))
    for destination in (fast, slow):
        sent = Counter((r.audit_id, r.headers["x-topic-audit-attempt"]) for r in destination.received)
        assert sent == {(n, attempt): 1 for n in ids for attempt in ("1", "2")}  # once a round, no more
    recorded = table(server.db, "SELECT audit_id, destination, replay, attempt FROM deliveries")
    rounds = Counter((r["audit_id"], r["destination"], r["replay"]) for r in recorded)
    assert rounds == {(n, d.url, replay): 1 for n in ids for d in (fast, slow) for replay in (0, 1)}
    assert {(r["replay"], r["attempt"]) for r in recorded} == {(0, 1), (1, 2)}


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("TOPIC_AUDIT_FORWARD_URL", "localhost:8080/cb", "TOPIC_AUDIT_FORWARD_URL"),
        ("TOPIC_AUDIT_FORWARD_URL", "http://a:99999/cb", "TOPIC_AUDIT_FORWARD_URL"),
        ("TOPIC_AUDIT_FORWARD_RETRY_SCHEDULE", "0,5,soon", "TOPIC_AUDIT_FORWARD_RETRY_SCHEDULE"),
        ("TOPIC_AUDIT_FORWARD_RETRY_SCHEDULE", "0,-5", "TOPIC_AUDIT_FORWARD_RETRY_SCHEDULE"),
        ("TOPIC_AUDIT_FORWARD_BEFORE_TIMEOUT_SECONDS", "2.5", "TOPIC_AUDIT_FORWARD_BEFORE_TIMEOUT_SECONDS"),
        ("TOPIC_AUDIT_FORWARD_BEFORE_ON_FAILURE", "maybe", "TOPIC_AUDIT_FORWARD_BEFORE_ON_FAILURE"),
    ],
)
def test_bad_forwarding_settings_are_refused_at_start_up(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    env = {
        "TOPIC_AUDIT_SDKAPPID": APP_ID,
        "TOPIC_AUDIT_DB": str(tmp_path / "audit.db"),
        "TOPIC_AUDIT_FORWARD_URL": "http://127.0.0.1:9/cb",
        variable: value,
    }
    result = run_cli("serve", env=env)
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(error) == 1 and message in error[0], result.stderr
    assert not (tmp_path / "audit.db").exists()


def test_the_demo_sink_checks_signatures_and_can_veto(tmp_path: Path) -> None:
    log = tmp_path / "sink.log"
    env = {**os.environ, "TOPIC_AUDIT_TOKEN": TOKEN, "TOPIC_AUDIT_SINK_PORT": "0"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "topic_audit.cli", "sink", "--veto"], env=env, stdout=out, stderr=out
        )
    try:
        port = listening_port(process, log)  # bound by the sink itself
        url = f"http://127.0.0.1:{port}/callback"
        wait_for(lambda: _answers(url), 10, "the sink")
        assert f"sink on http://127.0.0.1:{port}/ " in log.read_text()  # it says where it listens
        before = httpx.post(
            f"{url}?{samples.query(APP_ID, BEFORE, TOKEN)}", json=samples.sample("before-create")
        )
        assert before.json()["ErrorCode"] == 1
        after = httpx.post(
            f"{url}?{samples.query(APP_ID, 'Group.CallbackAfterCreateTopic', 'wrong')}", json={}
        )
        assert after.json() == json.loads(OK)
    finally:
        process.terminate()
        process.wait(timeout=10)
    lines = [line for line in log.read_text().splitlines() if line.startswith("sink: ")]
    assert "Sign valid" in lines[-2] and lines[-2].endswith("-> 1")
    assert "Sign INVALID" in lines[-1] and lines[-1].endswith("-> 0")


def _answers(url: str) -> bool:
    try:
        httpx.post(url, content=b"{}", timeout=1)
    except httpx.HTTPError:
        return False
    return True


def test_the_outbox_is_rebuilt_from_the_log_and_the_deliveries(
    tmp_path: Path, stopping: list[Server]
) -> None:
    flapping, failing = Destination("flap"), Destination("fail")
    try:
        server = start(tmp_path, flapping, failing, forward_retry_schedule="0,0,1")
        stopping.append(server)
        deliver(server, "before-create")  # never in the outbox
        for n in range(6):
            deliver(server, "after-create", TopicId=f"@TGS#_g@TOPIC#_rb{n}")
        settled = "SELECT count(*) AS n FROM outbox WHERE state != 'pending'"
        wait_for(lambda: table(server.db, settled)[0]["n"] == 12, 20, "every delivery to settle")
        server.stop()
    finally:
        flapping.stop()
        failing.stop()
    state = "SELECT audit_id, destination, state, attempts FROM outbox ORDER BY audit_id, destination"
    before = table(server.db, state)
    assert {r["state"] for r in before} == {"delivered", "failed"}
    alter(server.db, "DELETE FROM outbox")
    env = {
        "TOPIC_AUDIT_FORWARD_URL": f"{flapping.url} {failing.url}",
        "TOPIC_AUDIT_FORWARD_RETRY_SCHEDULE": "0,0,1",
    }
    rebuilt = run_cli("rebuild-outbox", "--db", str(server.db), env=env)
    assert rebuilt.returncode == 0 and "12 rows" in rebuilt.stdout, rebuilt.stdout + rebuilt.stderr
    assert table(server.db, state) == before


def test_the_app_alone_delivers_on_its_own_loop(tmp_path: Path, destination: Destination) -> None:
    """Without ``serve`` (tests, tools), the app delivers what it queued itself, recorded through its
    writer, its metrics its own."""
    from litestar.testing import TestClient
    from topic_audit.metrics import Metrics
    from topic_audit.receiver.app import create_app
    from topic_audit.settings import Settings

    db = tmp_path / "audit.db"
    metrics = Metrics()
    settings = Settings(sdk_app_id=APP_ID, token=TOKEN, db=db, forward_url=(destination.url,))
    with TestClient(create_app(settings, metrics)) as client:
        for n in range(3):
            body = samples.sample("after-create", TopicId=f"@TGS#_g@TOPIC#_alone{n}")
            query = samples.query(APP_ID, body["CallbackCommand"], TOKEN)
            assert client.post(f"/callback?{query}", content=json.dumps(body).encode()).status_code == 200
        wait_for(lambda: destination.ids() == {1, 2, 3}, 10, "the three deliveries")
        wait_for(
            lambda: (
                metrics.registry.get_sample_value(
                    "topic_audit_forward_attempts_total",
                    {"destination": destination_label(destination.url), "result": "delivered"},
                )
                == 3
            ),
            5,
            "the attempts' metrics",
        )
    assert len(table(db, "SELECT * FROM deliveries")) == 3
