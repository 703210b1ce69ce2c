"""Poisoned bodies: whatever anyone on the network sent and the receiver recorded -- nested past any
parser's depth, not UTF-8, cut short, numbers out of range, ``NaN``, not an object -- no later tool fails
on it (``erase`` by every selector, ``retain`` and serve's retention, ``rebuild-projection``, ``verify``,
Datasette's pages), and ``erase`` by account, topic or address still finds a data subject's values in
bodies that are not JSON and in query strings that hold them twice (SPEC, "Threat model" and "Retention
and erasure"). Forgetting is proven by scanning the raw bytes of every file in the data folder."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner
from conftest import APP_ID, TOKEN
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar.testing import TestClient
from topic_audit.auditor import explore
from topic_audit.cli import main
from topic_audit.log import chain, content, projection
from topic_audit.metrics import Metrics
from topic_audit.privacy import redaction, subjects
from topic_audit.receiver.app import create_app
from topic_audit.settings import Settings
from topic_audit.tencent import models, samples
from topic_audit.transparency.checkpoints import Signer
from topic_audit.writer import retention

SUBJECT = "erin"
OTHER = "leckie"
TEXT = "zqxjpoisonmeadow"
TEXT_TAIL = TEXT[3:].encode()  # FTS5 keeps a term after the prefix it shares with the one before
SUBJECT_IP = "203.0.113.77"
TOPIC = "@TGS#_poison@TOPIC#_kept"
SEND = "Group.CallbackAfterSendMsg"
DEEP = 1200
"""Deeper than msgspec (about 1,000) or Python's json decode."""


def nested(depth: int, opener: bytes = b"[", closer: bytes = b"]", inner: bytes = b"") -> bytes:
    return opener * depth + inner + closer * depth


def callback(extra: bytes, command: str = SEND, account: str = SUBJECT) -> bytes:
    """A callback body naming ``account`` and holding :data:`TEXT`, with ``extra`` bytes at its end."""
    return (
        f'{{"CallbackCommand":"{command}","From_Account":"{account}","TopicId":"{TOPIC}",'
        f'"MsgBody":[{{"MsgContent":{{"Text":"{TEXT}"}}}}],"y":'
    ).encode() + extra


POISON: dict[str, bytes] = {
    "nested arrays": callback(nested(DEEP) + b"}"),
    "nested objects": callback(nested(DEEP, b'{"a":', b"}", b"1") + b"}"),
    "nested near the limit": callback(nested(950) + b"}"),
    "cut short": callback(b"")[:-20],
    "not UTF-8": callback(b'"\xff\xfe\xc3"}'),
    "huge integer": callback(b"9" * 5000 + b"}"),
    "huge float": callback(b"1e99999}"),
    "huge string": callback(b'"' + b"x" * 40000 + b'"}'),
    "duplicate keys": callback(b'1,"From_Account":"' + SUBJECT.encode() + b'"}'),
    "not an object": b'["' + SUBJECT.encode() + b'",' + callback(b"1}") + b"]",
    "NaN": callback(b"NaN}"),
    "lone surrogate": callback(b'"\\ud800"}'),
    "TopicIdList nested": b'{"CallbackCommand":"Group.CallbackAfterTopicDestroyed","TopicIdList":'
    + nested(DEEP)
    + b"}",
    "empty": b"",
}
COMMANDS = (SEND, models.AFTER_CREATE, models.AFTER_INFO_CHANGED, models.AFTER_DESTROYED)


def post_all(client: TestClient[Any], bodies: list[bytes], client_ip: str = SUBJECT_IP) -> None:
    """Each body under every command, once from our app and once from another (403): every one recorded."""
    for body in bodies:
        for command in COMMANDS:
            for app in (APP_ID, "1400000999"):
                query = samples.query(app, command, TOKEN, client_ip=client_ip)
                response = client.post(f"/callback?{query}", content=body)
                assert response.status_code in (200, 400, 403), response.text


