"""Every row of the contract's table of checks: status, outcome, reason, answer shape, and one log row."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import msgspec
import pytest
from conftest import APP_ID, TOKEN, Post, rows
from litestar.testing import TestClient
from topic_audit.receiver import app as app_module
from topic_audit.settings import Settings
from topic_audit.tencent import checks, models, samples


def assert_answer(response: Any, status: int, reason: str | None = None) -> dict[str, Any]:
    """The contract's JSON shape, exactly: three fields, OK/""/0 on 200, FAIL/reason.../status otherwise."""
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    answer = response.json()
    assert set(answer) == {"ActionStatus", "ErrorInfo", "ErrorCode"}
    if status == 200:
        assert answer == {"ActionStatus": "OK", "ErrorInfo": "", "ErrorCode": 0}
    else:
        assert answer["ActionStatus"] == "FAIL"
        assert answer["ErrorCode"] == status
        assert reason is not None and answer["ErrorInfo"].startswith(reason)
    return answer


CREATE = samples.sample("after-create")
CREATE_CMD = models.AFTER_CREATE


def _query(**changes: str | None) -> str:
    params = checks.parse_query(samples.query(APP_ID, CREATE_CMD, TOKEN))
    for name, value in changes.items():
        if value is None:
            params.pop(name, None)
        else:
            params[name] = value
    return "&".join(f"{k}={v}" for k, v in params.items())


def _an_hour_old() -> str:
    then = str(int(time.time()) - 3600)
    return _query(RequestTime=then, Sign=checks.sign(TOKEN, then))


REJECTIONS = [
    # (case id, query (signed when the test runs: a signature is good for 60 s), body, status, reason)
    ("app id missing", partial(_query, SdkAppid=None), CREATE, 403, "app_id_missing"),
    ("app id mismatch", partial(_query, SdkAppid="1400000002"), CREATE, 403, "app_id_mismatch"),
    ("sign missing", partial(_query, Sign=None), CREATE, 401, "signature_missing"),
    ("request time missing", partial(_query, RequestTime=None), CREATE, 401, "signature_missing"),
    ("request time not an integer", partial(_query, RequestTime="12ab"), CREATE, 401, "request_time_skewed"),
    (
        "request time too old",
        _an_hour_old,
        CREATE,
        401,
        "request_time_skewed",
    ),
    ("sign wrong", partial(_query, Sign="0" * 64), CREATE, 401, "signature_invalid"),
    (
        "sign of another token",
        partial(_query, Sign=checks.sign("other", "1")),
        CREATE,
        401,
        "signature_invalid",
    ),
    ("body not json", partial(_query), b"{not json", 400, "malformed_json"),
    ("body is an array", partial(_query), b"[1, 2]", 400, "malformed_json"),
    ("body not utf-8", partial(_query), b"\xff\xfe{}", 400, "malformed_json"),
    ("empty body", partial(_query), b"", 400, "malformed_json"),
    (
        "command mismatch",
        partial(_query),
        samples.sample("after-create", CallbackCommand=models.AFTER_DESTROYED),
        400,
        "command_mismatch",
    ),
    (
        "command absent from body",
        partial(_query),
        {k: v for k, v in CREATE.items() if k != "CallbackCommand"},
        400,
        "command_mismatch",
    ),
    (
        "topic id missing",
        partial(_query),
        {k: v for k, v in CREATE.items() if k != "TopicId"},
        400,
        "invalid_payload",
    ),
    ("name of wrong type", partial(_query), samples.sample("after-create", Name=42), 400, "invalid_payload"),
    (
        "custom data of wrong shape",
        partial(_query),
        samples.sample("after-create", UserDefinedDataList=[{"Key": 1}]),
        400,
        "invalid_payload",
    ),
    (
        "topic id list not a list",
        partial(_query, CallbackCommand=models.AFTER_DESTROYED),
        samples.sample("destroyed", TopicIdList="x"),
        400,
        "invalid_payload",
    ),
]


@pytest.mark.parametrize(
    ("query", "body", "status", "reason"), [r[1:] for r in REJECTIONS], ids=[r[0] for r in REJECTIONS]
)
def test_rejections_are_answered_and_recorded(
    client: TestClient[Any],
    settings: Settings,
    query: Callable[[], str],
    body: Any,
    status: int,
    reason: str,
) -> None:
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    response = client.post(f"/callback?{query()}", content=content)
    assert_answer(response, status, reason)
    [row] = rows(settings.db)
    assert (row["status_code"], row["outcome"], row["reason"]) == (status, "rejected", reason)
    assert row["response_body"] == response.text
    assert row["request_body_bytes"] == len(content)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "PROPFIND"])
