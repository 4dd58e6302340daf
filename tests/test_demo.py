"""The demo app's HTTP API, in process (httpx.ASGITransport or raw ASGI), asyncio and trio.

Tests order themselves by the server's event log (they wait for an event to appear), never by
sleeping. A search that must still be running when the test acts takes a minute unless
stopped; one that must complete is given no work time.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI

from demo.app import WORDS, DemoConfigError, DemoState, LogEvent, create_app, make_backend
from tests.workers import one_client_per_worker, wait_for_key

pytestmark = pytest.mark.anyio

LIMIT = 10  # seconds: the most any wait here may take
ROOT = Path(__file__).resolve().parent.parent  # where `python -m demo` finds the package


def state(app: FastAPI) -> DemoState:
    demo: DemoState = app.state.demo
    return demo


@asynccontextmanager
async def client(app: FastAPI, user: str = "alice") -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://demo", headers={"X-User": user}
    ) as http:
        yield http


async def wait_for(app: FastAPI, test: Callable[[LogEvent], bool]) -> LogEvent:
    """Wait until the log holds an event that passes ``test``; return it."""
    with anyio.fail_after(LIMIT):
        async with aclosing(state(app).log.follow()) as events:
            async for event in events:
                if test(event):
                    return event
    raise AssertionError("unreachable")  # pragma: no cover


def outcomes(app: FastAPI, user: str = "alice") -> dict[str, list[str]]:
    """Each operation's events in order, e.g. ``{"op-1": ["started", "superseded"]}``."""
    found: dict[str, list[str]] = {}
    for event in state(app).log.since(user=user):
        found.setdefault(event.op, []).append(event.kind)
    return found


def started(op: str) -> Callable[[LogEvent], bool]:
    return lambda event: event.op == op and event.kind == "started"


async def test_newer_keystroke_supersedes_the_running_search() -> None:
    """A newer search of the same user supersedes the running one: 409, logged 'superseded'."""
    app = create_app(work_seconds=60)
    results: dict[str, httpx.Response] = {}
    async with client(app) as http, anyio.create_task_group() as tg:

        async def search(q: str, op: str) -> None:
            results[op] = await http.get("/search", params={"q": q}, headers={"X-Operation-Id": op})

        tg.start_soon(search, "c", "op-1")
        await wait_for(app, started("op-1"))
        state(app).work_seconds = 0  # the newer search completes at once
        tg.start_soon(search, "ca", "op-2")
    assert results["op-1"].status_code == 409
    assert results["op-1"].json()["reason"] == "superseded"
    assert results["op-2"].status_code == 200
    assert results["op-2"].json()["query"] == "ca"
    assert outcomes(app) == {"op-1": ["started", "superseded"], "op-2": ["started", "completed"]}


async def test_the_panel_counts_an_older_keystroke_arriving_last_as_superseded() -> None:
    """A search whose sequence number is below the newest one seen is refused as stale: the
    log ends it "superseded" (before it started), and so does the panel (it did not count
    it: the browser test's superseded count fell one short of the log's under load)."""
    app = create_app(work_seconds=0.01)
    async with app.router.lifespan_context(app), client(app) as http:
        newer = await http.get("/search", params={"q": "ca"}, headers={"X-Sequence": "2"})
        assert newer.status_code == 200
        older = await http.get("/search", params={"q": "c"}, headers={"X-Sequence": "1"})
        assert older.status_code == 409
        with anyio.fail_after(LIMIT):
            while (stats := (await http.get("/stats")).json())["total"] < 1:  # noqa: ASYNC110
                await anyio.sleep(0.01)  # the tally is written by a task of the lifespan
        ends = [e for e in app.state.demo.log.since() if e.kind != "started"]
    assert [(e.query, e.kind) for e in ends] == [("ca", "completed"), ("c", "superseded")]
    assert stats["stopped"]["superseded"] == 1
    assert stats["total"] == 1