def poisoned_log(folder: Path, bodies: list[bytes]) -> Path:
    """A log under ``folder`` holding ``bodies`` as the receiver recorded them (and one ordinary
    callback of another account), with serve stopped."""
    db = folder / "audit.db"
    with TestClient(create_app(Settings(sdk_app_id=APP_ID, token=TOKEN, db=db, checkpoint_seconds=0))) as c:
        post_all(c, bodies)
        ordinary = samples.sample("after-create", TopicId=TOPIC, Operator_Account=OTHER)
        query = samples.query(APP_ID, models.AFTER_CREATE, TOKEN, client_ip="198.51.100.1")
        assert c.post(f"/callback?{query}", json=ordinary).status_code == 200
    signing_key(db)
    return db


def signing_key(db: Path) -> None:
    """The checkpoint signing key, where ``erase`` looks for it (serve made it, or made none yet)."""
    Signer.load_or_create(Settings(db=db).signing_key_path)


def cli(command: str, db: Path, *args: str) -> str:
    """``topic-audit COMMAND --db DB ARGS`` (click's runner, in this process: deeper in a stack than from
    a shell); its standard output, once it exited 0."""
    result = CliRunner().invoke(main, [command, "--db", str(db), *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert result.exit_code == 0, result.output
    return result.stdout


def verified(db: Path) -> None:
    result = CliRunner().invoke(main, ["verify", "--db", str(db), "--json"])
    assert json.loads(result.stdout)["findings"] == [], result.output
    assert result.exit_code == 0


def holding(folder: Path, needle: bytes) -> list[str]:
    """Every file under ``folder`` (the data folder: database, WAL, checkpoints, Litestream's) whose raw
    bytes hold ``needle``."""
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


def entry_ids(db: Path) -> list[int]:
    conn = sqlite3.connect(db)
    try:
        return [i for (i,) in conn.execute("SELECT id FROM audit_log ORDER BY id")]
    finally:
        conn.close()


def would_erase(db: Path, *selector: str) -> tuple[int, list[int]]:
    """How many entries a dry run of ``erase`` selects, and the ids it lists (the first 20)."""
    out = cli("erase", db, *selector, "--reason", "poison test")
    found = re.search(r"would erase (\d+) entries(?: \(([\d, ]+)(?: …)?\))?", out)
    assert found is not None, out
    return int(found[1]), [int(i) for i in found[2].split(", ")] if found[2] else []


# -- one parse of a stored body, whatever it holds ------------------------------------------------------


@pytest.mark.parametrize("name", list(POISON))
def test_a_stored_body_parses_to_json_or_not_json_never_to_an_exception(name: str) -> None:
    stored = chain.stored_body(POISON[name])  # TEXT when UTF-8, else BLOB: what the receiver keeps
    parsed = content.parse_json(stored)
    expected = {"nested near the limit", "huge string", "duplicate keys", "not an object"}
    assert (parsed is not content.NOT_JSON) == (name in expected), parsed
    for command in models.PAYLOAD_TYPES:
        # a typed decode skips what its type does not name (bad bytes there included): it may succeed
        with contextlib.suppress(msgspec.DecodeError):
            projection.parse_event(command, stored)
        assert redaction.effects(command, stored) is None  # none of them is a topic event


def test_what_parse_json_makes_of_odd_values() -> None:
    assert content.parse_json(b'{"a":1,"a":2}') == {"a": 2}  # the last wins, as the receiver read it
    assert content.parse_json(memoryview(b"[1]")) == [1]
    assert content.parse_json("null") is None
    for odd in (None, 5, 2.5, b"", "NaN", b"Infinity", "1e999", b"\xff", "[1,", "\ud800", object()):
        assert content.parse_json(odd) is content.NOT_JSON, odd


def test_how_deep_a_body_may_nest_does_not_depend_on_the_callers_stack() -> None:
    """A body the receiver accepted decodes in every tool: near the limit, from deep in a stack (as in
    Datasette or a replay), it is decoded again on a fresh stack instead of failing there."""
    body = nested(960)

    def deep_down(frames: int) -> object:
        return deep_down(frames - 1) if frames else content.parse_json(body)

    assert deep_down(600) == content.parse_json(body) != content.NOT_JSON
    event = json.dumps(samples.sample("after-create")).encode()[:-1] + b',"junk":' + body + b"}"

    def parse_deep_down(frames: int) -> models.TopicEvent:
        return parse_deep_down(frames - 1) if frames else projection.parse_event(models.AFTER_CREATE, event)

    assert isinstance(parse_deep_down(600), models.AfterCreateTopic)


# -- item 2: one request must not block erasure, retention, rebuild or verify ----------------------------


def test_a_poisoned_body_blocks_no_tool(tmp_path: Path) -> None:
    db = poisoned_log(tmp_path / "data", list(POISON.values()))
    assert would_erase(db, "--topic", "@TGS#_nothing@TOPIC#_x") == (0, [])
    assert would_erase(db, "--ip", "192.0.2.1") == (0, [])
    assert would_erase(db, "--account", SUBJECT)[0] > 0  # the poisoned bodies all name the account
    for entry_id in entry_ids(db)[:: len(COMMANDS) * 2 - 1]:  # every command, ours and another app's
        assert would_erase(db, "--id", str(entry_id)) == (1, [entry_id])
        cli("erase", db, "--id", str(entry_id), "--reason", "poison", "--yes")
    cli("erase", db, "--topic", TOPIC, "--reason", "poison", "--yes")
    cli("rebuild-projection", db)
    verified(db)
    assert "retention: erased" in cli("retain", db, "--older-than", "0s")
    conn = sqlite3.connect(db)
    left = conn.execute("SELECT count(*) FROM audit_log WHERE request_body_sha256 != ''").fetchone()[0]
    conn.close()
    assert left == 0  # every entry's content is gone
    cli("rebuild-projection", db)
    verified(db)


def test_serves_hourly_retention_erases_past_a_poisoned_body(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    with TestClient(create_app(Settings(sdk_app_id=APP_ID, token=TOKEN, db=db), Metrics())) as client:
        post_all(client, [POISON["nested arrays"], POISON["TopicIdList nested"], POISON["not UTF-8"]])
        on = retention.OnTheWriter(client.app.state.writer, lambda: "2026-12-02T00:00:00.000Z")
        assert asyncio.run(on.retain(db, 0)) == 3 * len(COMMANDS) * 2
    verified(db)


def test_datasette_shows_every_poisoned_entry(tmp_path: Path) -> None:
    db = poisoned_log(tmp_path, list(POISON.values()))
    ds = explore.make_datasette(db)
    pages = [f"/audit/audit_log/{i}" for i in entry_ids(db)]
    pages += [
        "/audit/audit_log",
        "/audit/audit_log?_columns=all",
        f"/audit/audit_log?_search={TEXT}",
        "/audit/audit_log.json?_search=From_Account",
        f"/audit/topic_history?topic_id={TOPIC.replace('#', '%23')}",
        "/audit/answer_to_request?id=1",
    ]

    async def fetch() -> dict[str, int]:
        return {page: (await ds.client.get(page)).status_code for page in pages}

    assert {page: status for page, status in asyncio.run(fetch()).items() if status != 200} == {}


# -- item 9a: a body that does not parse still names its data subject ----------------------------------


NOT_JSON_OF_THE_SUBJECT = [
    b'{"CallbackCommand":"Group.CallbackAfterSendMsg","From_Account":"erin","MsgBody":[{"MsgContent":'
    b'{"Text":"hello ' + TEXT.encode(),  # cut short
    b'{"From_Account":"\\u0065rin","MsgBody":"' + TEXT.encode() + b" \\u00e9",  # escaped, and cut
    b'{"Text":"' + TEXT.encode() + b'","To_Account":["leckie","erin',  # cut right after the account
    b'{"From_Account":"erin","Text":"' + TEXT.encode() + b' \xff\xfe"}',  # not UTF-8: a BLOB
    b'{"From_Account":"erin","Text":"' + TEXT.encode() + b'","n":NaN}',
    b'{"From_Account":"erin","Text":"' + TEXT.encode() + b'","n":' + b"9" * 5000 + b"}",
    b'{"From_Account":"erin","Text":"' + TEXT.encode() + b'","y":' + nested(DEEP) + b"}",
]


def test_erase_an_account_takes_bodies_that_are_not_json_and_leaves_no_copy(tmp_path: Path) -> None:
    data = tmp_path / "data"
    db = poisoned_log(data, NOT_JSON_OF_THE_SUBJECT)
    for needle in (SUBJECT.encode(), TEXT.encode(), SUBJECT_IP.encode()):
        assert holding(data, needle), needle  # the scan can find what it looks for
    all_of_them = len(NOT_JSON_OF_THE_SUBJECT) * len(COMMANDS) * 2
    assert would_erase(db, "--account", SUBJECT) == (all_of_them, list(range(1, 21)))
    out = cli("erase", db, "--account", SUBJECT, "--reason", "request #9", "--yes")
    assert f"erased {all_of_them} entries" in out
    for needle in (SUBJECT.encode(), TEXT.encode(), TEXT_TAIL, SUBJECT_IP.encode()):
        assert holding(data, needle) == [], needle
    assert holding(data, OTHER.encode())  # the other account's callback stays
    verified(db)


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b'{"Text":"erin"', True),  # any JSON string of a body that is not JSON
        (b'{"From_Account":"erin', True),  # cut right after it
        (b'{"From_Account":"\\u0065\\u0072in","x":', True),
        (b'\xff"erin"', True),
        (b'{"From_Account":"katerina","x":', False),
        (b'{"From_Account":"erin_2","x":', False),
        (b'{"From_Account":"eri', False),  # cut inside it: only part of it is there
        (b"From_Account=erin", False),  # not written as a JSON string
        (b'{"Text":"erin"}', False),  # JSON: only *_Account fields name an account
        (b'{"From_Account":"erin"}', True),
        (b'[{"To_Account":["x","erin"]}]', True),
        (b'{"From\\u005fAccount":"erin"}', True),
    ],
)
def test_which_bodies_hold_an_account(body: bytes, named: bool) -> None:
    assert subjects.holds_account(chain.stored_body(body), SUBJECT) is named


