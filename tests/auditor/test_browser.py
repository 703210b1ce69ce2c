"""A real headless Chromium loads the real Datasette pages (``topic-audit explore`` as a process, on a log
of a few thousand callbacks, some passed on to the app): the dashboard's charts render; on a laptop screen
(1280x800) the lists show their key columns and many whole rows, and the page of one callback reads top to
bottom without sideways scrolling; search, facets, sorting and the links work by clicking; no page raises a
JavaScript error. Screenshots are saved under test-artifacts/ for a person to look at."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from benchmarks.logs import generate_log
from conftest import ROOT, deliver_some, listening_port, require_tool
from topic_audit.privacy import erasure
from topic_audit.writer.thread import connect

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class Url(str):
    db: Path


@pytest.fixture(scope="module")
def datasette_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Url]:
    folder = tmp_path_factory.mktemp("browser")
    db = folder / "audit.db"
    generate_log(db, 3000, seed=5)
    conn = connect(db)
    deliver_some(conn)
    erasure.erase_batch(conn, [2980], "request", "data subject's request", None, "2026-11-26T09:00:00.000Z")
    conn.close()
    env = {**os.environ, "TOPIC_AUDIT_DB": str(db), "TOPIC_AUDIT_EXPLORE_PORT": "0"}  # the OS picks it
    log = (folder / "explore.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "topic_audit.cli", "explore"], env=env, stdout=log, stderr=log
    )
    try:
        url = Url(f"http://127.0.0.1:{listening_port(process, folder / 'explore.log')}")
        url.db = db
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/-/versions.json", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (folder / "explore.log").read_text()
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    chromium = require_tool("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


def open_page(
    browser: object, url: str, viewport: tuple[int, int] = (1400, 1000)
) -> tuple[object, list[str]]:
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})  # type: ignore[attr-defined]
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    page.goto(url, wait_until="networkidle")
    return page, errors


def test_the_callbacks_dashboard_renders_its_charts(browser: object, datasette_url: str) -> None:
    page, errors = open_page(browser, f"{datasette_url}/-/dashboards/callbacks")
    conn = sqlite3.connect(datasette_url.db)  # type: ignore[attr-defined]
    total, rejected = conn.execute("SELECT count(*), sum(outcome = 'rejected') FROM audit_log").fetchone()
    conn.close()
    # every chart drawn and the metric cards filled in (each loads on its own, after the page)
    page.wait_for_function(  # type: ignore[attr-defined]
        """([total, rejected]) => {
          const charts = [...document.querySelectorAll(".vega-embed")];
          const text = document.body.innerText;
          return charts.length === 4 && charts.every((c) => c.querySelector("svg path, svg rect, canvas"))
            && text.includes(`\n${total}\n`) && text.includes(`\n${rejected}\n`);
        }""",
        arg=[total, rejected],
        timeout=20000,
    )
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-callbacks.png"), full_page=True)  # type: ignore[attr-defined]
    assert errors == []


def test_the_audit_log_table_page(browser: object, datasette_url: str) -> None:
    page, errors = open_page(browser, f"{datasette_url}/audit/audit_log")
    rows = page.locator("table.rows-and-columns tbody tr")  # type: ignore[attr-defined]
    assert rows.count() == 50
    facets = " ".join(page.locator(".facet-info").all_inner_texts())  # type: ignore[attr-defined]
    for facet in ("outcome", "reason", "callback_command", "opt_platform"):
        assert facet in facets, facets
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "audit-log.png"), full_page=True)  # type: ignore[attr-defined]
    assert errors == []


LAPTOP = (1280, 800)
KEY_COLUMNS = {
    "audit_log": [
        "id",
        "received_at",
        "callback_command",
        "outcome",
        "status_code",
        "reason",
        "topic_id",
        "group_id",
    ],
    "topics": ["topic_id", "name", "group_id", "created_at", "updated_at", "deleted_at"],
    "deliveries": ["id", "audit_id", "started_at", "destination", "status_code", "error"],
}


def whole_rows_on_screen(page: object) -> int:
    rows = page.locator("table.rows-and-columns tbody tr")  # type: ignore[attr-defined]
    boxes = [rows.nth(i).bounding_box() for i in range(min(rows.count(), 30))]
    return sum(1 for b in boxes if b is not None and b["y"] >= 0 and b["y"] + b["height"] <= LAPTOP[1])


@pytest.mark.parametrize("table", list(KEY_COLUMNS))
def test_a_list_on_a_laptop_screen(browser: object, datasette_url: str, table: str) -> None:
    """At 1280x800 the key columns' headers are inside the screen (no sideways scrolling), rows are one
    line each and at least 5 whole ones are on the first screen; the column descriptions are folded away
    but one click (or a hover on a header) shows them."""
    page, errors = open_page(browser, f"{datasette_url}/audit/{table}", viewport=LAPTOP)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{table}-first-screen.png"))  # type: ignore[attr-defined]
    for column in KEY_COLUMNS[table]:
        box = page.locator(f"table.rows-and-columns th[data-column='{column}']").bounding_box()  # type: ignore[attr-defined]
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= LAPTOP[0], (column, box)
        assert box["y"] + box["height"] <= LAPTOP[1], (column, box)
    assert page.evaluate("document.documentElement.scrollWidth") <= LAPTOP[0]  # type: ignore[attr-defined]
    assert whole_rows_on_screen(page) >= 5
    first = page.locator("table.rows-and-columns tbody tr").first.bounding_box()  # type: ignore[attr-defined]
    assert first is not None and first["height"] < 32, f"a row is not one line: {first}"
    assert not page.locator("dl.column-descriptions").is_visible()  # type: ignore[attr-defined]
    help_list = page.locator("details.column-help dl")  # type: ignore[attr-defined]
    assert not help_list.is_visible()
    header = page.locator(f"th[data-column='{KEY_COLUMNS[table][1]}']")  # type: ignore[attr-defined]
    assert header.get_attribute("title"), "the column header has no description tooltip"
    page.locator("details.column-help summary").click()  # type: ignore[attr-defined]
    assert help_list.is_visible()
    assert {"audit_log": "entry_hash", "topics": "deleted_entry_id", "deliveries": "entry_hash"}[
        table
    ] in help_list.inner_text()
    assert errors == []


def test_five_rejections_fit_with_a_filter_and_a_facet_chosen(browser: object, datasette_url: str) -> None:
    """Choosing adds a filter row and a description to the header area; it stays compact."""
    page, errors = open_page(
        browser, f"{datasette_url}/audit/audit_log?outcome=rejected&_facet=remote_addr", viewport=LAPTOP
    )
    page.screenshot(path=str(ARTIFACTS / "audit-log-rejected.png"))  # type: ignore[attr-defined]
    assert whole_rows_on_screen(page) >= 5
    outcomes = page.locator("table.rows-and-columns td.col-outcome").all_inner_texts()  # type: ignore[attr-defined]
    assert outcomes and set(outcomes) == {"rejected"}
    assert errors == []


def test_facets_search_and_sorting_by_clicking(browser: object, datasette_url: str) -> None:
    page, errors = open_page(browser, f"{datasette_url}/audit/audit_log", viewport=LAPTOP)
    page.locator(".facet-info a", has_text="rejected").first.click()  # type: ignore[attr-defined]
    page.wait_for_url("**outcome=rejected**")  # type: ignore[attr-defined]
    assert set(page.locator("td.col-outcome").all_inner_texts()) == {"rejected"}  # type: ignore[attr-defined]
    page.locator("th[data-column='received_at'] a").first.click()  # type: ignore[attr-defined]
    page.wait_for_url("**_sort=received_at**")  # type: ignore[attr-defined]
    times = page.locator("td.col-received_at").all_inner_texts()  # type: ignore[attr-defined]
    assert times == sorted(times) and "outcome=rejected" in page.url  # type: ignore[attr-defined]
    page.fill("#_search", "Community")  # type: ignore[attr-defined]
    page.locator("form.filters input[type=submit]").click()  # type: ignore[attr-defined]
    page.wait_for_url("**_search=Community**")  # type: ignore[attr-defined]
    assert page.locator("table.rows-and-columns tbody tr").count() > 0  # type: ignore[attr-defined]
    exports = {
        name: page.locator("p.export-links a", has_text=name).first.get_attribute("href")  # type: ignore[attr-defined]
        for name in ("CSV", "json")
    }
    csv = httpx.get(f"{datasette_url}{exports['CSV']}", timeout=10)
    rows = httpx.get(f"{datasette_url}{exports['json']}&_shape=array", timeout=10).json()
    assert rows and all(r["outcome"] == "rejected" and "Community" in r["request_body"] for r in rows)
    header = csv.text.splitlines()[0].split(",")  # every column (and the labels of the linked ones)
    assert csv.status_code == 200 and {"entry_hash", "request_body", "topic_id_label"} <= set(header)
    assert errors == []


def test_every_column_and_every_field_one_click_away(browser: object, datasette_url: str) -> None:
    page, errors = open_page(browser, f"{datasette_url}/audit/audit_log", viewport=LAPTOP)
    conn = sqlite3.connect(datasette_url.db)  # type: ignore[attr-defined]
    stored = len(conn.execute("PRAGMA table_info(audit_log)").fetchall())
    conn.close()
    page.locator("p.columns-switch a", has_text=f"all {stored} columns").click()  # type: ignore[attr-defined]
    page.wait_for_url("**_columns=all**")  # type: ignore[attr-defined]
    assert page.locator("table.rows-and-columns th").count() == stored  # type: ignore[attr-defined]
    assert whole_rows_on_screen(page) >= 5  # long values are shortened, rows stay one line
    body = page.locator("td.col-request_body a.shortened").first  # type: ignore[attr-defined]
    body.click()
    page.wait_for_url("**#request_body")  # type: ignore[attr-defined]
    shown = page.locator("dt#request_body + dd pre").first  # type: ignore[attr-defined]
    assert shown.is_visible() and '\n  "CallbackCommand": ' in shown.inner_text()
    assert errors == []


def overflowing(page: object) -> list[str]:
    """Elements of the page wider than the screen or than their own box (that would scroll sideways)."""
    return page.evaluate(  # type: ignore[attr-defined,no-any-return]
        """(width) => [...document.querySelectorAll(".row-page *")]
            .filter((e) => e.getBoundingClientRect().right > width + 0.5 || e.scrollWidth > e.clientWidth + 1)
            .filter((e) => getComputedStyle(e).overflowY !== "auto" || e.scrollWidth > e.clientWidth + 1)
            .map((e) => e.tagName + "." + e.className + " " + e.scrollWidth + ">" + e.clientWidth)""",
        LAPTOP[0],
    )


def test_the_page_of_one_callback(browser: object, datasette_url: str) -> None:
    """An entry that was forwarded (and failed): one page, top to bottom, nothing wider than the screen;
    the outcome, the topic id and our answer on the first screen, the delivery attempt inline."""
    conn = sqlite3.connect(datasette_url.db)  # type: ignore[attr-defined]
    entry, topic = conn.execute(
        "SELECT id, topic_id FROM audit_log WHERE id < 30 AND id % 2 = 1 AND outcome = 'accepted' "
        "AND topic_id IN (SELECT topic_id FROM topics) LIMIT 1"
    ).fetchone()
    conn.close()
    page, errors = open_page(browser, f"{datasette_url}/audit/audit_log/{entry}", viewport=LAPTOP)
    page.screenshot(path=str(ARTIFACTS / "callback-first-screen.png"))  # type: ignore[attr-defined]
    page.screenshot(path=str(ARTIFACTS / "callback.png"), full_page=True)  # type: ignore[attr-defined]
    assert page.evaluate("document.documentElement.scrollWidth") <= LAPTOP[0]  # type: ignore[attr-defined]
    assert overflowing(page) == []
    on_first_screen = {
        "outcome": page.locator("dt#outcome + dd"),  # type: ignore[attr-defined]
        "topic": page.locator("dt#topic_id + dd"),  # type: ignore[attr-defined]
        "answer": page.locator("dt#response_body + dd pre"),  # type: ignore[attr-defined]
    }
    for name, locator in on_first_screen.items():
        box = locator.bounding_box()
        assert box is not None and box["y"] + box["height"] <= LAPTOP[1], (name, box)
        size = float(locator.evaluate("(e) => parseFloat(getComputedStyle(e).fontSize)"))
        assert size >= 12, (name, size)
    assert on_first_screen["outcome"].inner_text() == "accepted"
    assert topic in on_first_screen["topic"].inner_text()
    link = on_first_screen["topic"].locator("a").first.get_attribute("href")
    assert link is not None and link.startswith("/audit/topics/")
    assert on_first_screen["answer"].inner_text().splitlines()[:2] == ["{", '  "ActionStatus": "OK",']
    attempts = page.locator("table.attempts tbody tr")  # type: ignore[attr-defined]
    assert attempts.count() == 1 and "HTTP 503" in attempts.first.inner_text()
    assert "failed" in page.locator("table.outbox").inner_text()  # type: ignore[attr-defined]
    page.locator("a.topic-history").first.click()  # type: ignore[attr-defined]
    page.wait_for_url("**/audit/topic_history?topic_id=*")  # type: ignore[attr-defined]
    history = page.locator("table.rows-and-columns td.col-id").all_inner_texts()  # type: ignore[attr-defined]
    assert str(entry) in history
    assert errors == []


def test_the_page_of_a_rejected_callback(browser: object, datasette_url: str) -> None:
    conn = sqlite3.connect(datasette_url.db)  # type: ignore[attr-defined]
    entry, reason = conn.execute(
        "SELECT id, reason FROM audit_log WHERE outcome = 'rejected' AND id > 40 LIMIT 1"
    ).fetchone()
    conn.close()
    page, errors = open_page(browser, f"{datasette_url}/audit/audit_log/{entry}", viewport=LAPTOP)
    page.screenshot(path=str(ARTIFACTS / "callback-rejected.png"), full_page=True)  # type: ignore[attr-defined]
    assert overflowing(page) == []
    assert page.locator("dt#reason + dd").inner_text() == reason  # type: ignore[attr-defined]
    assert "Not passed on" in page.inner_text("body")  # type: ignore[attr-defined]
    page.locator("a[rel=next]").click()  # type: ignore[attr-defined]
    page.wait_for_url(f"**/audit/audit_log/{entry + 1}")  # type: ignore[attr-defined]
    assert errors == []


def test_an_erased_callback(browser: object, datasette_url: str) -> None:
    page, errors = open_page(
        browser, f"{datasette_url}/audit/audit_log?id__gte=2975&id__lte=2985", viewport=LAPTOP
    )
    marked = page.locator("td.col-outcome span.erased")  # type: ignore[attr-defined]
    assert marked.count() == 1
    marked.locator("xpath=../..").locator("td.col-id a").click()
    page.wait_for_url("**/audit/audit_log/2980")  # type: ignore[attr-defined]
    page.screenshot(path=str(ARTIFACTS / "callback-erased.png"), full_page=True)  # type: ignore[attr-defined]
    banner = page.locator("p.erased-banner")  # type: ignore[attr-defined]
    assert banner.is_visible() and "erasure 1" in banner.inner_text() and "request" in banner.inner_text()
    assert overflowing(page) == []
    assert errors == []
