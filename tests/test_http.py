"""One HTTP answer per reason: a plain Starlette app and a FastAPI app answer alike.

Each case stops a request in one way (an exception from a primitive, or the request's token
cancelled while the handler waits), in a Starlette app with ``cancelkit.exception_handlers()``
and in a FastAPI app with ``cancelkit.fastapi.install()``, both under
:class:`~cancelkit.CancelOnDisconnect`, in both modes. The answers must match each other and
the table in ``cancelkit/_http.py``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from fastapi import FastAPI, Request
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from cancelkit import (
    CancelKind,
    CancellationToken,
    CancelOnDisconnect,
    CancelReason,
    LatestOnly,
    OperationCancelled,
    OperationExists,
    RegistryFull,
    SlotBusy,
    TokenRegistry,
    exception_handlers,
    request_token,
)
from cancelkit._http import answer_for_reason
from cancelkit.fastapi import install
from tests.test_asgi import FakeServer
from tests.test_asgi import body as body_message

pytestmark = pytest.mark.anyio

Stop = Callable[[CancellationToken, "Context"], Awaitable[None]]
Answer = tuple[int | None, str | None, dict[str, Any] | None]


class Context:
    """What a case shares with the test: the primitives, and an event when the body waits."""

    def __init__(self) -> None:
        self.slot = LatestOnly()
        self.registry = TokenRegistry()
        self.waiting = anyio.Event()
        self.newer = ""


def reason(kind: CancelKind, **fields: Any) -> CancelReason:
    return CancelReason(kind, **fields)


def raising(exc: Exception) -> Stop:
    async def stop(token: CancellationToken, ctx: Context) -> None:
        raise exc

    return stop


def interrupted_by(why: CancelReason) -> Stop:
    """The request's own token is cancelled while the handler waits (the guard answers)."""

    async def stop(token: CancellationToken, ctx: Context) -> None:
        token.cancel(why)
        await anyio.sleep_forever()

    return stop


async def superseded_claim(token: CancellationToken, ctx: Context) -> None:
    async with ctx.slot.claim("k"):
        ctx.waiting.set()
        await anyio.sleep_forever()


async def stale_claim(token: CancellationToken, ctx: Context) -> None:
    async with ctx.slot.claim("k", seq=5) as newest:
        ctx.newer = newest.id
    async with ctx.slot.claim("k", seq=3):  # older than the newest seen: never runs
        raise AssertionError("a stale claim ran")  # pragma: no cover


async def cancelled_by_id(token: CancellationToken, ctx: Context) -> None:
    async with ctx.registry.track("op-1"):
        ctx.waiting.set()
        await anyio.sleep_forever()


async def passed_deadline(token: CancellationToken, ctx: Context) -> None:
    CancellationToken(timeout=0).raise_if_cancelled()


async def linked_to_a_deadline(token: CancellationToken, ctx: Context) -> None:
    parent = CancellationToken(timeout=0)
    parent.child().raise_if_cancelled()


def body(kind: str, detail: str, source: str | None = None) -> dict[str, Any]:
    return {"detail": detail, "reason": kind, "source": source}


