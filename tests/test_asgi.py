"""Plain ASGI tests of cancel-on-disconnect, with hand-written receive and send."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from cancelkit import (
    BackendUnavailable,
    CancelKind,
    CancellationToken,
    CancelOnDisconnect,
    CancelReason,
    DisconnectGuard,
    DisconnectStatistics,
    OperationCancelled,
    TokenRegistry,
    current_token,
    request_token,
    shielded_cleanup,
)

pytestmark = pytest.mark.anyio

Message = dict[str, Any]
App = Callable[[Any, Any, Any], Awaitable[None]]

DISCONNECT: Message = {"type": "http.disconnect"}


def body(data: bytes = b"", *, more: bool = False) -> Message:
    return {"type": "http.request", "body": data, "more_body": more}


def http_scope(path: str = "/", method: str = "GET") -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "client": ("127.0.0.1", 5000)}


class FakeServer:
    """The server side of one ASGI exchange: a queue for receive, a list for send."""

    def __init__(self, *messages: Message, send_error: Exception | None = None) -> None:
        self._queue: deque[Message] = deque(messages)
        self._arrived = anyio.Event()
        self.pulled = 0
        self.sent: list[Message] = []
        self.send_error = send_error
        self.receive_error: Exception | None = None

    def client(self, message: Message) -> None:
        self._queue.append(message)
        self._arrived.set()

    async def receive(self) -> Message:
        if self.receive_error is not None:
            raise self.receive_error
        while not self._queue:
            self._arrived = anyio.Event()
            await self._arrived.wait()
        self.pulled += 1
        return self._queue.popleft()

    async def send(self, message: Any) -> None:
        if self.send_error is not None:
            raise self.send_error
        self.sent.append(dict(message))

    @property
    def status(self) -> int | None:
        for message in self.sent:
            if message["type"] == "http.response.start":
                return int(message["status"])
        return None


async def respond(send: Any, text: bytes = b"ok", status: int = 200) -> None:
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": text})


class Probe:
    """Records what a test handler saw, for the assertions."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.release = anyio.Event()
        self.cleaned_up = False
        self.finished = False
        self.token: CancellationToken | None = None
        self.current: CancellationToken | None = None
        self.received: list[Message] = []


def waiting_app(probe: Probe) -> App:
    """A handler that starts, waits to be released, then answers; cleanup in ``finally``."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        probe.token = request_token(scope)
        probe.current = current_token()
        probe.started.set()
        try:
            await probe.release.wait()
            probe.finished = True
            await respond(send)
        finally:
            probe.cleaned_up = True

    return app


async def test_token_in_scope_and_current_token() -> None:
    """The request's token is reachable from the scope and from current_token() inside."""
    probe = Probe()
    probe.release.set()
    server = FakeServer(body())
    scope = http_scope()
    await CancelOnDisconnect(waiting_app(probe))(scope, server.receive, server.send)
    assert probe.token is not None
    assert probe.current is probe.token
    assert request_token(scope) is probe.token
    assert current_token() is None
    assert server.status == 200


async def test_signal_mode_sets_current_token() -> None:
    """In signalling mode current_token() also returns the request's token."""
    probe = Probe()
    probe.release.set()
    server = FakeServer(body())
    await CancelOnDisconnect(waiting_app(probe), mode="signal")(
        http_scope(), server.receive, server.send
    )
    assert probe.current is probe.token is not None


def test_request_token_without_middleware() -> None:
    """request_token() explains what is missing when no guard runs the request."""
    with pytest.raises(LookupError, match="CancelOnDisconnect"):
        request_token(http_scope())


def assert_answered_nobody(server: FakeServer) -> None:
    """The server got one 499 answer, nothing else: the client that left reads none."""
    assert [m["type"] for m in server.sent] == ["http.response.start", "http.response.body"]
    assert server.sent[0]["status"] == 499
    assert (b"connection", b"close") in server.sent[0]["headers"]


async def test_disconnect_interrupts_handler_quietly(caplog: pytest.LogCaptureFixture) -> None:
    """A disconnect cancels the handler's awaits, runs its cleanup, logs 499, and hands the
    server a 499 answer nobody reads (an outer BaseHTTPMiddleware needs a response)."""
    caplog.set_level(logging.INFO, logger="cancelkit")
    probe = Probe()
    server = FakeServer(body())
    mw = CancelOnDisconnect(waiting_app(probe))
    async with anyio.create_task_group() as tg:
        tg.start_soon(mw, http_scope("/slow"), server.receive, server.send)
        await probe.started.wait()
        await anyio.wait_all_tasks_blocked()
        server.client(DISCONNECT)
    assert probe.token is not None
    assert probe.token.reason is not None
    assert probe.token.reason.kind is CancelKind.CLIENT_DISCONNECTED
    assert probe.cleaned_up
    assert not probe.finished
    assert_answered_nobody(server)
    records = [r for r in caplog.records if r.name == "cancelkit"]
    assert [r.levelno for r in records] == [logging.INFO]
    assert '"GET /slow" 499' in records[0].getMessage()
    assert records[0].exc_info is None
    assert mw.statistics() == DisconnectStatistics(
        requests=1, running=0, watchers=1, disconnects=1, interrupted=1, shutdown_cancelled=0
    )


