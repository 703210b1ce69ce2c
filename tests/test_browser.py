"""A real headless Chromium loads the real Datasette pages (``topic-audit explore`` as a process): the
dashboard's charts render, the audit_log table shows rows, and no page raises a JavaScript error.
Screenshots are saved under test-artifacts/ for a person to look at."""

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
from conftest import free_port, require_tool

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
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
    generate_log(db, 800, seed=5)
    port = free_port()
    env = {**os.environ, "TOPIC_AUDIT_DB": str(db), "TOPIC_AUDIT_EXPLORE_PORT": str(port)}
    log = (folder / "explore.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "topic_audit.cli", "explore"], env=env, stdout=log, stderr=log
    )
    url = Url(f"http://127.0.0.1:{port}")
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
    try:
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
    page.wait_for_selector(".vega-embed svg, .vega-embed canvas", timeout=20000)  # type: ignore[attr-defined]
    page.wait_for_timeout(1500)  # type: ignore[attr-defined]
    charts = page.locator(".vega-embed")  # type: ignore[attr-defined]
    assert charts.count() == 4
    for i in range(charts.count()):
        drawn = charts.nth(i).locator("svg path, svg rect, canvas").count()
        assert drawn > 0, f"chart {i} is empty"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-callbacks.png"), full_page=True)  # type: ignore[attr-defined]
    shown = page.inner_text("body")  # type: ignore[attr-defined]
    conn = sqlite3.connect(datasette_url.db)  # type: ignore[attr-defined]
    total, rejected = conn.execute("SELECT count(*), sum(outcome = 'rejected') FROM audit_log").fetchone()
    conn.close()
    assert f"\n{total}\n" in shown and f"\n{rejected}\n" in shown, shown[:500]  # the metric cards
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


@pytest.mark.parametrize("table", ["audit_log", "topics"])
def test_table_pages_show_rows_in_the_first_screen(browser: object, datasette_url: str, table: str) -> None:
    """On a laptop screen (1280x800) the first rows are visible without scrolling; the column
    descriptions are folded away but one click (or a hover on a header) shows them."""
    page, errors = open_page(browser, f"{datasette_url}/audit/{table}", viewport=(1280, 800))
    first = page.locator("table.rows-and-columns tbody tr").first  # type: ignore[attr-defined]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{table}-first-screen.png"))  # type: ignore[attr-defined]
    box = first.bounding_box()
    assert box is not None and box["y"] + box["height"] <= 800, f"first row at {box}"
    assert not page.locator("dl.column-descriptions").is_visible()  # type: ignore[attr-defined]
    help_list = page.locator("details.column-help dl")  # type: ignore[attr-defined]
    assert not help_list.is_visible()
    header = page.locator("th[data-column='group_id']")  # type: ignore[attr-defined]
    assert header.get_attribute("title"), "the column header has no description tooltip"
    page.locator("details.column-help summary").click()  # type: ignore[attr-defined]
    assert help_list.is_visible()
    assert ("entry_hash" if table == "audit_log" else "deleted_entry_id") in help_list.inner_text()
    assert errors == []
