"""The demo in a real browser: Debian's Chromium, headless, driven by Playwright for Python.

The demo runs under a real uvicorn on 127.0.0.1 (in a thread, on a free port). The browser is
the system's ``/usr/bin/chromium``: Playwright never downloads one here. What the server did
is checked through its event log (``GET /log``); what the person sees, through the page.

Set ``CANCELKIT_DEMO_SCREENSHOTS`` to a directory to save screenshots of the key moments.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import uvicorn

from demo.app import DemoServer, create_app
from tests.programs import program, unavailable

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM_ARGS = [
    "--no-sandbox",  # needed as root
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
WORK_SECONDS = 2.0  # long enough to act mid-search, short enough for a quick test
LIMIT = 15.0  # seconds: the most any wait here may take
MS = int(LIMIT * 1000)
SCREENSHOTS = os.environ.get("CANCELKIT_DEMO_SCREENSHOTS")
#: benchmarks/demo_browser_repeat.py runs the typing tests this many times in one session.
REPEAT = range(int(os.environ.get("CANCELKIT_DEMO_REPEAT", "1")))


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The demo under uvicorn on 127.0.0.1; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(work_seconds=WORK_SECONDS)
    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False)
    demo_server = DemoServer(config)
    thread = threading.Thread(target=demo_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + LIMIT
        while not demo_server.started:
            assert time.monotonic() < deadline, "the demo server did not start"
            assert thread.is_alive(), "the demo server stopped at start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        demo_server.should_exit = True
        thread.join(LIMIT)
        sock.close()
    assert not thread.is_alive(), "the demo server did not shut down (an event stream held it?)"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless system Chromium."""
    chromium_path = program("CANCELKIT_CHROMIUM", "chromium")
    if chromium_path is None:
        unavailable(
            "chromium is not installed: apt-get install chromium, or name it with "
            "CANCELKIT_CHROMIUM (`python -m nox` installs it when run as root)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed: pip install playwright (no browser download)")
    from playwright.sync_api import expect

    expect.set_options(timeout=MS)  # every expect() below is bounded by LIMIT
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=chromium_path, args=CHROMIUM_ARGS, headless=True, timeout=MS
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Browser, server: str) -> Iterator[Page]:
    """A fresh tab (so a fresh demo user) with the demo loaded and its live log connected."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1000, "height": 900})
    context.set_default_timeout(MS)
    tab = context.new_page()
    tab.goto(server)
    expect(tab.locator("#stream")).to_have_text("(live)")
    try:
        yield tab
    finally:
        context.close()


def user_of(page: Page) -> str:
    user: str = page.evaluate("user")
    return user


def server_log(server: str, user: str) -> list[dict[str, Any]]:
    """The server's event log for ``user``, through its API."""
    response = httpx.get(f"{server}/log", params={"user": user}, timeout=LIMIT)
    response.raise_for_status()
    events: list[dict[str, Any]] = response.json()
    return events