async def test_signal_mode_only_cancels_token() -> None:
    """In signalling mode the handler keeps running after a disconnect; its token is cancelled."""
    probe = Probe()
    server = FakeServer(body())
    mw = CancelOnDisconnect(waiting_app(probe), mode="signal")
    async with anyio.create_task_group() as tg:
        tg.start_soon(mw, http_scope(), server.receive, server.send)
        await probe.started.wait()
        await anyio.wait_all_tasks_blocked()
        server.client(DISCONNECT)
        await anyio.wait_all_tasks_blocked()
        assert probe.token is not None
        assert probe.token.cancelled
        assert not probe.finished
        probe.release.set()
    assert probe.finished
    assert_answered_nobody(server)  # the handler's own answer is dropped
    assert mw.statistics().disconnects == 1
    assert mw.statistics().interrupted == 0


async def test_signal_mode_raise_if_cancelled_ends_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """OperationCancelled for the request's own token ends the request as a quiet 499."""
    caplog.set_level(logging.INFO, logger="cancelkit")
    ready = anyio.Event()
    gone = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        token = request_token(scope)
        token.on_cancel(lambda _: gone.set())
        ready.set()
        await gone.wait()
        token.raise_if_cancelled()

    server = FakeServer(body())
    mw = CancelOnDisconnect(app, mode="signal")
    async with anyio.create_task_group() as tg:
        tg.start_soon(mw, http_scope(), server.receive, server.send)
        await ready.wait()
        await anyio.wait_all_tasks_blocked()
        server.client(DISCONNECT)
    assert_answered_nobody(server)
    assert any("499" in r.getMessage() for r in caplog.records)
    assert mw.statistics().interrupted == 1


async def test_foreign_operation_cancelled_propagates() -> None:
    """OperationCancelled from some other token is the application's error: it propagates."""
    other = CancellationToken()
    other.cancel()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        other.raise_if_cancelled()

    server = FakeServer(body())
    with pytest.raises(OperationCancelled):
        await CancelOnDisconnect(app)(http_scope(), server.receive, server.send)


async def test_app_exception_is_not_wrapped() -> None:
    """An application's exception reaches the server as it is, not in an exception group."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await anyio.lowlevel.checkpoint()
        raise ValueError("boom")

    server = FakeServer(body())
    with pytest.raises(ValueError, match="boom"):
        await CancelOnDisconnect(app)(http_scope(), server.receive, server.send)


@pytest.mark.parametrize("started", [False, True], ids=["before", "after-the-response-started"])
async def test_an_unreachable_backend_is_a_503_until_the_response_started(started: bool) -> None:
    """BackendUnavailable escaping the application (Redis down, fail_open=False) is answered
    503 with Retry-After from the one table; once the response started it propagates."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if started:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        raise BackendUnavailable("cannot reach Redis at redis://127.0.0.1:1/0")

    server = FakeServer(body())
    guarded = CancelOnDisconnect(app)
    if started:
        with pytest.raises(BackendUnavailable):
            await guarded(http_scope(), server.receive, server.send)
        assert server.status == 200
        return
    await guarded(http_scope(), server.receive, server.send)
    assert server.status == 503
    assert (b"retry-after", b"1") in server.sent[0]["headers"]
    assert json.loads(server.sent[1]["body"])["reason"] == "unavailable"


async def test_outer_cancellation_propagates(caplog: pytest.LogCaptureFixture) -> None:
    """A cancellation the guard did not cause (server shutdown) is not swallowed."""
    caplog.set_level(logging.INFO, logger="cancelkit")
    probe = Probe()
    server = FakeServer(body())
    mw = CancelOnDisconnect(waiting_app(probe))
    with anyio.CancelScope() as outer:
        async with anyio.create_task_group() as tg:
            tg.start_soon(mw, http_scope(), server.receive, server.send)
            await probe.started.wait()
            await anyio.wait_all_tasks_blocked()
            outer.cancel()
    assert outer.cancelled_caught
    assert probe.cleaned_up
    assert probe.token is not None
    assert not probe.token.cancelled
    assert not caplog.records


async def test_outer_and_disconnect_together_propagates() -> None:
    """An outer cancellation arriving with a disconnect still propagates."""
    probe = Probe()
    server = FakeServer(body())
    mw = CancelOnDisconnect(waiting_app(probe))
    with anyio.CancelScope() as outer:
        async with anyio.create_task_group() as tg:
            tg.start_soon(mw, http_scope(), server.receive, server.send)
            await probe.started.wait()
            await anyio.wait_all_tasks_blocked()
            server.client(DISCONNECT)
            outer.cancel()
    assert outer.cancelled_caught


async def test_disconnect_after_response_is_not_client_leaving() -> None:
    """A disconnect after the response completed cancels nothing (background work goes on)."""
    probe = Probe()
    responded = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        probe.token = request_token(scope)
        await anyio.lowlevel.checkpoint()
        await respond(send)
        responded.set()
        await probe.release.wait()  # "background task" after the response
        probe.finished = True

    server = FakeServer(body())
    mw = CancelOnDisconnect(app)
    async with anyio.create_task_group() as tg:
        tg.start_soon(mw, http_scope(), server.receive, server.send)
        await responded.wait()
        server.client(DISCONNECT)  # uvicorn repeats http.disconnect after the response
        await anyio.wait_all_tasks_blocked()
        probe.release.set()
    assert probe.finished
    assert probe.token is not None
    assert not probe.token.cancelled
    assert mw.statistics().disconnects == 0