STALE = "stale: sequence 3 is older than 5"
CASES: dict[str, tuple[Stop, Answer]] = {
    "superseded": (
        superseded_claim,
        (409, None, body("superseded", "superseded by a newer request", "newer")),
    ),
    "superseded-stale": (stale_claim, (409, None, None)),  # detail: "stale: ..."
    "superseded-stale-raised": (
        raising(OperationCancelled(reason(CancelKind.SUPERSEDED, message=STALE))),
        (409, None, body("superseded", STALE)),
    ),
    "requested": (cancelled_by_id, (409, None, body("requested", "cancellation was requested"))),
    "deadline": (passed_deadline, (504, None, body("deadline", "the deadline passed"))),
    "parent-of-deadline": (
        linked_to_a_deadline,
        (504, None, body("deadline", "the deadline passed")),
    ),
    "shutdown": (
        raising(OperationCancelled(reason(CancelKind.SHUTDOWN))),
        (503, "1", body("shutdown", "the application is shutting down")),
    ),
    "interrupt-requested": (
        interrupted_by(reason(CancelKind.REQUESTED, source="me")),
        (409, None, body("requested", "cancellation was requested", "me")),
    ),
    "interrupt-deadline": (
        interrupted_by(reason(CancelKind.DEADLINE)),
        (504, None, body("deadline", "the deadline passed")),
    ),
    "interrupt-shutdown": (
        interrupted_by(reason(CancelKind.SHUTDOWN)),
        (503, "1", body("shutdown", "the application is shutting down")),
    ),
    "interrupt-parent": (
        interrupted_by(reason(CancelKind.PARENT, origin=reason(CancelKind.SUPERSEDED))),
        (409, None, body("superseded", "superseded by a newer request")),
    ),
    "busy": (raising(SlotBusy("k", "the key is taken")), (409, "1", None)),
    "full": (raising(RegistryFull("max_running", 3)), (503, "1", None)),
    "exists": (raising(OperationExists("op-1")), (409, None, None)),
}


def http_scope() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
    }


def starlette_app(stop: Stop, ctx: Context, busy_status: Any) -> Any:
    async def endpoint(request: Any) -> PlainTextResponse:
        await stop(request_token(request.scope), ctx)
        return PlainTextResponse("not stopped")

    return Starlette(
        routes=[Route("/", endpoint)],
        exception_handlers=exception_handlers(busy_status=busy_status),  # type: ignore[arg-type]
    )


def fastapi_app(stop: Stop, ctx: Context, busy_status: Any) -> Any:
    api = FastAPI()
    install(api, busy_status=busy_status)

    @api.get("/")
    async def endpoint(request: Request) -> str:
        await stop(request_token(request.scope), ctx)
        return "not stopped"

    return api


async def exchange(
    make: Callable[[Stop, Context, Any], Any],
    stop: Stop,
    mode: Any,
    *,
    busy_status: Any = 409,
    client_leaves: bool = False,
) -> tuple[Answer, list[str]]:
    """Run one request; return (status, Retry-After, JSON body) and the cancelkit log lines."""
    ctx = Context()
    sent: list[dict[str, Any]] = []
    gone = anyio.Event()
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    app = CancelOnDisconnect(make(stop, ctx, busy_status), mode=mode)
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect(logging.INFO)
    logger = logging.getLogger("cancelkit")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(app, http_scope(), receive, send)
                if stop is superseded_claim:
                    await ctx.waiting.wait()
                    async with ctx.slot.claim("k") as newer:
                        ctx.newer = newer.id
                elif stop is cancelled_by_id:
                    await ctx.waiting.wait()
                    await ctx.registry.cancel("op-1")
                elif client_leaves:
                    await ctx.waiting.wait()
                    await anyio.wait_all_tasks_blocked()
                    gone.set()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    start = next((m for m in sent if m["type"] == "http.response.start"), None)
    if start is None:
        return (None, None, None), records
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    answer = json.loads(payload)
    if ctx.newer and answer["source"] == ctx.newer:
        answer["source"] = "newer"  # the superseding claim's id differs from run to run
    return (start["status"], headers.get("retry-after"), answer), records


def matches(answer: Answer, expected: Answer) -> bool:
    status, retry_after, payload = expected
    return (
        answer[0] == status
        and answer[1] == retry_after
        and (payload is None or answer[2] == payload)
        and answer[2] is not None
        and set(answer[2]) == {"detail", "reason", "source"}
    )


# The guard answers a cancelled token by itself in interrupt mode only.
MODES = [
    (case, mode)
    for case in CASES
    for mode in ("interrupt", "signal")
    if mode == "interrupt" or not case.startswith("interrupt-")
]


