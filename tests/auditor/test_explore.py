"""Datasette, in process, on a populated log: descriptions, canned queries, the dashboard's charts,
search, read-only SQL, and access control off loopback."""

from __future__ import annotations

import asyncio
import html
import re
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml
from benchmarks.bench_queries import chart_sql
from benchmarks.logs import generate_log
from conftest import deliver_some
from topic_audit import clock
from topic_audit.auditor import explore
from topic_audit.privacy import erasure
from topic_audit.transparency.checkpoints import Signer, make_checkpoint
from topic_audit.writer.thread import connect


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("explore") / "audit.db"
    generate_log(db, 600, seed=3)
    conn = connect(db)
    deliver_some(conn)
    erasure.erase_batch(conn, ERASED, "request", "data subject's request", None, clock.iso(0))
    make_checkpoint(
        conn, Signer.load_or_create(db.with_name("key.pem"))[0], db.with_name("cp.jsonl"), clock.iso(0)
    )
    conn.close()
    return db


ERASED = [590, 591]
"""Entries of the populated log whose content is erased (one erasure record)."""


def get(ds: Any, path: str, **kwargs: Any) -> Any:
    async def run() -> Any:
        return await ds.client.get(path, **kwargs)

    return asyncio.run(run())


def metadata() -> dict[str, Any]:
    return explore.load_metadata()


def sample_params(db: Path) -> dict[str, str]:
    conn = sqlite3.connect(db)
    topic, group = conn.execute(
        "SELECT topic_id, group_id FROM topics WHERE created_at IS NOT NULL LIMIT 1"
    ).fetchone()
    conn.close()
    return {"topic_id": topic, "group_id": group, "from": "2000-01-01", "to": "2100-01-01", "id": "1"}


def test_every_table_and_column_is_described(populated: Path) -> None:
    tables = metadata()["databases"]["audit"]["tables"]
    conn = sqlite3.connect(populated)
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    for name in names:
        if re.search(r"_fts_(data|idx|docsize|config|content)$", name):
            continue  # FTS5's own shadow tables
        assert tables.get(name, {}).get("description"), f"table {name} has no description"
        if name.endswith("_fts"):
            continue
        columns = [r[1] for r in conn.execute(f"PRAGMA table_info({name})")]
        described = tables[name].get("columns", {})
        assert set(columns) == set(described), f"{name}: undescribed {set(columns) - set(described)}"
    conn.close()


@pytest.mark.parametrize("query", list(metadata()["databases"]["audit"]["queries"]))
def test_every_canned_query_runs_and_answers(populated: Path, query: str) -> None:
    ds = explore.make_datasette(populated)
    sql = metadata()["databases"]["audit"]["queries"][query]["sql"]
    params = {k: v for k, v in sample_params(populated).items() if f":{k}" in sql}
    response = get(ds, f"/audit/{query}.json", params={**params, "_shape": "array"})
    assert response.status_code == 200, response.text
    assert response.json(), f"{query} returned no rows on a populated log"


CHARTS = metadata()["plugins"]["datasette-dashboards"]["callbacks"]["charts"]


@pytest.mark.parametrize("chart", list(CHARTS))
@pytest.mark.parametrize("filters", [{}, {"date_start": "2000-01-01", "date_end": "2100-01-01"}])
def test_every_chart_query_answers(populated: Path, chart: str, filters: dict[str, str]) -> None:
    ds = explore.make_datasette(populated)
    sql, params = chart_sql(CHARTS[chart]["query"], filters)
    response = get(ds, "/audit.json", params={"sql": sql, **params, "_shape": "array"})
    assert response.status_code == 200, response.text
    assert response.json(), f"chart {chart} is empty"


def test_the_dashboard_page(populated: Path) -> None:
    ds = explore.make_datasette(populated)
    asyncio.run(ds.invoke_startup())
    response = get(ds, "/-/dashboards/callbacks")
    assert response.status_code == 200
    assert "Callbacks per hour by outcome" in response.text