@pytest.mark.parametrize("mode", ["interrupt", "signal"])
async def test_oserror_from_send_is_a_disconnect(mode: Any) -> None:
    """OSError from send cancels the token; interrupt mode unwinds, signal mode re-raises."""
    seen: list[BaseException] = []
    token_box: list[CancellationToken] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        token_box.append(request_token(scope))
        try:
            await respond(send)
        except OSError as exc:
            seen.append(exc)
        await send({"type": "http.response.body", "body": b"more"})  # dropped

    server = FakeServer(body(), send_error=ConnectionResetError("gone"))
    mw = CancelOnDisconnect(app, mode=mode)
    await mw(http_scope(), server.receive, server.send)
    reason = token_box[0].reason
    assert reason is not None
    assert reason.kind is CancelKind.CLIENT_DISCONNECTED
    assert len(seen) == (1 if mode == "signal" else 0)
    assert mw.statistics().disconnects == 1


async def test_oserror_in_shielded_cleanup_send_reraises() -> None:
    """A send failing inside a shield (where nothing can unwind) raises the OSError."""
    seen: list[BaseException] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        with shielded_cleanup(1.0):
            try:
                await respond(send)
            except OSError as exc:
                seen.append(exc)

    server = FakeServer(body(), send_error=BrokenPipeError())
    await CancelOnDisconnect(app)(http_scope(), server.receive, server.send)
    assert len(seen) == 1