async def test_the_panel_counts_stopped_searches_and_the_work_they_saved() -> None:
    """GET /stats: fed by cancelkit's event seam, the panel counts a superseded search and one
    stopped by id, and the work they saved: each ran a moment of its 60 s."""
    app = create_app(work_seconds=60)
    async with app.router.lifespan_context(app), client(app) as http:
        assert (await http.get("/stats")).json()["total"] == 0
        async with anyio.create_task_group() as tg:

            async def search(q: str, op: str) -> None:
                await http.get("/search", params={"q": q}, headers={"X-Operation-Id": op})

            tg.start_soon(search, "c", "op-1")
            await wait_for(app, started("op-1"))
            tg.start_soon(search, "ca", "op-2")  # supersedes op-1
            await wait_for(app, started("op-2"))
            assert (await http.delete("/operations/op-2")).status_code == 202  # Stop
        with anyio.fail_after(LIMIT):
            # the tally is written by a task of the lifespan: poll, bounded
            while (stats := (await http.get("/stats")).json())["total"] < 2:  # noqa: ASYNC110
                await anyio.sleep(0.01)
    assert stats["stopped"] == {
        "superseded": 1,
        "requested": 1,
        "client_disconnected": 0,
        "other": 0,
    }
    assert stats["total"] == 2
    assert 100 < stats["saved_seconds"] <= 120
    assert stats["median_cancel_to_exit_ms"] is not None


async def test_one_tab_never_supersedes_another() -> None:
    """Searches of two users run side by side: bob's completes, alice's is left running."""
    app = create_app(work_seconds=60)
    results: dict[str, httpx.Response] = {}
    async with (
        client(app, "alice") as alice,
        client(app, "bob") as bob,
        anyio.create_task_group() as tg,
    ):

        async def search_as_alice() -> None:
            results["alice"] = await alice.get(
                "/search", params={"q": "c"}, headers={"X-Operation-Id": "op-a"}
            )

        tg.start_soon(search_as_alice)
        await wait_for(app, started("op-a"))
        state(app).work_seconds = 0
        results["bob"] = await bob.get(
            "/search", params={"q": "c"}, headers={"X-Operation-Id": "op-b"}
        )
        assert [op.id for op in state(app).registry.operations(owner="alice")] == ["op-a"]
        assert outcomes(app, "alice") == {"op-a": ["started"]}  # still running
        # bob cannot stop alice's search: to him it does not exist
        assert (await bob.delete("/operations/op-a")).status_code == 404
        assert (await alice.delete("/operations/op-a")).status_code == 202
    assert results["bob"].status_code == 200
    assert results["alice"].json()["reason"] == "requested"
    assert outcomes(app, "bob") == {"op-b": ["started", "completed"]}
    assert outcomes(app, "alice") == {"op-a": ["started", "cancelled"]}


async def test_stop_cancels_the_running_search_by_id() -> None:
    """DELETE /operations/{id} answers 202 'cancelled'; the search ends 409, logged 'cancelled'."""
    app = create_app(work_seconds=60)
    results: dict[str, httpx.Response] = {}
    async with client(app) as http, anyio.create_task_group() as tg:

        async def search() -> None:
            results["search"] = await http.get(
                "/search", params={"q": "can"}, headers={"X-Operation-Id": "op-stop"}
            )

        tg.start_soon(search)
        await wait_for(app, started("op-stop"))
        stop = await http.delete("/operations/op-stop")
    assert stop.status_code == 202
    assert stop.json() == {"id": "op-stop", "outcome": "cancelled"}
    assert results["search"].status_code == 409
    assert results["search"].json()["reason"] == "requested"
    end = state(app).log.since()[-1]
    assert (end.kind, end.query, end.op) == ("cancelled", "can", "op-stop")
    assert end.detail == "cancellation was requested"