def wait_log(
    server: str, user: str, done: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    """Read the server's log until ``done(events)``; bounded by LIMIT."""
    deadline = time.monotonic() + LIMIT
    while True:
        events = server_log(server, user)
        if done(events):
            return events
        assert time.monotonic() < deadline, f"the server's log never got there: {events}"
        time.sleep(0.05)


def ends(events: list[dict[str, Any]]) -> dict[str, str]:
    """How each search ended, by query: {'cancel': 'completed', 'c': 'superseded', ...}."""
    return {e["query"]: e["kind"] for e in events if e["kind"] != "started"}


def shot(page: Page, name: str) -> None:
    if SCREENSHOTS:
        page.screenshot(path=str(Path(SCREENSHOTS) / f"demo-{name}.png"), full_page=True)


@pytest.mark.parametrize("attempt", REPEAT)
def test_typing_fast_completes_only_the_last_search(page: Page, server: str, attempt: int) -> None:
    """Typing 'cancel' key by key: the server completes 'cancel' only; the rest are superseded.

    In whatever order the requests arrive: the page numbers its keystrokes (``X-Sequence``).
    """
    from playwright.sync_api import expect

    user = user_of(page)
    page.locator("#q").press_sequentially("cancel", delay=30)
    shot(page, "1-typing")
    expect(page.locator("#status")).to_have_text("3 matches for “cancel”.")
    events = wait_log(server, user, lambda events: len(ends(events)) == 6)
    assert ends(events) == {
        "c": "superseded",
        "ca": "superseded",
        "can": "superseded",
        "canc": "superseded",
        "cance": "superseded",
        "cancel": "completed",
    }
    assert [e["op"] for e in events if e["kind"] == "completed"] == [
        e["op"] for e in events if e["query"] == "cancel" and e["kind"] == "started"
    ]
    # the page shows the result and the server's log, in colour by outcome
    expect(page.locator("#results li")).to_have_text(["cancel", "cancelled", "cancelling"])
    expect(page.locator("#log tr.superseded")).to_have_count(5)
    expect(page.locator("#log tbody tr").first).to_contain_text("completed")  # newest first
    expect(page.locator("#log tr.completed")).to_have_count(1)
    expect(page.locator("#stop")).to_be_disabled()
    shot(page, "2-completed")


def stats(server: str) -> dict[str, Any]:
    response = httpx.get(f"{server}/stats", timeout=LIMIT)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def test_the_panel_counts_what_the_log_shows_superseded(page: Page, server: str) -> None:
    """The live panel, fed by cancelkit's event seam: after typing a word, its superseded
    count grew by exactly the searches the server's log shows superseded; the median cancel →
    exit and the work saved are there too."""
    from playwright.sync_api import expect

    user = user_of(page)
    before = stats(server)["stopped"]["superseded"]
    page.locator("#q").press_sequentially("anyio", delay=30)
    expect(page.locator("#status")).to_have_text(re.compile("for “anyio”"))
    events = wait_log(server, user, lambda events: ends(events).get("anyio") == "completed")
    superseded = sum(e["kind"] == "superseded" for e in events)
    assert superseded >= 1  # typed faster than a search takes: a few were superseded
    expect(page.locator("#stat-superseded")).to_have_text(str(before + superseded))
    after = stats(server)
    assert after["stopped"]["superseded"] == before + superseded
    assert after["median_cancel_to_exit_ms"] is not None
    assert after["saved_seconds"] > 0  # stopped searches did not run their whole time
    expect(page.locator("#stat-latency")).to_have_text(re.compile(r"^\d+\.\d ms$"))
    shot(page, "5-panel")


@pytest.mark.parametrize("attempt", REPEAT)
def test_an_older_search_arriving_last_is_stale(page: Page, server: str, attempt: int) -> None:
    """'canc' held back in the browser until 'cancel' completed: it arrives last, is stale."""
    from playwright.sync_api import Route, expect

    held: list[Route] = []

    def hold(route: Route) -> None:
        held.append(route)

    page.route(re.compile(r"/search\?q=canc$"), hold)
    user = user_of(page)
    page.locator("#q").press_sequentially("cancel", delay=30)
    expect(page.locator("#status")).to_have_text("3 matches for “cancel”.")
    assert len(held) == 1
    held[0].continue_()  # the older search reaches the server now, after the newest one
    events = wait_log(server, user, lambda events: len(ends(events)) == 6)
    assert ends(events) == {
        "c": "superseded",
        "ca": "superseded",
        "can": "superseded",
        "canc": "superseded",
        "cance": "superseded",
        "cancel": "completed",
    }
    (late,) = (e for e in events if e["query"] == "canc")
    assert late["detail"].startswith("stale:")
    assert late["detail"].endswith("before it started")
    expect(page.locator("#status")).to_have_text("3 matches for “cancel”.")  # unchanged
    expect(page.locator("#results li")).to_have_text(["cancel", "cancelled", "cancelling"])


def test_stop_cancels_the_running_search_by_id(page: Page, server: str) -> None:
    """Stop mid-search: the server logs the search cancelled (by its id); the page says so."""
    from playwright.sync_api import expect

    user = user_of(page)
    page.locator("#q").fill("token")
    wait_log(server, user, lambda events: any(e["kind"] == "started" for e in events))
    expect(page.locator("#stop")).to_be_enabled()
    shot(page, "3-running")
    page.locator("#stop").click()
    expect(page.locator("#status")).to_have_text("Stopped the search for “token”.")
    expect(page.locator("#log tr.cancelled")).to_have_count(1)
    events = server_log(server, user)
    assert [(e["kind"], e["query"]) for e in events] == [
        ("started", "token"),
        ("cancelled", "token"),
    ]
    assert events[0]["op"] == events[1]["op"]
    assert events[1]["detail"] == "cancellation was requested"
    expect(page.locator("#results li")).to_have_count(0)
    shot(page, "4-stopped")


def test_closing_the_tab_mid_search_stops_it(page: Page, server: str, browser: Browser) -> None:
    """Closing the tab mid-search: the server logs 'client_gone'; another tab's log shows it."""
    from playwright.sync_api import expect

    watcher = browser.new_context().new_page()  # a second tab, following every tab's log
    watcher.set_default_timeout(MS)
    watcher.goto(server)
    watcher.locator("#all-tabs").check()
    expect(watcher.locator("#stream")).to_have_text("(live)")
    user = user_of(page)
    page.locator("#q").fill("worker")
    wait_log(server, user, lambda events: any(e["kind"] == "started" for e in events))
    page.close()
    events = wait_log(server, user, lambda events: len(events) == 2)
    assert [(e["kind"], e["query"]) for e in events] == [
        ("started", "worker"),
        ("client_gone", "worker"),
    ]
    assert events[1]["detail"] == "the client disconnected"
    expect(watcher.locator(f'#log tr.client_gone[data-user="{user}"]')).to_have_text(
        [re.compile(r"client gone\s*worker")]
    )
    shot(watcher, "5-client-gone")
    watcher.context.close()


def test_export_button_shows_progress_and_stop_export_cancels_it(page: Page, server: str) -> None:
    """Export starts a background operation; its progress shows; Stop export cancels it."""
    from playwright.sync_api import expect

    page.locator("#export-start").click()
    expect(page.locator("#export-status")).to_have_text(re.compile(r"^Exporting: \d+ of \d+ words"))
    assert float(page.locator("#export-progress").get_attribute("value") or 0) > 0
    shot(page, "4-export")
    page.locator("#export-stop").click()
    expect(page.locator("#export-status")).to_have_text("Export stopped: requested.")
    expect(page.locator("#export-start")).to_be_enabled()
    expect(page.locator("#export-stop")).to_be_disabled()