async def test_fast_path_starts_no_watcher() -> None:
    """A request that completes without yielding to the loop never starts a watcher."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await respond(send)

    server = FakeServer(body())
    mw = CancelOnDisconnect(app)
    await mw(http_scope(), server.receive, server.send)
    await anyio.wait_all_tasks_blocked()
    assert server.status == 200
    assert server.pulled == 0
    assert mw.statistics().watchers == 0


async def test_watcher_stopped_when_app_returns() -> None:
    """The watcher waiting on receive() is stopped when the request ends."""
    server = FakeServer(body())
    mw = CancelOnDisconnect(waiting_app(probe := Probe()))
    async with anyio.create_task_group() as tg:
        tg.start_soon(mw, http_scope(), server.receive, server.send)
        await probe.started.wait()
        await anyio.wait_all_tasks_blocked()
        assert server.pulled == 1  # the body; now waiting for a disconnect
        probe.release.set()
    await anyio.wait_all_tasks_blocked()
    assert mw.statistics().watchers == 1
    server.client(DISCONNECT)
    await anyio.wait_all_tasks_blocked()
    assert server.pulled == 1  # nobody is reading any more


async def test_streaming_response_and_disconnect(caplog: pytest.LogCaptureFixture) -> None:
    """A streaming response stops at a disconnect; nothing more is sent, no error logged."""
    caplog.set_level(logging.INFO)
    sent_chunks = anyio.Event()
    token_box: list[CancellationToken] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        token_box.append(request_token(scope))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(1000):
            await send({"type": "http.response.body", "body": b"%d" % i, "more_body": True})
            if i == 2:
                sent_chunks.set()
            await anyio.lowlevel.checkpoint()

    server = FakeServer(body())
    async with anyio.create_task_group() as tg:
        tg.start_soon(CancelOnDisconnect(app), http_scope(), server.receive, server.send)
        await sent_chunks.wait()
        server.client(DISCONNECT)
    assert len(server.sent) < 1000
    assert token_box[0].cancelled
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (409, CancelReason(CancelKind.REQUESTED)),
        (409, CancelReason(CancelKind.SUPERSEDED, source="newer")),
        (504, CancelReason(CancelKind.DEADLINE)),
        (503, CancelReason(CancelKind.SHUTDOWN)),
        (504, CancelReason(CancelKind.PARENT, origin=CancelReason(CancelKind.DEADLINE))),
    ],
)
async def test_token_cancelled_otherwise_answers_client(
    status: int, reason: CancelReason, caplog: pytest.LogCaptureFixture
) -> None:
    """A token cancelled for another reason interrupts and answers the waiting client (the
    one table: requested/superseded 409, deadline 504, shutdown 503, parent as its root)."""
    caplog.set_level(logging.INFO, logger="cancelkit")
    probe = Probe()
    server = FakeServer(body())
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            CancelOnDisconnect(waiting_app(probe)), http_scope(), server.receive, server.send
        )
        await probe.started.wait()
        assert probe.token is not None
        probe.token.cancel(reason)
    assert server.status == status
    root = reason.root
    assert json.loads(server.sent[-1]["body"]) == {
        "detail": root.message,
        "reason": root.kind.value,
        "source": root.source,
    }
    assert "ended:" in caplog.records[-1].getMessage()


async def test_shutdown_cancels_in_flight_after_grace() -> None:
    """shutdown() cancels in-flight tokens with reason shutdown and answers 503."""
    probe = Probe()
    server = FakeServer(body())
    mw = CancelOnDisconnect(waiting_app(probe), shutdown_grace=0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(mw, http_scope(), server.receive, server.send)
        await probe.started.wait()
        await mw.shutdown()
    assert mw.statistics().running == 0
    assert probe.token is not None
    assert probe.token.reason is not None
    assert probe.token.reason.kind is CancelKind.SHUTDOWN
    assert server.status == 503
    assert mw.statistics().shutdown_cancelled == 1
    assert "shutting down" in repr(mw)


async def test_shutdown_grace_lets_requests_finish() -> None:
    """A request that finishes within the grace period is not cancelled."""
    probe = Probe()
    server = FakeServer(body())
    mw = CancelOnDisconnect(waiting_app(probe))
    async with anyio.create_task_group() as tg:
        tg.start_soon(mw, http_scope(), server.receive, server.send)
        await probe.started.wait()
        tg.start_soon(mw.shutdown, 60.0)
        await anyio.wait_all_tasks_blocked()
        probe.release.set()
    assert probe.finished
    assert probe.token is not None
    assert not probe.token.cancelled
    assert mw.statistics().shutdown_cancelled == 0


async def test_shutdown_ends_streaming_response() -> None:
    """A streaming response in flight at shutdown ends, left incomplete so the client can tell."""
    streaming = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"tick", "more_body": True})
        streaming.set()
        await anyio.sleep_forever()

    server = FakeServer(body())
    mw = CancelOnDisconnect(app, shutdown_grace=0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(mw, http_scope(), server.receive, server.send)
        await streaming.wait()
        await mw.shutdown()
    assert server.sent[-1] == {"type": "http.response.body", "body": b"tick", "more_body": True}


async def test_shutdown_after_response_complete_sends_nothing_more() -> None:
    """A request cancelled at shutdown after its response was sent gets nothing extra."""
    done = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await respond(send)
        done.set()
        await anyio.sleep_forever()  # background work

    server = FakeServer(body())
    mw = CancelOnDisconnect(app, shutdown_grace=0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(mw, http_scope(), server.receive, server.send)
        await done.wait()
        await mw.shutdown()
    assert len(server.sent) == 2


async def test_interrupted_answer_to_gone_client_is_dropped() -> None:
    """If answering an interrupted request fails with OSError the request still ends quietly."""
    probe = Probe()
    server = FakeServer(body())
    mw = CancelOnDisconnect(waiting_app(probe), shutdown_grace=0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(mw, http_scope(), server.receive, server.send)
        await probe.started.wait()
        server.send_error = BrokenPipeError()
        await mw.shutdown()
    assert server.sent == []


async def test_request_after_shutdown_starts_cancelled() -> None:
    """A request arriving after shutdown began is refused with 503 at once."""
    probe = Probe()
    probe.release.set()
    mw = CancelOnDisconnect(waiting_app(probe), shutdown_grace=0)
    await mw.shutdown()
    server = FakeServer(body())
    await mw(http_scope(), server.receive, server.send)
    assert server.status == 503
    assert not probe.finished


async def test_lifespan_shutdown_triggers_shutdown() -> None:
    """lifespan.shutdown cancels in-flight requests before the app sees it; startup passes."""
    probe = Probe()
    lifespan_seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                lifespan_seen.append(message["type"])
                if message["type"] == "lifespan.shutdown":
                    assert probe.token is not None
                    assert probe.token.cancelled
                    await send({"type": "lifespan.shutdown.complete"})
                    return
                await send({"type": "lifespan.startup.complete"})
        await waiting_app(probe)(scope, receive, send)

    mw = CancelOnDisconnect(app, shutdown_grace=0)
    life = FakeServer({"type": "lifespan.startup"})
    server = FakeServer(body())
    async with anyio.create_task_group() as tg:
        tg.start_soon(mw, {"type": "lifespan"}, life.receive, life.send)
        tg.start_soon(mw, http_scope(), server.receive, server.send)
        await probe.started.wait()
        life.client({"type": "lifespan.shutdown"})
    assert lifespan_seen == ["lifespan.startup", "lifespan.shutdown"]
    assert [m["type"] for m in life.sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert server.status == 503


async def test_the_middleware_serves_again_after_a_lifespan_shutdown() -> None:
    """A module-level app served twice (a test suite serving it in two tests): after one
    lifespan's shutdown, the next lifespan's startup makes it accept requests again (it
    answered 503 "shutting down" to every later request)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        await respond(send)

    mw = CancelOnDisconnect(app, shutdown_grace=0)
    statuses = []
    for _ in range(2):
        life = FakeServer({"type": "lifespan.startup"})
        async with anyio.create_task_group() as tg:
            tg.start_soon(mw, {"type": "lifespan"}, life.receive, life.send)
            await anyio.wait_all_tasks_blocked()  # started, as a server waits for it
            assert life.sent[-1] == {"type": "lifespan.startup.complete"}
            server = FakeServer(body())
            await mw(http_scope(), server.receive, server.send)
            statuses.append(server.status)
            life.client({"type": "lifespan.shutdown"})
    assert statuses == [200, 200]