async def test_stop_that_arrives_before_the_search_prevents_it() -> None:
    """A Stop that overtakes its search answers 'pending'; the search then never starts."""
    app = create_app(work_seconds=60)
    async with client(app) as http:
        stop = await http.delete("/operations/op-early")
        search = await http.get(
            "/search", params={"q": "c"}, headers={"X-Operation-Id": "op-early"}
        )
    assert stop.status_code == 202
    assert stop.json()["outcome"] == "pending"
    assert search.status_code == 409
    assert search.json()["reason"] == "requested"
    [event] = state(app).log.since()
    assert (event.kind, event.op) == ("cancelled", "op-early")
    assert event.detail.endswith("before it started")


async def test_closed_tab_stops_the_search_and_logs_client_gone() -> None:
    """A client that disconnects mid-search interrupts it; the log says 'client_gone'."""
    app = create_app(work_seconds=60)
    gone = anyio.Event()
    messages: list[MutableMapping[str, Any]] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/search",
        "raw_path": b"/search",
        "query_string": b"q=cancel",
        "headers": [(b"host", b"demo"), (b"x-user", b"alice"), (b"x-operation-id", b"op-tab")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    request_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        messages.append(message)

    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(app, scope, receive, send)
            await wait_for(app, started("op-tab"))
            gone.set()  # the tab is closed
    assert [m.get("status") for m in messages] == [499, None]  # the server drops it
    assert outcomes(app) == {"op-tab": ["started", "client_gone"]}
    assert state(app).log.since()[-1].detail == "the client disconnected"
    assert state(app).registry.statistics().running == 0
    assert state(app).slot.statistics().running == 0


async def test_completed_search_returns_the_matching_words() -> None:
    """A search nothing stops returns every word containing the query, and logs it."""
    app = create_app(work_seconds=0)
    async with client(app) as http:
        response = await http.get(
            "/search", params={"q": "Cancel"}, headers={"X-Operation-Id": "op-done"}
        )
    assert response.status_code == 200
    assert response.headers["X-Operation-Id"] == "op-done"
    expected = [word for word in WORDS if "cancel" in word]
    assert expected == ["cancel", "cancelled", "cancelling"]
    assert response.json() == {"query": "Cancel", "op": "op-done", "matches": expected}
    assert outcomes(app) == {"op-done": ["started", "completed"]}
    assert state(app).log.since()[-1].detail == "3 matches"


@pytest.mark.parametrize(
    ("params", "headers", "field"),
    [
        ({"q": ""}, {}, ["query", "q"]),
        ({"q": "x" * 101}, {}, ["query", "q"]),
        ({}, {}, ["query", "q"]),
        ({"q": "c"}, {"X-User": "a b"}, ["header", "x-user"]),
        ({"q": "c"}, {"X-Operation-Id": "no/slash"}, ["header", "X-Operation-Id"]),
    ],
    ids=["empty-query", "overlong-query", "no-query", "bad-user", "bad-operation-id"],
)
async def test_bad_input_is_422_naming_the_field(
    params: dict[str, str], headers: dict[str, str], field: list[str]
) -> None:
    """Bad queries, users and operation ids answer 422 naming the field; nothing is logged."""
    app = create_app(work_seconds=0)
    async with client(app) as http:
        response = await http.get("/search", params=params, headers=headers)
    assert response.status_code == 422
    # (a header read by several dependencies is reported once for each)
    assert {tuple(error["loc"]) for error in response.json()["detail"]} == {tuple(field)}
    assert state(app).log.since() == []


async def test_missing_user_is_422() -> None:
    """Without X-User there is no user to key the search on: 422 naming the header."""
    app = create_app(work_seconds=0)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://d") as http:
        response = await http.get("/search", params={"q": "c"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["header", "x-user"]


async def test_log_endpoint_filters_by_user_and_number() -> None:
    """GET /log returns the kept events, of one user if asked, numbered above 'after'."""
    app = create_app(work_seconds=0)
    async with client(app, "alice") as alice, client(app, "bob") as bob:
        await alice.get("/search", params={"q": "a"}, headers={"X-Operation-Id": "op-1"})
        await bob.get("/search", params={"q": "b"}, headers={"X-Operation-Id": "op-2"})
        everything = (await alice.get("/log")).json()
        bobs = (await alice.get("/log", params={"user": "bob"})).json()
        later = (await alice.get("/log", params={"after": 2})).json()
        bad = await alice.get("/log", params={"after": -1})
    assert [(e["seq"], e["kind"], e["user"]) for e in everything] == [
        (1, "started", "alice"),
        (2, "completed", "alice"),
        (3, "started", "bob"),
        (4, "completed", "bob"),
    ]
    assert [e["seq"] for e in bobs] == [3, 4]
    assert later == bobs
    assert bad.status_code == 422


async def test_log_keeps_only_the_newest_events() -> None:
    """The log is a bounded ring: past its size the oldest events drop off."""
    log = state(create_app()).log
    for n in range(1005):
        log.add("started", query=f"q{n}", op=f"op-{n}", user="alice")
    events = log.since()
    assert len(events) == 1000
    assert (events[0].seq, events[-1].seq) == (6, 1005)


class SSEClient:
    """Drives GET /events at the ASGI level, reading each event as the app sends it."""

    def __init__(self, app: FastAPI, query: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.app = app
        self.scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/events",
            "raw_path": b"/events",
            "query_string": query,
            "headers": [(b"host", b"demo"), *headers],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 80),
        }
        self.start: MutableMapping[str, Any] = {}
        self.text = ""
        self.more_body = True
        self.changed = anyio.Event()
        self.gone = anyio.Event()
        self._request_sent = False

    async def receive(self) -> dict[str, Any]:
        if not self._request_sent:
            self._request_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.start = message
        else:
            self.text += message.get("body", b"").decode()
            self.more_body = message.get("more_body", False)
        self.changed.set()
        self.changed = anyio.Event()

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """(id, data) of each complete event received so far."""
        found = []
        for block in self.text.split("\n\n")[:-1]:
            fields = dict(line.split(": ", 1) for line in block.splitlines())
            if "data" in fields:
                found.append((fields["id"], json.loads(fields["data"])))
        return found

    async def wait_events(self, count: int) -> None:
        while len(self.events()) < count:
            await self.changed.wait()


async def test_events_stream_sends_the_log_live_and_ends_at_shutdown() -> None:
    """GET /events streams the user's backlog, then new events; shutdown ends it cleanly."""
    app = create_app(work_seconds=0)
    log = state(app).log
    log.add("started", query="c", op="op-1", user="alice")
    log.add("started", query="x", op="op-x", user="bob")
    sse = SSEClient(app, b"user=alice", [])
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(sse.app, sse.scope, sse.receive, sse.send)
            await sse.wait_events(1)
            log.add("completed", query="c", op="op-1", user="alice", detail="3 matches")
            await sse.wait_events(2)
            state(app).closing.cancel()  # what DemoServer does when the server shuts down
    assert sse.start["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in sse.start["headers"]
    assert sse.text.startswith("retry: 1000\n\n")
    assert [(id, data["kind"], data["op"]) for id, data in sse.events()] == [
        ("1", "started", "op-1"),
        ("3", "completed", "op-1"),
    ]
    assert sse.more_body is False  # the stream ended properly


async def test_events_stream_resumes_after_last_event_id_and_ends_on_disconnect() -> None:
    """A reconnecting browser's Last-Event-ID skips what it saw; leaving ends the stream."""
    app = create_app(work_seconds=0)
    log = state(app).log
    for n in range(3):
        log.add("started", query="c", op=f"op-{n}", user="alice")
    sse = SSEClient(app, b"", [(b"last-event-id", b"2")])
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(sse.app, sse.scope, sse.receive, sse.send)
            await sse.wait_events(1)
            sse.gone.set()  # the tab is closed
    assert [id for id, _ in sse.events()] == ["3"]
    assert not state(app).closing.cancelled


async def test_page_and_its_files_are_served() -> None:
    """GET / is the page; its script and style come from /static (nothing from elsewhere)."""
    app = create_app()
    async with client(app) as http:
        page = await http.get("/")
        script = await http.get("/static/demo.js")
        style = await http.get("/static/demo.css")
    assert page.status_code == 200
    assert 'id="q"' in page.text
    assert 'src="/static/demo.js"' in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # no CDN, no external URL
    assert script.status_code == style.status_code == 200
    assert "EventSource" in script.text


def test_redis_backend_without_the_module_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Redis URL without cancelkit.redis fails at once, naming the missing piece."""
    import sys

    monkeypatch.setitem(sys.modules, "cancelkit.redis", None)  # as if not installed
    with pytest.raises(DemoConfigError, match=r"cancelkit\.redis\.RedisBackend"):
        make_backend("redis://127.0.0.1:6379/0")
    with pytest.raises(DemoConfigError, match="pip install"):
        create_app(redis_url="redis://127.0.0.1:6379/0")


def test_bad_work_seconds_is_refused() -> None:
    """A negative work time is refused with a message naming it."""
    with pytest.raises(ValueError, match="work_seconds must be >= 0"):
        create_app(work_seconds=-1)


# -- the command line -------------------------------------------------------------------------


def test_cli_refuses_several_workers_without_redis(capsys: pytest.CaptureFixture[str]) -> None:
    """--workers 2 without --redis exits 2, explaining that memory lives in one process."""
    from demo.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--workers", "2"])
    assert exit_info.value.code == 2
    assert "--workers above 1 needs --redis URL" in capsys.readouterr().err


def test_cli_with_redis_but_no_redis_module_exits_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--redis without cancelkit.redis exits with a message naming the missing module."""
    import sys

    from demo.__main__ import main

    monkeypatch.setitem(sys.modules, "cancelkit.redis", None)  # as if not installed
    with pytest.raises(SystemExit) as exit_info:
        main(["--redis", "redis://127.0.0.1:6379/0"])
    assert "cancelkit.redis.RedisBackend" in str(exit_info.value.code)


async def test_cli_serves_the_demo_and_prints_its_address() -> None:
    """``python -m demo --port 0`` prints 'cancelkit demo: open http://...' and serves the page."""
    import signal
    import sys

    from anyio.streams.buffered import BufferedByteReceiveStream

    with anyio.fail_after(30):
        async with await anyio.open_process(
            [sys.executable, "-m", "demo", "--port", "0"], cwd=ROOT, stderr=None
        ) as process:
            try:
                assert process.stdout is not None
                line = await BufferedByteReceiveStream(process.stdout).receive_until(b"\n", 4096)
                prefix = "cancelkit demo: open "
                assert line.decode().startswith(prefix)
                url = line.decode().removeprefix(prefix)
                assert url.startswith("http://127.0.0.1:")
                async with httpx.AsyncClient(base_url=url) as http:
                    response = await http.get("/")  # it listens already: this waits for it
                assert response.status_code == 200
                assert "cancelkit demo" in response.text
            finally:
                process.send_signal(signal.SIGTERM)
                await process.wait()


async def test_search_without_an_operation_id_gets_one() -> None:
    """Without X-Operation-Id the search gets a made-up id, returned and logged throughout."""
    app = create_app(work_seconds=0)
    async with client(app) as http:
        response = await http.get("/search", params={"q": "c"})
    op = response.headers["X-Operation-Id"]
    assert response.json()["op"] == op
    assert outcomes(app) == {op: ["started", "completed"]}


def test_cli_with_redis_and_two_workers_supersedes_across_workers(redis: Any) -> None:
    """``python -m demo --redis URL --workers 2``: a keystroke on one worker supersedes the
    search running on the other, and a Stop sent to one worker stops a search on the other."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from concurrent.futures import ThreadPoolExecutor

    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "demo", "--port", "0", "--workers", "2"),
            *("--redis", redis.url, "--work-seconds", "3", "--no-downstream"),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    clients: dict[str, httpx.Client] = {}
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip().removeprefix("cancelkit demo: open ")
        deadline = time.monotonic() + 60

        def worker_of(client: httpx.Client) -> str:
            about = client.get("/about").json()
            assert about["backend"] == "RedisBackend"
            return str(about["worker"])

        clients = one_client_per_worker(
            url, worker_of, workers=2, headers={"X-User": "tab-1"}, deadline=deadline
        )
        first, second = clients.values()
        before = second.get("/stats").json()["stopped"]
        with ThreadPoolExecutor(2) as pool:
            older = pool.submit(first.get, "/search", params={"q": "ca"})
            wait_for_key(redis, "cancelkit-demo:k:tab-1:search", deadline)
            newer = pool.submit(second.get, "/search", params={"q": "cat"})
            assert older.result().status_code == 409
            assert older.result().json()["reason"] == "superseded"
            assert newer.result().status_code == 200

            other_tab = {"X-User": "tab-2", "X-Operation-Id": "op-stop"}
            stopped = pool.submit(first.get, "/search", params={"q": "x"}, headers=other_tab)
            wait_for_key(redis, "cancelkit-demo:i:op-stop", deadline)  # on the first worker
            stop = second.delete("/operations/op-stop", headers={"X-User": "tab-2"})
            assert stop.status_code == 202
            assert stop.json()["outcome"] == "cancelled"
            assert stopped.result().status_code == 409
            assert stopped.result().json()["reason"] == "requested"
        # the live panel is the fleet's: both stops ran on the first worker, and the second
        # worker's panel counts them (one Redis hash per day, written by the event seam)
        expected = {**before, "superseded": before["superseded"] + 1}
        expected["requested"] += 1
        while (seen := second.get("/stats").json()["stopped"]) != expected:
            assert time.monotonic() < deadline, (seen, expected)
            time.sleep(0.05)  # the first worker writes its tally in the background
        assert first.get("/stats").json()["stopped"] == expected
    finally:
        for client in clients.values():
            client.close()
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=30)


async def test_a_request_without_x_user_gets_one_clear_422() -> None:
    """No X-User: one 422 that names the header once (three dependencies read it)."""
    app = create_app(work_seconds=0)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://demo"
    ) as http:
        missing = await http.get("/search", params={"q": "c"})
        malformed = await http.get("/search", params={"q": "c"}, headers={"X-User": "a b"})
    assert missing.status_code == 422
    [problem] = missing.json()["detail"]
    assert problem["loc"] == ["header", "x-user"]
    assert problem["type"] == "missing"
    assert malformed.status_code == 422
    [problem] = malformed.json()["detail"]
    assert problem["type"] == "string_pattern_mismatch"
    assert state(app).log.since() == []  # nothing ran


def test_redis_live_log_shows_what_every_worker_did_for_a_tab(redis: Any) -> None:
    """Two uvicorn workers on Redis: one worker's live log (SSE) and /log show the events of
    both workers for the tab: the search superseded on one and the one completed on the other.
    """
    import os
    import queue
    import signal
    import subprocess
    import sys
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "demo", "--port", "0", "--workers", "2"),
            *("--redis", redis.url, "--work-seconds", "2", "--no-downstream"),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    clients: dict[str, httpx.Client] = {}
    lines: queue.Queue[str | None] = queue.Queue()
    reader: threading.Thread | None = None
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip().removeprefix("cancelkit demo: open ")
        deadline = time.monotonic() + 60
        tab = {"X-User": "tab-live"}

        def worker_of(client: httpx.Client) -> str:
            return str(client.get("/about").json()["worker"])

        # One connection per worker for the searches, and one for the live log (an
        # httpx.Client used by two threads at once would open a connection to any worker).
        clients = one_client_per_worker(url, worker_of, workers=2, headers=tab, deadline=deadline)
        (worker_a, first), (worker_b, second) = clients.items()
        watchers = one_client_per_worker(url, worker_of, workers=2, headers=tab, deadline=deadline)
        watcher = watchers.pop(worker_a)  # the live log is served by the first worker
        for other in watchers.values():
            other.close()
        clients["watcher"] = watcher

        def follow() -> None:  # the page's live log
            with watcher.stream("GET", "/events", params={"user": "tab-live"}) as stream:
                for line in stream.iter_lines():
                    lines.put(line)
                    if '"completed"' in line:
                        break
            lines.put(None)

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        with ThreadPoolExecutor(1) as pool:
            older = pool.submit(first.get, "/search", params={"q": "ca"})
            # 'ca' runs on the first worker: the second one's /log (Redis) tells when
            while not second.get("/log", params={"user": "tab-live"}).json():
                assert time.monotonic() < deadline, "the first search never started"
                time.sleep(0.01)
            newer = second.get("/search", params={"q": "cat"})
            assert older.result().status_code == 409
            assert newer.status_code == 200

        seen: list[dict[str, Any]] = []
        while (line := lines.get(timeout=max(0.0, deadline - time.monotonic()))) is not None:
            if line.startswith("data: "):
                seen.append(json.loads(line.removeprefix("data: ")))
        live = [(e["query"], e["kind"], e["worker"]) for e in seen]
        assert live == [
            ("ca", "started", worker_a),
            ("ca", "superseded", worker_a),
            ("cat", "started", worker_b),
            ("cat", "completed", worker_b),
        ] or live == [
            ("ca", "started", worker_a),
            ("cat", "started", worker_b),
            ("ca", "superseded", worker_a),
            ("cat", "completed", worker_b),
        ], live
        assert [e["seq"] for e in seen] == sorted(e["seq"] for e in seen)
        # /log on the other worker reads the same fleet-wide log
        logged = second.get("/log", params={"user": "tab-live"}).json()
        assert [(e["query"], e["kind"], e["worker"]) for e in logged] == live
    finally:
        for client in clients.values():
            client.close()
        if reader is not None:
            reader.join(30)
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=30)


async def test_the_downstream_stops_with_the_search_that_called_it(anyio_backend: str) -> None:
    """downstream=True, on a real server: the search asks the downstream service over HTTP; a
    newer keystroke supersedes one search and Stop cancels the next: each time the log shows
    the downstream stopping too (its client, the search's aborted call, left)."""
    from cancelkit import CancelOnDisconnect
    from tests.test_asgi_servers import serve

    app = create_app(work_seconds=60, downstream=True)
    server = ("uvicorn", "asyncio") if anyio_backend == "asyncio" else ("hypercorn", "trio")
    answers: dict[str, httpx.Response] = {}

    def event(op: str, kind: str) -> Callable[[LogEvent], bool]:
        return lambda e: (e.op, e.kind) == (op, kind)

    async with serve(server, CancelOnDisconnect(app)) as port:
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, headers={"X-User": "alice"}) as http:

            async def search(q: str, op: str) -> None:
                headers = {"X-Operation-Id": op}
                answers[op] = await http.get("/search", params={"q": q}, headers=headers)

            async with anyio.create_task_group() as tg:
                tg.start_soon(search, "ca", "op-1")
                await wait_for(app, event("op-1", "downstream_started"))
                tg.start_soon(search, "cat", "op-2")  # supersedes op-1
                await wait_for(app, event("op-2", "downstream_started"))
                assert (await http.delete("/operations/op-2")).status_code == 202
            stopped = [
                await wait_for(app, event(op, "downstream_stopped")) for op in ("op-1", "op-2")
            ]
    assert answers["op-1"].json()["reason"] == "superseded"
    assert answers["op-2"].json()["reason"] == "requested"
    assert [e.detail for e in stopped] == ["the client disconnected"] * 2
    ops = outcomes(app)
    assert sorted(ops["op-1"]) == [
        "downstream_started",
        "downstream_stopped",
        "started",
        "superseded",
    ]
    assert sorted(ops["op-2"]) == [
        "cancelled",
        "downstream_started",
        "downstream_stopped",
        "started",
    ]