def test_other_methods_are_rejected_and_recorded(
    client: TestClient[Any], settings: Settings, method: str
) -> None:
    response = client.request(method, f"/callback?{_query()}", content=b"{}")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    if method != "HEAD":
        assert_answer(response, 405, "method_not_allowed")
    [row] = rows(settings.db)
    assert (row["method"], row["outcome"], row["reason"]) == (method, "rejected", "method_not_allowed")


def test_declared_body_too_large(client: TestClient[Any], settings: Settings) -> None:
    content = b"x" * (settings.max_body_bytes + 1)
    response = client.post(f"/callback?{_query()}", content=content)
    assert_answer(response, 413, "body_too_large")
    [row] = rows(settings.db)
    assert row["reason"] == "body_too_large"
    assert row["request_body_bytes"] == 0  # nothing past a declared excess is read


def test_streamed_body_too_large_is_cut_at_the_limit(client: TestClient[Any], settings: Settings) -> None:
    chunk = b"y" * 8192

    def chunks() -> Any:  # no Content-Length: chunked transfer
        for _ in range(settings.max_body_bytes // len(chunk) + 4):
            yield chunk

    response = client.post(f"/callback?{_query()}", content=chunks())
    assert_answer(response, 413, "body_too_large")
    [row] = rows(settings.db)
    assert row["reason"] == "body_too_large"
    assert row["request_body_bytes"] == settings.max_body_bytes


def test_body_at_the_limit_is_read(client: TestClient[Any], settings: Settings) -> None:
    body = json.dumps(CREATE).encode()
    padded = body[:-1] + b" " * (settings.max_body_bytes - len(body)) + b"}"
    assert len(padded) == settings.max_body_bytes
    response = client.post(f"/callback?{_query()}", content=padded)
    assert_answer(response, 200)


def test_checks_run_in_the_contract_order(client: TestClient[Any], settings: Settings) -> None:
    # Wrong app id AND bad signature AND bad JSON: the app id decides.
    response = client.post(f"/callback?{_query(SdkAppid='1', Sign='bad')}", content=b"{bad")
    assert_answer(response, 403, "app_id_mismatch")
    # Bad signature AND bad JSON: the signature decides.
    response = client.post(f"/callback?{_query(Sign='bad')}", content=b"{bad")
    assert_answer(response, 401, "signature_invalid")
    # GET with a huge body: the method decides.
    response = client.request("GET", f"/callback?{_query()}", content=b"z" * (settings.max_body_bytes + 10))
    assert response.status_code == 405


def test_signature_is_not_required_without_a_token(db_path: Any) -> None:
    from topic_audit.receiver.app import create_app

    settings = Settings(sdk_app_id=APP_ID, token=None, db=db_path)
    with TestClient(create_app(settings)) as client:
        response = client.post(f"/callback?SdkAppid={APP_ID}&CallbackCommand={CREATE_CMD}", json=CREATE)
    assert_answer(response, 200)


def test_documented_signature_vector() -> None:
    assert checks.sign("xxxxyyyy", "1669872112") == (
        "17773bc39a671d7b9aa835458704d2a6db81360a5940292b587d6d760d484061"
    )


def test_request_time_within_tolerance_is_accepted(post: Post) -> None:
    then = int(time.time()) - 50
    query = samples.query(APP_ID, CREATE_CMD, TOKEN, now=then)
    assert_answer(post(CREATE, query=query), 200)


def test_uppercase_sign_is_accepted(post: Post) -> None:
    params = checks.parse_query(samples.query(APP_ID, CREATE_CMD, TOKEN))
    params["Sign"] = params["Sign"].upper()
    assert_answer(post(CREATE, query="&".join(f"{k}={v}" for k, v in params.items())), 200)


@pytest.mark.parametrize("name", sorted(samples.SAMPLES))
def test_documented_samples_pass(post: Post, settings: Settings, name: str) -> None:
    assert_answer(post(samples.sample(name)), 200)
    [row] = rows(settings.db)
    assert row["outcome"] in {"accepted", "ignored"}


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "garbage"])
def test_content_type_header_does_not_matter(post: Post, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    assert_answer(post(CREATE, headers=headers), 200)


@pytest.mark.parametrize(
    "platform",
    ["RESTAPI", "Web", "Android", "iOS", "IOS", "Windows", "Mac", "macOS", "iPad", "Unknown", "SomethingNew"],
)
def test_any_opt_platform_is_accepted(post: Post, settings: Settings, platform: str) -> None:
    query = samples.query(APP_ID, CREATE_CMD, TOKEN, platform=platform)
    assert_answer(post(CREATE, query=query), 200)
    assert rows(settings.db)[0]["opt_platform"] == platform


def test_group_and_unknown_commands_are_ignored(post: Post, settings: Settings) -> None:
    assert_answer(post(samples.sample("group-created")), 200)
    assert_answer(post({"CallbackCommand": "C2C.CallbackAfterSendMsg", "From_Account": "a"}), 200)
    assert [r["outcome"] for r in rows(settings.db)] == ["ignored", "ignored"]


@pytest.mark.parametrize("event_time", [1670574414123, "1670574414123"])
def test_event_time_as_integer_or_string(post: Post, event_time: Any) -> None:
    assert_answer(post(samples.sample("after-create", EventTime=event_time)), 200)


def test_unknown_fields_are_tolerated(post: Post) -> None:
    assert_answer(post(samples.sample("after-create", SomeFutureField={"x": [1, 2]})), 200)


def test_topic_id_need_not_start_with_group_id(post: Post, settings: Settings) -> None:
    # Tencent's own sample: GroupId @TGS#2J4SZEAEL, TopicId embedding another group.
    assert not samples.DOC_TOPIC.startswith(samples.DOC_GROUP)
    assert_answer(post(samples.sample("after-create")), 200)
    assert rows(settings.db)[0]["outcome"] == "accepted"


def test_long_cjk_name_within_sanity_bounds(post: Post) -> None:
    # 30 bytes is the documented limit; the bound is generous, not an exact gate.
    assert_answer(post(samples.sample("after-create", Name="话题" * 20)), 200)


def test_before_create_is_never_vetoed(post: Post, settings: Settings) -> None:
    assert_answer(post(samples.sample("before-create")), 200)
    assert_answer(post(b"{broken", models.BEFORE_CREATE), 200)
    assert_answer(post(samples.sample("before-create", Name=["not", "a", "string"])), 200)
    recorded = rows(settings.db)
    assert [(r["status_code"], r["outcome"]) for r in recorded] == [(200, "ignored")] * 3
    assert "malformed_json" in recorded[1]["detail"]
    assert "invalid_payload" in recorded[2]["detail"]


def test_before_create_still_needs_authentication(post: Post) -> None:
    query = samples.query(APP_ID, models.BEFORE_CREATE, "wrong-token")
    assert_answer(post(samples.sample("before-create"), query=query), 401, "signature_invalid")


def test_unexpected_failure_is_answered_500_and_recorded(
    client: TestClient[Any], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*args: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(checks, "_check_body", explode)
    response = client.post(f"/callback?{_query()}", json=CREATE)
    assert_answer(response, 500, "internal_error")
    [row] = rows(settings.db)
    assert (row["status_code"], row["outcome"], row["reason"]) == (500, "error", "internal_error")


def test_a_failure_past_the_checks_is_answered_500_in_the_json_shape(
    client: TestClient[Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The callback path is served before Litestar's router, and so outside its exception middleware:
    a bug there (here, building the row) still gets our JSON 500 and a logged traceback."""

    def explode(*args: Any) -> Any:
        raise RuntimeError("boom while building the row")

    monkeypatch.setattr(app_module, "build_row", explode)
    response = client.post(f"/callback?{_query()}", json=CREATE)
    assert_answer(response, 500, "internal_error")
    assert any(r.exc_info and "boom while building the row" in str(r.exc_info[1]) for r in caplog.records)


@pytest.mark.parametrize(("path", "method", "status"), [("/nope", "GET", 404), ("/healthz", "POST", 405)])
def test_errors_outside_the_callback_route_have_the_json_shape(
    client: TestClient[Any], path: str, method: str, status: int
) -> None:
    response = client.request(method, path)
    assert response.status_code == status
    answer = msgspec.json.decode(response.content, type=models.Answer)
    assert answer.ActionStatus == "FAIL" and answer.ErrorCode == status


def test_health_and_readiness(client: TestClient[Any]) -> None:
    assert_answer(client.get("/healthz"), 200)
    assert_answer(client.get("/readyz"), 200)