async def test_the_middleware_serves_again_once_its_lifespan_ended() -> None:
    """A module-level app served by a server (or a test's lifespan) and then by a client that
    sends no lifespan (httpx.ASGITransport): it answered 503 "shutting down" forever after the
    first shutdown. While the shutdown runs a request is still refused; once the app has
    completed it and the lifespan ended, the server is gone and a request is served."""
    shutting_down = anyio.Event()
    go_on = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            assert (await receive())["type"] == "lifespan.startup"
            await send({"type": "lifespan.startup.complete"})
            assert (await receive())["type"] == "lifespan.shutdown"
            shutting_down.set()
            await go_on.wait()  # the app's own shutdown work
            await send({"type": "lifespan.shutdown.complete"})
            return
        await respond(send)

    mw = CancelOnDisconnect(app, shutdown_grace=0)
    life = FakeServer({"type": "lifespan.startup"}, {"type": "lifespan.shutdown"})
    statuses = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(mw, {"type": "lifespan"}, life.receive, life.send)
        await shutting_down.wait()
        during = FakeServer(body())
        await mw(http_scope(), during.receive, during.send)
        statuses.append(during.status)
        go_on.set()
    assert life.sent[-1] == {"type": "lifespan.shutdown.complete"}
    for _ in range(2):
        after = FakeServer(body())
        await mw(http_scope(), after.receive, after.send)
        statuses.append(after.status)
    assert statuses == [503, 200, 200]


async def test_websocket_passes_through() -> None:
    """WebSocket connections are passed to the app untouched."""
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((receive, send, "cancelkit.token" in scope))

    server = FakeServer()
    await CancelOnDisconnect(app)({"type": "websocket", "path": "/"}, server.receive, server.send)
    assert seen == [(server.receive, server.send, False)]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/", "interrupt"),
        ("/health", None),
        ("/healthz", "interrupt"),
        ("/static/app.js", None),
        ("/tx", "signal"),
        ("/tx/1", "signal"),
        ("/report/7", "signal"),
        ("/report/x", "interrupt"),
    ],
)
def test_path_configuration(path: str, expected: str | None) -> None:
    """exclude skips a path and what is below it; modes picks a mode per route."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError

    mw = CancelOnDisconnect(
        app,
        exclude=["/health", "/static/"],
        modes={"/tx": "signal", re.compile(r"/report/\d+"): "signal"},
    )
    assert mw.mode_for(path) == expected


def test_include_limits_guarded_paths() -> None:
    """With include, only matching paths are guarded."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError

    mw = CancelOnDisconnect(app, include=["/api"], mode="signal")
    assert mw.mode_for("/api/x") == "signal"
    assert mw.mode_for("/other") is None


async def test_excluded_path_passes_through() -> None:
    """An excluded request runs with the server's receive/send and no token."""
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((receive, send, "cancelkit.token" in scope))

    server = FakeServer()
    mw = CancelOnDisconnect(app, exclude=["/health"])
    await mw(http_scope("/health"), server.receive, server.send)
    assert seen == [(server.receive, server.send, False)]
    assert mw.statistics().requests == 0


async def test_nested_middleware_shares_token() -> None:
    """Installed twice, the inner middleware passes through and the token is the outer's."""
    probe = Probe()
    probe.release.set()
    inner = CancelOnDisconnect(waiting_app(probe))
    outer = CancelOnDisconnect(inner)
    server = FakeServer(body())
    scope = http_scope()
    await outer(scope, server.receive, server.send)
    assert probe.token is request_token(scope)
    assert inner.statistics().requests == 0
    assert outer.statistics().requests == 1


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"mode": "kill"}, ValueError),
        ({"shutdown_grace": -1}, ValueError),
        ({"max_buffer": -1}, ValueError),
        ({"modes": {"/x": "stop"}}, ValueError),
        ({"exclude": ["health"]}, ValueError),
        ({"include": [42]}, TypeError),
        ({"timeout": -1}, ValueError),
        ({"timeout": "5"}, TypeError),
    ],
)
def test_middleware_rejects_bad_configuration(kwargs: dict[str, Any], error: type) -> None:
    """Bad options are refused when the middleware is created."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError

    with pytest.raises(error):
        CancelOnDisconnect(app, **kwargs)


@pytest.mark.parametrize(
    ("scope", "kwargs"),
    [
        ({"type": "http"}, {"mode": "kill"}),
        ({"type": "http"}, {"max_buffer": -1}),
        ({"type": "http"}, {"timeout": -0.5}),
        ({"type": "websocket"}, {}),
    ],
)
def test_guard_rejects_bad_arguments(scope: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """A guard refuses unknown modes, negative buffers and timeouts, and non-HTTP scopes."""
    server = FakeServer()
    with pytest.raises(ValueError):  # noqa: PT011
        DisconnectGuard(scope, server.receive, server.send, **kwargs)


async def test_guard_repr_and_properties() -> None:
    """A guard's repr and properties show its mode and the exchange's state."""
    server = FakeServer(body())
    token = CancellationToken()
    guard = DisconnectGuard(http_scope("/r"), server.receive, server.send, token=token)
    assert guard.token is token
    assert guard.mode == "interrupt"
    assert repr(guard) == "<DisconnectGuard interrupt GET '/r' running watching=False>"
    states: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        states.append(repr(guard))
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        states.append(repr(guard))

    await guard.run(app)
    assert "responding" in states[0]
    assert "response complete" in states[1]
    assert not guard.client_gone
    gone = DisconnectGuard(http_scope(), FakeServer(DISCONNECT).receive, server.send)

    async def reader(scope: Any, receive: Any, send: Any) -> None:
        await receive()

    await gone.run(reader)
    assert gone.client_gone
    assert "client gone" in repr(gone)


def test_middleware_repr() -> None:
    """The middleware's repr shows its mode and requests in flight."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError

    assert repr(CancelOnDisconnect(app, mode="signal")).startswith(
        "<CancelOnDisconnect mode='signal' running=0 app="
    )