def test_search_bodies_and_topic_names(populated: Path) -> None:
    ds = explore.make_datasette(populated)
    bodies = get(ds, "/audit/audit_log.json", params={"_search": "Community", "_shape": "array"})
    assert bodies.status_code == 200 and bodies.json()
    names = get(ds, "/audit/topics.json", params={"_search": "topic", "_shape": "array"})
    assert names.status_code == 200 and names.json()


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM audit_log",
        "UPDATE audit_log SET outcome = 'accepted'",
        "DROP TABLE topics",
        "INSERT INTO heartbeat VALUES (1, 'x')",
        "PRAGMA writable_schema = 1",
        "ATTACH DATABASE '/tmp/x.db' AS x",
    ],
)
def test_write_sql_is_refused(populated: Path, sql: str) -> None:
    before = sqlite3.connect(populated).execute("SELECT count(*) FROM audit_log").fetchone()[0]
    response = get(explore.make_datasette(populated), "/audit.json", params={"sql": sql})
    assert response.status_code in (400, 403)
    assert sqlite3.connect(populated).execute("SELECT count(*) FROM audit_log").fetchone()[0] == before


def test_anonymous_users_are_refused_off_loopback(populated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(explore.AccessError):
        explore.make_datasette(populated, host="0.0.0.0", environ={})
    monkeypatch.setenv(explore.API_TOKEN_ENV, "grafana-link-token")
    ds = explore.make_datasette(populated, host="0.0.0.0")
    assert get(ds, "/audit/audit_log.json").status_code == 403
    assert get(ds, "/audit/audit_log.json", headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert (
        get(ds, "/audit/audit_log.json", headers={"Authorization": "Bearer grafana-link-token"}).status_code
        == 200
    )
    assert (
        "grafana-link-token"
        not in get(ds, "/-/metadata.json", headers={"Authorization": "Bearer grafana-link-token"}).text
    )


def test_password_login_off_loopback(populated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datasette_auth_passwords.utils import hash_password

    monkeypatch.setenv(explore.PASSWORD_HASH_ENV, hash_password("correct horse", iterations=1000))
    ds = explore.make_datasette(populated, host="10.1.2.3")

    async def login(password: str) -> int:
        page = await ds.client.get("/-/login")
        token = re.search(r'name="csrftoken" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        response = await ds.client.post(
            "/-/login",
            data={"username": "auditor", "password": password, "csrftoken": token},
            cookies={"ds_csrftoken": page.cookies["ds_csrftoken"]},
        )
        if "ds_actor" not in response.cookies:
            return 403
        table = await ds.client.get(
            "/audit/audit_log.json", cookies={"ds_actor": response.cookies["ds_actor"]}
        )
        return int(table.status_code)

    assert get(ds, "/audit").status_code == 403
    assert asyncio.run(login("wrong")) == 403
    assert asyncio.run(login("correct horse")) == 200


def test_robots_are_blocked(populated: Path) -> None:
    ds = explore.make_datasette(populated)
    asyncio.run(ds.invoke_startup())
    robots = get(ds, "/robots.txt")
    assert robots.status_code == 200 and "Disallow: /" in robots.text


def test_the_metadata_file_is_valid_yaml() -> None:
    assert yaml.safe_load((explore.DASHBOARD / "metadata.yml").read_text())["title"] == "topic-audit"


def test_log_entries_link_to_their_topic(populated: Path) -> None:
    from datasette.utils import tilde_encode

    ds = explore.make_datasette(populated)
    conn = sqlite3.connect(populated)
    entry, topic = conn.execute(
        "SELECT created_entry_id, topic_id FROM topics WHERE created_entry_id IS NOT NULL LIMIT 1"
    ).fetchone()
    conn.close()
    topic_url = f"/audit/topics/{tilde_encode(topic)}"
    listing = get(ds, f"/audit/audit_log?id={entry}")
    assert f'href="{topic_url}"' in listing.text  # the entry's topic_id links to the topic (labelled by name)
    page = get(ds, f"/audit/audit_log/{entry}")
    assert f'href="/audit/topics?created_entry_id={entry}"' in page.text  # the entry links to what it changed
    topic_page = get(ds, topic_url)
    assert topic_page.status_code == 200
    assert f'href="/audit/audit_log/{entry}">created by entry {entry}</a>' in topic_page.text
    assert "/audit/topic_history?topic_id=" + quote(topic, safe="") in topic_page.text  # its history
    assert (
        f'href="/audit/audit_log?topic_id={tilde_encode(topic)}"'
        in topic_page.text.replace("%40", "@").replace("%23", "#")
        or "/audit/audit_log?topic_id=" in topic_page.text
    )  # the topic links to its entries


def test_a_requests_deliveries_are_linked_from_its_row(populated: Path) -> None:
    ds = explore.make_datasette(populated)
    page = get(ds, "/audit/audit_log/2")
    assert page.status_code == 200
    assert "/audit/deliveries?audit_id=2" in page.text  # Datasette's "links from other tables"
    listed = get(ds, "/audit/deliveries.json", params={"audit_id": "2", "_shape": "array"}).json()
    assert [(d["audit_id"], d["status_code"], d["error"]) for d in listed] == [(2, 200, None)]
    undelivered = get(ds, "/audit/undelivered_callbacks.json", params={"_shape": "array"}).json()
    assert {d["state"] for d in undelivered} == {"pending", "failed"}
    assert len(undelivered) == 25  # 15 failed (odd ids up to 29) and 10 pending (31-40)


def test_topic_history_reads_multi_topic_destroys_by_their_partial_index(tmp_path: Path) -> None:
    """Entries with no ``topic_id`` are a fifth of a realistic log; the canned query must not walk them
    all to find the few multi-topic destroys (it took the ``topic_id`` index for that once)."""
    db = tmp_path / "audit.db"
    generate_log(db, 200)
    queries = yaml.safe_load((explore.DASHBOARD / "metadata.yml").read_text())["databases"]["audit"][
        "queries"
    ]
    conn = sqlite3.connect(db)
    try:
        plan = " | ".join(
            row[3]
            for row in conn.execute(
                f"EXPLAIN QUERY PLAN {queries['topic_history']['sql']}", {"topic_id": "t"}
            )
        )
    finally:
        conn.close()
    assert "idx_audit_log_multi_topic_destroys" in plan, plan
    assert "SCAN audit_log" not in plan, plan


def header_columns(html: str) -> list[str]:
    return re.findall(r'<th [^>]*data-column="([^"]+)"', html)


def test_the_list_shows_the_key_columns_first_and_all_of_them_one_click_away(populated: Path) -> None:
    ds = explore.make_datasette(populated)
    key = metadata()["databases"]["audit"]["tables"]["audit_log"]["list_columns"]
    listing = get(ds, "/audit/audit_log").text
    assert header_columns(listing) == key
    assert 'href="/audit/audit_log?_columns=all"' in listing
    wide = get(ds, "/audit/audit_log?_columns=all").text
    every = header_columns(wide)
    stored = [r[1] for r in sqlite3.connect(populated).execute("PRAGMA table_info(audit_log)")]
    assert every[: len(key)] == key and sorted(every) == sorted(stored)
    assert header_columns(get(ds, "/audit/audit_log?_nocol=detail").text)[: len(key) - 1] == key[:-1]
    # the long values are shortened to a link to the field on the row's page
    assert re.search(r'<a class="shortened" href="/audit/audit_log/\d+#request_body"', wide)
    topics = metadata()["databases"]["audit"]["tables"]["topics"]["list_columns"]
    assert header_columns(get(ds, "/audit/topics").text) == topics


def test_the_lists_exports_keep_every_column(populated: Path) -> None:
    ds = explore.make_datasette(populated)
    csv = get(ds, "/audit/audit_log.csv", params={"_size": "5"}).text
    assert csv.splitlines()[0].split(",")[:3] == ["id", "received_at", "method"]
    stored = [r[1] for r in sqlite3.connect(populated).execute("PRAGMA table_info(audit_log)")]
    assert set(stored) <= set(csv.splitlines()[0].split(","))
    rows = get(ds, "/audit/audit_log.json", params={"_shape": "array", "_size": "3"}).json()
    assert len(rows) == 3 and "entry_hash" in rows[0] and "request_body" in rows[0]


@pytest.mark.parametrize(
    ("params", "check"),
    [
        ({"outcome": "rejected"}, lambda rows: all(r["outcome"] == "rejected" for r in rows)),
        ({"_search": "Community"}, lambda rows: all("Community" in (r["request_body"] or "") for r in rows)),
        (
            {"_sort": "received_at"},
            lambda rows: [r["received_at"] for r in rows] == sorted(r["received_at"] for r in rows),
        ),
        ({"_facet": "group_id", "reason__notnull": "1"}, lambda rows: all(r["reason"] for r in rows)),
    ],
)
def test_filters_search_sorting_and_facets_still_work_on_the_list(
    populated: Path, params: dict[str, str], check: Any
) -> None:
    ds = explore.make_datasette(populated)
    page = get(ds, "/audit/audit_log", params=params)
    assert page.status_code == 200 and header_columns(page.text)[0] == "id"
    rows = get(ds, "/audit/audit_log.json", params={**params, "_shape": "array"}).json()
    assert rows and check(rows)
    shown = [
        int(i) for i in re.findall(r'<td class="col-id type-pk"><a href="/audit/audit_log/(\d+)"', page.text)
    ]
    assert shown == [r["id"] for r in rows][: len(shown)] and len(shown) == min(50, len(rows))
    if "_facet" in params:
        facets = [f.strip() for f in re.findall(r'class="facet-info-name">\s*<strong>([^<]+)', page.text)]
        assert "group_id" in facets, facets


def test_the_page_of_one_callback(populated: Path) -> None:
    from datasette.utils import tilde_encode

    ds = explore.make_datasette(populated)
    conn = sqlite3.connect(populated)
    entry, topic = conn.execute(
        "SELECT id, topic_id FROM audit_log WHERE id BETWEEN 2 AND 30 AND topic_id IS NOT NULL "
        "AND outcome = 'accepted' AND id % 2 = 1 LIMIT 1"
    ).fetchone()
    last = conn.execute("SELECT max(id) FROM audit_log").fetchone()[0]
    conn.close()
    page = get(ds, f"/audit/audit_log/{entry}").text
    for section in (
        "What we decided and answered",
        "What Tencent sent",
        "When and how long",
        "Place in the chain",
        "Passed on to the app",
    ):
        assert section in page
    text = html.unescape(page)
    assert '"ActionStatus": "OK",\n  "ErrorInfo": ""' in text  # our answer, pretty-printed
    assert '{\n  "CallbackCommand": ' in text and "<td>SdkAppid</td>" in page  # the body and the query
    assert (
        f'href="/audit/audit_log/{entry - 1}" rel="prev"' in page
        and f'href="/audit/audit_log/{entry + 1}" rel="next"' in page
    )
    assert "/audit/topic_history?topic_id=" + quote(topic, safe="") in page
    assert "http://app.example:9000/callback" in page
    assert "<strong>failed</strong>" in page and "HTTP 503" in page  # the outbox state and the attempt
    for column in [r[1] for r in sqlite3.connect(populated).execute("PRAGMA table_info(audit_log)")]:
        assert f'<dt id="{column}"' in page, column  # every field, under its own anchor
    conn = sqlite3.connect(populated)
    created, created_topic = conn.execute(
        "SELECT created_entry_id, topic_id FROM topics WHERE created_entry_id IS NOT NULL LIMIT 1"
    ).fetchone()
    conn.close()
    creation = get(ds, f"/audit/audit_log/{created}").text  # what it did to the topic, by primary key
    assert "this entry created it" in creation
    assert f'href="/audit/topics/{tilde_encode(created_topic)}"' in creation
    newest = get(ds, f"/audit/audit_log/{last}").text
    assert 'rel="next"' not in newest and "Not passed on" in newest
    first = get(ds, "/audit/audit_log/1").text
    assert 'rel="prev"' not in first


def test_an_erased_entry_says_so_in_the_list_and_on_its_page(populated: Path) -> None:
    ds = explore.make_datasette(populated)
    listing = get(ds, "/audit/audit_log", params={"id__gte": "585", "id__lte": "595"}).text
    assert listing.count('<span class="erased"') == len(ERASED)
    page = get(ds, f"/audit/audit_log/{ERASED[0]}").text
    assert 'Content erased by <a href="/audit/erasures/1">erasure 1</a>' in page
    assert "(request, " in page and "data subject&#39;s request" in page
    assert "Content erased" not in get(ds, "/audit/audit_log/589").text
    records = get(ds, "/audit/erasures.json", params={"_shape": "array"}).json()
    assert [(r["first_id"], r["last_id"], r["entries"]) for r in records] == [(590, 591, 2)]


def test_the_salts_never_leave_the_database(populated: Path) -> None:
    ds = explore.make_datasette(populated)
    assert sqlite3.connect(populated).execute("SELECT count(salt) FROM content_keys").fetchone()[0] > 0
    assert get(ds, "/audit/content_keys").status_code == 403
    assert get(ds, "/audit/content_keys.json").status_code == 403
    for sql in (
        "SELECT salt FROM content_keys",
        "SELECT hex(salt) AS salt FROM content_keys",
        "SELECT (SELECT salt FROM content_keys k WHERE k.entry_id = a.id) AS salt FROM audit_log a",
    ):
        rows = get(ds, "/audit.json", params={"sql": sql, "_shape": "array"}).json()
        assert rows and {r["salt"] for r in rows} <= {None, ""}, sql
    assert "content_keys" not in get(ds, "/audit").text  # not listed either