def test_erase_an_ip_takes_every_query_string_that_holds_it(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    body = json.dumps(samples.sample("group-created")).encode()
    queries = {
        "repeated": samples.query(APP_ID, SEND, TOKEN)
        + f"&ClientIP={SUBJECT_IP}",  # ClientIP=203.0.113.7 first
        "escaped": samples.query(APP_ID, SEND, TOKEN, client_ip=SUBJECT_IP).replace(".", "%2E"),
        "plain": samples.query(APP_ID, SEND, TOKEN, client_ip=SUBJECT_IP),
        "another": samples.query(APP_ID, SEND, TOKEN, client_ip="203.0.113.7"),
        "IPv6 in capitals": samples.query(APP_ID, SEND, TOKEN, client_ip="2001:DB8::77"),
    }
    with TestClient(create_app(Settings(sdk_app_id=APP_ID, token=TOKEN, db=db))) as client:
        for query in queries.values():
            client.post(f"/callback?{query}", content=body)
    signing_key(db)
    assert would_erase(db, "--ip", SUBJECT_IP) == (3, [1, 2, 3])
    assert would_erase(db, "--ip", "2001:db8::77") == (1, [5])
    cli("erase", db, "--ip", SUBJECT_IP, "--reason", "request #10", "--yes")
    assert holding(tmp_path, SUBJECT_IP.encode()) == []
    assert holding(tmp_path, b"203.0.113.7&")  # the other address stays
    verified(db)


@pytest.mark.parametrize(
    ("query", "held"),
    [
        ("ClientIP=203.0.113.7&ClientIP=203.0.113.77", True),
        ("ClientIP=203%2E0%2E113%2E77", True),
        ("ClientIP=203.0.113.77%00", True),
        ("X=203.0.113.77,198.51.100.1", True),
        ("ClientIP=203.0.113.77:443", True),
        ("ClientIP=::ffff:203.0.113.77", True),
        ("ClientIP=203.0.113.771", False),
        ("ClientIP=1203.0.113.77", False),
        ("ClientIP=203.0.113.7", False),
        ("ClientIP=203.0.113.77.5", False),
    ],
)
def test_which_query_strings_hold_an_address(query: str, held: bool) -> None:
    assert subjects.holds_address(query, SUBJECT_IP) is held


def test_erase_a_topic_takes_entries_that_name_it_whatever_they_hold(tmp_path: Path) -> None:
    create = json.dumps(samples.sample("after-create", TopicId=TOPIC, Name=TEXT)).encode()
    bodies = [
        create[: create.index(TEXT.encode()) + len(TEXT)],  # cut short: rejected, topic_id not recorded
        create.replace(b'"Type": "Community"', b'"Type": 5'),  # invalid_payload
        create.replace(b'"GroupId"', b'"y": ' + nested(DEEP) + b', "GroupId"'),  # nested too deep
    ]
    db = poisoned_log(tmp_path / "data", bodies)
    ids = entry_ids(db)
    assert would_erase(db, "--topic", TOPIC) == (len(ids), ids[:20])  # every one names it
    cli("erase", db, "--topic", TOPIC, "--reason", "request #11", "--yes")
    assert holding(tmp_path / "data", TEXT_TAIL) == []
    verified(db)


# -- property: hostile bodies through the receiver, then every tool -------------------------------------

hostile_bodies = st.one_of(
    st.binary(max_size=200),
    st.integers(900, 20000).map(lambda n: callback(nested(n) + b"}")),  # hypothesis raises the
    st.integers(900, 12000).map(lambda n: callback(nested(n, b'{"a":', b"}", b"1") + b"}")),  # limit
    st.sampled_from(list(POISON.values())),
    st.tuples(st.sampled_from(list(POISON.values())), st.integers(0, 400)).map(lambda t: t[0][: t[1]]),
    st.binary(max_size=40).map(lambda b: callback(b"1}").replace(TEXT.encode(), b"\\" + b)),
    st.sampled_from([b"9" * 400, b"-1e400", b"NaN", b"Infinity", b"[1e309]", b'"\\ud800"', b"{}", b"null"]),
)


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bodies=st.lists(hostile_bodies, min_size=1, max_size=4), commands=st.lists(st.sampled_from(COMMANDS)))
def test_no_hostile_body_makes_a_tool_fail(tmp_path: Path, bodies: list[bytes], commands: list[str]) -> None:
    folder = Path(tmp_path, f"run-{len(list(tmp_path.iterdir()))}")
    folder.mkdir()
    db = folder / "audit.db"
    with TestClient(create_app(Settings(sdk_app_id=APP_ID, token=TOKEN, db=db, checkpoint_seconds=0))) as c:
        for body in bodies:
            for command in commands or [SEND]:
                for app in (APP_ID, "1400000999"):
                    query = samples.query(app, command, TOKEN, client_ip=SUBJECT_IP)
                    answer = c.post(f"/callback?{query}", content=body)
                    assert answer.status_code in (200, 400, 403, 413)  # 413: past 64 KiB, recorded too
    signing_key(db)
    for selector in (["--account", SUBJECT], ["--topic", TOPIC], ["--ip", SUBJECT_IP], ["--id", "2"]):
        cli("erase", db, *selector, "--reason", "r")  # dry runs
    cli("erase", db, "--id", "1", "--reason", "r", "--yes")
    cli("erase", db, "--account", SUBJECT, "--reason", "r", "--yes")
    cli("rebuild-projection", db)
    verified(db)
    cli("retain", db, "--older-than", "0s")
    cli("rebuild-projection", db)
    verified(db)
