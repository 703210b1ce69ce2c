"""The outbox and the deliveries chain on a real SQLite file (no HTTP): rounds, the schedule, replays,
and which rejections are never forwarded."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path
from urllib.parse import urlencode

import pytest
from topic_audit import metrics
from topic_audit.forwarding import outbox
from topic_audit.log.database import connect
from topic_audit.log.migrations import migrate
from topic_audit.settings import Settings
from topic_audit.tencent import checks, samples

AT = "2026-11-25T10:00:00.000Z"
URL = "http://app.example/cb"


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    db = tmp_path / "audit.db"
    migrate(db)
    conn = connect(db)
    conn.execute(
        "INSERT INTO audit_log (id, received_at, method, path, query_string, request_headers, request_body, "
        "request_body_sha256, request_body_bytes, status_code, response_body, outcome, prev_hash, entry_hash) "
        "VALUES (1, ?, 'POST', '/callback', '', '{}', ?, '', 0, 200, '', 'accepted', '', '')",
        (AT, json.dumps(samples.sample("after-create"))),
    )
    conn.execute("BEGIN IMMEDIATE")
    outbox.queue(conn, [(1, URL, AT)], 0)
    conn.execute("COMMIT")
    return conn


def attempt(due: outbox.Due, delivered: bool) -> outbox.Attempt:
    return outbox.Attempt(
        due.audit_id,
        due.destination,
        "after",
        due.attempts + 1,
        AT,
        1.0,
        200 if delivered else 500,
        None if delivered else "http_error",
        None if delivered else "HTTP 500",
        None,
        due.replay,
        due.queued_at,
    )


def state(conn: sqlite3.Connection) -> tuple[str, int, int]:
    return conn.execute("SELECT state, attempts, step FROM outbox").fetchone()


def test_the_schedule_then_failed(conn: sqlite3.Connection) -> None:
    for n in (1, 2, 3):
        (due,) = outbox.due(conn, URL, "2100-01-01", 10)
        exhausted = outbox.record(conn, [attempt(due, False)], (0, 5, 300), AT)
        assert state(conn) == (("pending" if n < 3 else "failed"), n, n)
        assert len(exhausted) == (n == 3)
    assert outbox.due(conn, URL, "2100-01-01", 10) == []
    assert [r[0] for r in conn.execute("SELECT attempt FROM deliveries")] == [1, 2, 3]


def test_a_replay_queued_during_an_attempt_is_not_overwritten_by_it(conn: sqlite3.Connection) -> None:
    (due,) = outbox.due(conn, URL, "2100-01-01", 10)
    conn.execute("BEGIN IMMEDIATE")
    outbox.queue(conn, [(1, URL, "2026-11-25T10:00:05.000Z")], 0, replay=1)  # `replay --id 1` meanwhile
    conn.execute("COMMIT")
    outbox.record(conn, [attempt(due, True)], (0, 5), AT)  # the first attempt ends afterwards
    assert state(conn)[0] == "pending"  # the replay still stands
    (again,) = outbox.due(conn, URL, "2100-01-01", 10)
    assert again.replay == 1
    outbox.record(conn, [attempt(again, True)], (0, 5), AT)
    assert state(conn)[0] == "delivered"
    assert conn.execute("SELECT count(*) FROM deliveries").fetchone()[0] == 2  # both attempts recorded


def test_skipped_entries_are_not_due(conn: sqlite3.Connection) -> None:
    assert outbox.due(conn, URL, "2100-01-01", 10, skip=[1]) == []
    assert outbox.next_due(conn, URL) is not None


APP_ID, TOKEN = "1400000001", "policy-token"
NOW = 1_764_064_800.0


def _request(reason: str) -> checks.RawRequest:
    """A request that the checks reject with ``reason``."""
    body = samples.sample("after-create")
    signed = samples.query(APP_ID, body["CallbackCommand"], TOKEN, now=NOW)
    fields = dict(p.split("=", 1) for p in signed.split("&"))
    changes: dict[str, object] = {}
    if reason == "method_not_allowed":
        changes["method"] = "GET"
    elif reason == "request_timeout":
        changes["timed_out"] = True
    elif reason == "body_too_large":
        changes["body_truncated"] = True
    elif reason == "header_timeout":
        changes["head_timed_out"] = True
    elif reason == "headers_too_large":
        changes["header_count"] = 101
    elif reason == "app_id_missing":
        del fields["SdkAppid"]
    elif reason == "app_id_mismatch":
        fields["SdkAppid"] = "1400000002"
    elif reason == "signature_missing":
        del fields["Sign"]
    elif reason == "request_time_skewed":
        fields["RequestTime"] = str(int(NOW) - 3600)
    elif reason == "signature_invalid":
        fields["Sign"] = "0" * 64
    elif reason == "malformed_json":
        changes["body"] = b"{not json"
    elif reason == "command_mismatch":
        changes["body"] = json.dumps(
            {**body, "CallbackCommand": "Group.CallbackAfterGroupDestroyed"}
        ).encode()
    elif reason == "invalid_payload":
        changes["body"] = json.dumps({**body, "TopicId": 7}).encode()
    request = checks.RawRequest("POST", "/callback", urlencode(fields), (), json.dumps(body).encode())
    return dataclasses.replace(request, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("reason", metrics.REASONS)
def test_never_forwarded_is_what_the_checks_do_not_authenticate(reason: str) -> None:
    """The outbox's policy, stated as a list of reasons, is the receiver's: a rejection is queued for the
    app's handler exactly when the checks passed the app id and the signature."""
    settings = Settings(sdk_app_id=APP_ID, token=TOKEN, sign_tolerance_seconds=60)
    decision = checks.decide(_request(reason), settings, NOW)
    assert (decision.outcome, decision.reason) == ("rejected", reason)
    assert (reason in outbox.NOT_FORWARDED) == (not decision.authenticated)


def test_replay_and_rebuild_skip_exactly_the_never_forwarded(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    migrate(db)
    conn = connect(db)
    reasons = [*metrics.REASONS, None]
    conn.executemany(
        "INSERT INTO audit_log (id, received_at, method, path, query_string, request_headers, request_body, "
        "request_body_sha256, request_body_bytes, status_code, response_body, outcome, reason, prev_hash, "
        "entry_hash) VALUES (?, ?, 'POST', '/callback', '', '{}', '{}', '', 2, ?, '', ?, ?, '', '')",
        [
            (n, AT, 200 if r is None else 400, "accepted" if r is None else "rejected", r)
            for n, r in enumerate(reasons, 1)
        ],
    )
    forwarded = {r for r in reasons if r not in outbox.NOT_FORWARDED}
    assert outbox.replay(conn, [URL], AT, ids=(1, len(reasons))) == len(forwarded)
    queued = "SELECT a.reason FROM outbox o JOIN audit_log a ON a.id = o.audit_id"
    assert {r[0] for r in conn.execute(queued)} == forwarded
    assert outbox.rebuild(conn, [URL], (0, 5), AT) == len(forwarded)
    assert {r[0] for r in conn.execute(queued)} == forwarded