async def test_499_log_without_client_address(caplog: pytest.LogCaptureFixture) -> None:
    """The 499 line shows '-' when the server gives no client address."""
    caplog.set_level(logging.INFO, logger="cancelkit")
    server = FakeServer(DISCONNECT)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await anyio.sleep_forever()

    scope = http_scope()
    del scope["client"]
    await CancelOnDisconnect(app)(scope, server.receive, server.send)
    assert caplog.records[-1].getMessage() == '- "GET /" 499 client disconnected'


def test_plain_asyncio_run_without_anyio_runner() -> None:
    """The guard works under a bare asyncio.run(), as uvicorn and granian run it."""

    async def main() -> CancelReason | None:
        probe = Probe()
        server = FakeServer(body())
        task = asyncio.create_task(
            CancelOnDisconnect(waiting_app(probe))(http_scope(), server.receive, server.send)
        )
        async with asyncio.timeout(10):
            await probe.started.wait()
            await anyio.wait_all_tasks_blocked()
            server.client(DISCONNECT)
            await task
        assert probe.token is not None
        return probe.token.reason

    reason = asyncio.run(main())
    assert reason is not None
    assert reason.kind is CancelKind.CLIENT_DISCONNECTED


async def test_callers_token_deadline_answers_504() -> None:
    """A caller's token with a deadline interrupts the request when it passes: 504."""
    server = FakeServer(body())
    token = CancellationToken(timeout=0)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await anyio.sleep_forever()

    await DisconnectGuard(http_scope(), server.receive, server.send, token=token).run(app)
    assert server.status == 504
    assert token.reason is not None
    assert token.reason.kind is CancelKind.DEADLINE


async def test_token_cancelled_by_app_before_yielding_interrupts() -> None:
    """A token cancelled before the request first yields still interrupts it afterwards."""
    server = FakeServer(body())
    reached: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        request_token(scope).cancel()
        reached.append("cancelled")
        await anyio.sleep_forever()

    with anyio.fail_after(10):
        await CancelOnDisconnect(app)(http_scope(), server.receive, server.send)
    assert reached == ["cancelled"]
    assert server.status == 409  # requested