@pytest.mark.parametrize(("case", "mode"), MODES)
async def test_starlette_and_fastapi_answer_every_reason_alike(case: str, mode: Any) -> None:
    """A plain Starlette app and a FastAPI app give the same answer, the table's, per reason."""
    stop, expected = CASES[case]
    plain, plain_log = await exchange(starlette_app, stop, mode)
    fast, fast_log = await exchange(fastapi_app, stop, mode)
    assert plain == fast
    assert matches(plain, expected), plain
    assert plain_log == fast_log
    if case.startswith("superseded-stale"):
        assert plain[2] is not None
        assert plain[2]["reason"] == "superseded"
        assert plain[2]["detail"].startswith("stale:")


@pytest.mark.parametrize("busy_status", [409, 429])
async def test_busy_status_is_configurable_alike(busy_status: int) -> None:
    """The reject policy's busy answer is 409 or 429 with Retry-After, in both apps."""
    stop = raising(SlotBusy("k", "the key is taken"))
    plain, _ = await exchange(starlette_app, stop, "interrupt", busy_status=busy_status)
    fast, _ = await exchange(fastapi_app, stop, "interrupt", busy_status=busy_status)
    assert plain == fast
    assert plain[:2] == (busy_status, "1")
    assert plain[2] is not None
    assert plain[2]["reason"] == "busy"


async def waits_for_the_client(token: CancellationToken, ctx: Context) -> None:
    ctx.waiting.set()
    await token.wait()
    token.raise_if_cancelled()


@pytest.mark.parametrize("mode", ["interrupt", "signal"])
async def test_client_gone_is_logged_once_and_answered_to_nobody(mode: Any) -> None:
    """A client that left reads nothing (the server is handed a 499 it drops: an outer
    BaseHTTPMiddleware needs a response); both apps write exactly one 499 line."""
    plain, plain_log = await exchange(starlette_app, waits_for_the_client, mode, client_leaves=True)
    fast, fast_log = await exchange(fastapi_app, waits_for_the_client, mode, client_leaves=True)
    assert plain == fast
    assert plain[0] == 499
    assert plain_log == fast_log == ['127.0.0.1:5000 "GET /" 499 client disconnected']


def test_exception_handlers_reject_a_bad_busy_status() -> None:
    """busy_status is 409 or 429."""
    with pytest.raises(ValueError, match="busy_status"):
        exception_handlers(busy_status=500)  # type: ignore[arg-type]


def test_only_a_deadline_answer_says_deadline_expired() -> None:
    """504 carries Deadline-Expired: true (callers do not retry it); no other answer does."""
    for kind in CancelKind:
        answer = answer_for_reason(reason(kind))
        marked = (b"deadline-expired", b"true") in answer.headers()
        assert marked is (kind is CancelKind.DEADLINE), kind
    linked = answer_for_reason(reason(CancelKind.PARENT, origin=reason(CancelKind.DEADLINE)))
    assert (b"deadline-expired", b"true") in linked.headers()


async def test_an_answer_is_not_cut_by_an_interruption_for_the_same_reason() -> None:
    """The guard interrupts the request (its deadline passed) just as the handler's scope saw
    the same deadline and the exception handler sends the 504: the answer goes out whole."""
    app = FastAPI()
    install(app)

    @app.get("/")
    async def endpoint(request: Request) -> None:
        await anyio.wait_all_tasks_blocked()  # the guard's watcher runs: it can interrupt now
        reason = CancelReason(CancelKind.DEADLINE)
        request_token(request.scope).cancel(reason)  # the guard's interruption is pending...
        raise OperationCancelled(reason)  # ...as the handler answers the same deadline

    class Server(FakeServer):
        async def send(self, message: Any) -> None:
            await anyio.lowlevel.checkpoint()  # a real server's write yields
            await super().send(message)

    server = Server(body_message())
    with anyio.fail_after(10):
        await CancelOnDisconnect(app)(http_scope(), server.receive, server.send)
    assert [m["type"] for m in server.sent] == ["http.response.start", "http.response.body"]
    assert server.status == 504
    assert (b"deadline-expired", b"true") in server.sent[0]["headers"]