async def test_shutdown_does_not_count_tokens_already_cancelled() -> None:
    """shutdown() counts only the tokens it cancelled, not those of clients already gone."""
    probe = Probe()
    server = FakeServer(body())
    mw = CancelOnDisconnect(waiting_app(probe), mode="signal", shutdown_grace=0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(mw, http_scope(), server.receive, server.send)
        await probe.started.wait()
        await anyio.wait_all_tasks_blocked()
        server.client(DISCONNECT)
        await anyio.wait_all_tasks_blocked()
        await mw.shutdown()
        assert mw.statistics().shutdown_cancelled == 0
        probe.release.set()
    assert probe.token is not None
    assert probe.token.reason is not None
    assert probe.token.reason.kind is CancelKind.CLIENT_DISCONNECTED


# -- regressions found in review --------------------------------------------------------------


async def test_pathsend_completes_the_response() -> None:
    """A response finished with http.response.pathsend is complete: a later disconnect is no
    client leaving, and post-response work is not interrupted."""
    server = FakeServer()
    finished: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.pathsend", "path": "/etc/hostname"})
        server.client(DISCONNECT)  # the server reports the connection closed afterwards
        await anyio.wait_all_tasks_blocked()
        await anyio.lowlevel.checkpoint()
        finished.append("background work")  # e.g. a BackgroundTask after the response

    middleware = CancelOnDisconnect(app)
    await middleware(http_scope(), server.receive, server.send)
    assert finished == ["background work"]
    assert middleware.statistics().disconnects == 0


async def test_concurrent_shutdowns_both_return_when_the_server_is_idle() -> None:
    """Two shutdown() calls at once (lifespan and the server hook) both end when requests do."""
    release = anyio.Event()
    server = FakeServer()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()
        await respond(send)

    middleware = CancelOnDisconnect(app, shutdown_grace=60)
    returned: list[str] = []

    async def shutdown(name: str) -> None:
        await middleware.shutdown()
        returned.append(name)

    with anyio.fail_after(20):  # a shutdown left waiting would take the 60 s grace
        async with anyio.create_task_group() as tg:
            tg.start_soon(middleware, http_scope(), server.receive, server.send)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(shutdown, "first")
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(shutdown, "second")
            await anyio.wait_all_tasks_blocked()
            release.set()
    assert sorted(returned) == ["first", "second"]


# -- deadlines ------------------------------------------------------------------------------


def with_deadline(value: bytes, name: bytes = b"request-timeout-ms") -> dict[str, Any]:
    scope = http_scope()
    scope["headers"] = [(b"accept", b"*/*"), (name, value)]
    return scope


def header(server: FakeServer, name: bytes) -> bytes | None:
    start = next(m for m in server.sent if m["type"] == "http.response.start")
    return dict(start["headers"]).get(name)


@pytest.mark.parametrize(
    ("headers", "limit", "expected"),
    [
        ([(b"request-timeout-ms", b"5000")], None, 5.0),
        ([(b"grpc-timeout", b"7S")], 60.0, 7.0),
        ([(b"request-timeout-ms", b"9000")], 2.0, 2.0),  # the header never extends the limit
        ([], 3.0, 3.0),
        ([(b"request-timeout-ms", b"soon")], 4.0, 4.0),  # malformed: ignored
        ([], None, None),
    ],
)
async def test_the_token_deadline_is_the_smaller_limit_from_arrival(
    headers: list[tuple[bytes, bytes]], limit: float | None, expected: float | None
) -> None:
    """Header and server limit: the smaller, counted on this server's clock from arrival."""
    probe = Probe()
    scope = http_scope()
    scope["headers"] = headers
    before = time.monotonic()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        probe.token = request_token(scope)
        probe.current = current_token()
        await respond(send)

    await CancelOnDisconnect(app, timeout=limit)(scope, FakeServer(body()).receive, respond_sink)
    after = time.monotonic()
    assert probe.token is not None
    assert probe.current is probe.token
    if expected is None:
        assert probe.token.deadline == math.inf
    else:
        assert before + expected <= probe.token.deadline <= after + expected


async def respond_sink(message: Any) -> None:
    """A server send that drops the answer."""


@pytest.mark.parametrize("mode", ["interrupt", "signal"])
@pytest.mark.parametrize("value", [b"0", b"0S"])
async def test_a_request_with_nothing_left_never_runs(mode: Any, value: bytes) -> None:
    """0 ms left on arrival: 504 Deadline-Expired at once, the application never called."""
    server = FakeServer(body())
    name = b"grpc-timeout" if value.endswith(b"S") else b"request-timeout-ms"
    called: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        called.append(True)

    mw = CancelOnDisconnect(app, mode=mode)
    await mw(with_deadline(value, name), server.receive, server.send)
    assert called == []
    assert server.status == 504
    assert header(server, b"deadline-expired") == b"true"
    assert json.loads(server.sent[1]["body"])["reason"] == "deadline"
    assert mw.statistics().interrupted == 1


async def test_a_deadline_that_passes_interrupts_and_answers_504_expired() -> None:
    """The deadline passes while the handler waits: interrupted, 504 Deadline-Expired."""
    server = FakeServer(body())
    probe = Probe()
    with anyio.fail_after(10):
        await CancelOnDisconnect(waiting_app(probe))(
            with_deadline(b"20"), server.receive, server.send
        )
    assert probe.cleaned_up
    assert not probe.finished
    assert server.status == 504
    assert header(server, b"deadline-expired") == b"true"
    assert probe.token is not None
    assert probe.token.reason is not None
    assert probe.token.reason.kind is CancelKind.DEADLINE


async def test_in_signal_mode_the_deadline_cancels_the_token_on_time() -> None:
    """Nobody polls the token: its callbacks still run when the deadline passes."""
    server = FakeServer(body())
    fired: list[CancelReason] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        fired_event = anyio.Event()

        def callback(reason: CancelReason) -> None:
            fired.append(reason)
            fired_event.set()

        request_token(scope).on_cancel(callback)
        await fired_event.wait()
        await respond(send)  # signal mode: the handler decides; it answers

    with anyio.fail_after(10):
        await CancelOnDisconnect(app, mode="signal")(
            with_deadline(b"20"), server.receive, server.send
        )
    assert [reason.kind for reason in fired] == [CancelKind.DEADLINE]
    assert server.status == 200


async def test_a_callers_token_gets_a_child_with_the_deadline() -> None:
    """DisconnectGuard(token=...) with a deadline header runs under a child of that token."""
    server = FakeServer(body())
    parent = CancellationToken()
    guard = DisconnectGuard(with_deadline(b"60000"), server.receive, server.send, token=parent)
    assert guard.token is not parent
    assert guard.token.deadline < math.inf

    async def app(scope: Any, receive: Any, send: Any) -> None:
        parent.cancel(CancelReason(CancelKind.SUPERSEDED))
        await anyio.sleep_forever()

    await guard.run(app)
    assert server.status == 409
    assert guard.token.reason is not None
    assert guard.token.reason.root.kind is CancelKind.SUPERSEDED


@pytest.mark.parametrize("answer", ["deadline", "shutdown"])
async def test_a_disconnect_after_the_guards_own_answer_sends_nothing_more(answer: str) -> None:
    """After the guard answered an interrupted request itself (504 at its deadline, 503 at
    shutdown), uvicorn's receive() says http.disconnect (the response is complete): that is
    no client leaving. It was taken for one, and a second answer (499) went to a server that
    refuses a message after a complete response (RuntimeError, a traceback per request)."""
    probe = Probe()

    class Uvicornish(FakeServer):
        complete = False

        async def receive(self) -> Message:
            if self.complete:
                return DISCONNECT
            return await super().receive()

        async def send(self, message: Any) -> None:
            if self.complete:
                raise RuntimeError("Unexpected ASGI message sent, after response completed")
            await super().send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.complete = True
                self.client({"type": "http.request", "body": b"", "more_body": False})

    server = Uvicornish(body())
    timeout = 0.05 if answer == "deadline" else None
    mw = CancelOnDisconnect(waiting_app(probe), shutdown_grace=0, timeout=timeout)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(mw, http_scope(), server.receive, server.send)
            await probe.started.wait()
            if answer == "shutdown":
                await mw.shutdown()
    assert server.status == (504 if answer == "deadline" else 503)
    assert len(server.sent) == 2
    assert mw.statistics().disconnects == 0


# -- shutdowns shared by lifespans, and signal mode with a linked operation (review 7b) ------


class Lifespan:
    """One server's lifespan protocol, driven by hand."""

    def __init__(self) -> None:
        self.to_app, self.from_server = anyio.create_memory_object_stream[dict[str, Any]](4)
        self.to_server, self.from_app = anyio.create_memory_object_stream[dict[str, Any]](4)

    async def run(self, app: Any) -> None:
        async with self.from_server, self.to_server:
            await app({"type": "lifespan"}, self.from_server.receive, self.to_server.send)

    def close(self) -> None:
        self.to_app.close()
        self.from_app.close()

    async def say(self, kind: str) -> str:
        await self.to_app.send({"type": f"lifespan.{kind}"})
        return str((await self.from_app.receive())["type"])


async def get(app: Any) -> int | None:
    server = FakeServer(body())
    await app(http_scope("/"), server.receive, server.send)
    return server.status


def gated_app(gates: list[anyio.Event], fail: bool = False) -> Any:
    """An application whose n-th lifespan's shutdown work waits for ``gates[n]``."""
    started = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal started
        if scope["type"] == "lifespan":
            gate = gates[started]
            started += 1
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await gate.wait()  # the application's own shutdown work
                    if fail:
                        raise RuntimeError("a shutdown handler failed")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


async def test_a_request_during_a_shutdown_is_503_though_another_lifespan_ended() -> None:
    """Two servers share one middleware (a module-level app served twice). Both stop; B's
    shutdown work is still running when A's lifespan ends: a request B takes meanwhile must
    be answered 503, not served."""
    a_gate, b_gate = anyio.Event(), anyio.Event()
    middleware = CancelOnDisconnect(gated_app([a_gate, b_gate]), shutdown_grace=0)
    a, b = Lifespan(), Lifespan()
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.run, middleware)
        assert await a.say("startup") == "lifespan.startup.complete"
        tg.start_soon(b.run, middleware)
        assert await b.say("startup") == "lifespan.startup.complete"
        await b.to_app.send({"type": "lifespan.shutdown"})  # B's shutdown work runs on
        await anyio.wait_all_tasks_blocked()
        assert await get(middleware) == 503
        a_gate.set()
        assert await a.say("shutdown") == "lifespan.shutdown.complete"
        await anyio.wait_all_tasks_blocked()  # A's lifespan has returned
        assert await get(middleware) == 503  # B is still shutting down
        b_gate.set()
        assert await b.from_app.receive() == {"type": "lifespan.shutdown.complete"}
    a.close()
    b.close()


async def test_the_middleware_serves_again_after_a_lifespan_whose_shutdown_raised() -> None:
    """A shutdown handler raises (the server logs it and exits): the lifespan has ended all
    the same, and the next server (or a test's client) must be served, not answered 503."""
    gate = anyio.Event()
    gate.set()
    middleware = CancelOnDisconnect(gated_app([gate], fail=True), shutdown_grace=0)
    lifespan = Lifespan()
    async with anyio.create_task_group() as tg:

        async def serve() -> None:
            with pytest.raises(RuntimeError, match="shutdown handler failed"):
                await lifespan.run(middleware)

        tg.start_soon(serve)
        assert await lifespan.say("startup") == "lifespan.startup.complete"
        await lifespan.to_app.send({"type": "lifespan.shutdown"})
    lifespan.close()
    assert await get(middleware) == 200


async def test_a_request_arriving_during_the_shutdown_grace_is_503() -> None:
    """lifespan.shutdown arrived; one request is still in flight (its grace runs): a request
    that arrives now must be answered 503 (the server is shutting down), not served."""
    release = anyio.Event()
    held = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await gated_app([anyio.Event()])(scope, receive, send)  # (never shuts down here)
            return
        if scope["path"] == "/held":
            held.set()
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = CancelOnDisconnect(app, shutdown_grace=30)
    lifespan = Lifespan()
    held_server = FakeServer(body())
    async with anyio.create_task_group() as tg:
        tg.start_soon(lifespan.run, middleware)
        assert await lifespan.say("startup") == "lifespan.startup.complete"
        tg.start_soon(middleware, http_scope("/held"), held_server.receive, held_server.send)
        await held.wait()
        await lifespan.to_app.send({"type": "lifespan.shutdown"})
        await anyio.wait_all_tasks_blocked()  # the shutdown waits for /held (its grace)
        status = await get(middleware)
        release.set()
        tg.cancel_scope.cancel()
    lifespan.close()
    assert status == 503


async def test_signal_mode_an_operation_linked_to_the_request_ends_quietly_on_disconnect() -> None:
    """Signal mode: the handler runs an operation whose parent is the request's token, and
    the client leaves. The operation raises OperationCancelled with its own (linked, root:
    client disconnected) reason, which the guard, comparing reason objects, lets escape as
    an application error (a 500 traceback in the server's log) instead of ending quietly."""
    registry = TokenRegistry()
    running = anyio.Event()
    server = FakeServer(body())

    async def app(scope: Any, receive: Any, send: Any) -> None:
        async with registry.track("op", parent=request_token(scope)) as op:
            running.set()
            await op.token.wait()
            op.token.raise_if_cancelled()

    async with anyio.create_task_group() as tg:
        tg.start_soon(
            CancelOnDisconnect(app, mode="signal"), http_scope("/"), server.receive, server.send
        )
        await running.wait()
        await anyio.wait_all_tasks_blocked()
        server.client(DISCONNECT)
