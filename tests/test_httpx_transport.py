"""TokenTransport: outgoing httpx requests carry the token's deadline and stop with it.

The next hop is a real server on 127.0.0.1 in this process (hypercorn, on asyncio and on trio;
the three-process tests of test_hops.py use uvicorn) running a handler under CancelOnDisconnect,
so the test sees what the next server sees: the header, and its client going away. Tasks are
ordered with events, never sleeps.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from cancelkit import (
    CancelKind,
    CancellationToken,
    CancelOnDisconnect,
    CancelReason,
    OperationCancelled,
    request_token,
)
from cancelkit._deadline import RETURN_MS
from cancelkit.httpx import TokenTransport
from tests.hops import current
from tests.test_asgi_servers import LIMIT, lifespan, respond, serve

pytestmark = pytest.mark.anyio

SERVER = {"asyncio": ("hypercorn", "asyncio"), "trio": ("hypercorn", "trio")}


class NextHop:
    """The next service: records each request's deadline header; how /wait and /stream end."""

    def __init__(self) -> None:
        self.headers: list[str | None] = []
        self.started = anyio.Event()
        self.ended = anyio.Event()
        self.reasons: list[CancelKind | None] = []
        self.release = anyio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        value = dict(scope["headers"]).get(b"request-timeout-ms")
        self.headers.append(None if value is None else value.decode())
        token = request_token(scope)
        if scope["path"] == "/ok":
            await respond(send)
            return
        if scope["path"] == "/release":
            self.started.set()
            await self.release.wait()
            await respond(send)
            return
        if scope["path"] == "/expired":
            await send(
                {
                    "type": "http.response.start",
                    "status": 504,
                    "headers": [(b"deadline-expired", b"true"), (b"content-length", b"0")],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        try:
            if scope["path"] == "/stream":
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"first", "more_body": True})
            self.started.set()
            if scope["path"] == "/deaf":  # a server that ignores deadlines: the client's leaving
                while (await receive())["type"] != "http.disconnect":
                    pass
            else:
                await token.wait()  # until the client goes away
        finally:
            self.reasons.append(None if token.reason is None else token.reason.kind)
            self.ended.set()


@asynccontextmanager
async def next_hop(anyio_backend: str) -> AsyncIterator[tuple[NextHop, str, httpx.AsyncClient]]:
    """The next hop's server, its URL, and a client with a TokenTransport (within LIMIT)."""
    hop = NextHop()
    with anyio.fail_after(LIMIT):
        async with (
            serve(SERVER[anyio_backend], CancelOnDisconnect(hop, mode="signal")) as port,
            httpx.AsyncClient(transport=TokenTransport()) as client,
        ):
            yield hop, f"http://127.0.0.1:{port}", client


def open_connections(client: httpx.AsyncClient) -> int:
    transport = client._transport
    assert isinstance(transport, TokenTransport)
    inner = transport.transport
    assert isinstance(inner, httpx.AsyncHTTPTransport)
    return sum(not c.is_closed() for c in inner._pool.connections)


async def test_outside_a_token_a_request_passes_through(anyio_backend: str) -> None:
    """No current token: no header, nothing wrapped, the answer as it came."""
    async with next_hop(anyio_backend) as (hop, url, client):
        response = await client.get(f"{url}/ok")
    assert response.status_code == 200
    assert hop.headers == [None]


async def test_a_token_without_a_deadline_sends_no_header(anyio_backend: str) -> None:
    """Inside a token without a deadline the request goes out as it is."""
    async with next_hop(anyio_backend) as (hop, url, client):
        with CancellationToken().scope():
            response = await client.get(f"{url}/ok")
    assert response.text == "ok"
    assert hop.headers == [None]


async def test_the_header_is_the_time_left_as_the_headers_are_written(anyio_backend: str) -> None:
    """The milliseconds left when httpcore writes the headers (a user's trace still runs)."""
    token = CancellationToken(timeout=60)
    seen: list[tuple[str, int, float]] = []

    async def trace(event: str, info: dict[str, Any]) -> None:
        if event.endswith("send_request_headers.started"):
            value = dict(info["request"].headers)[b"Request-Timeout-Ms"]
            seen.append((event, int(value), token.deadline - time.monotonic()))

    async with next_hop(anyio_backend) as (hop, url, client):
        with token.scope():
            await client.get(f"{url}/ok", extensions={"trace": trace})
    ((event, sent, left_after),) = seen
    assert event == "http11.send_request_headers.started"
    # computed just before `left_after` was: less RETURN_MS, floored; a moment earlier
    assert left_after * 1000 - RETURN_MS - 1 <= sent <= left_after * 1000 - RETURN_MS + 1
    assert hop.headers == [str(sent)]


async def test_a_cancelled_token_never_sends(anyio_backend: str) -> None:
    """A request made under a cancelled token raises at once; the server never sees it."""
    token = CancellationToken()
    token.cancel(CancelReason(CancelKind.SUPERSEDED))
    async with next_hop(anyio_backend) as (hop, url, client):
        with current(token), pytest.raises(OperationCancelled) as caught:
            await client.get(f"{url}/ok")
        assert open_connections(client) == 0
    assert caught.value.reason is token.reason
    assert hop.headers == []


@pytest.mark.parametrize("path", ["/wait", "/stream"])
@pytest.mark.parametrize("how", ["signalled", "in-scope", "child-of-outer-group"])
async def test_cancel_aborts_the_request_and_the_server_sees_its_client_go(
    anyio_backend: str, path: str, how: str
) -> None:
    """Cancelled while waiting for the answer or reading a streamed body: the connection
    closes and the next server's handler is cancelled (client gone). In the token's own scope
    that scope ends the call; elsewhere the caller gets the reason: signalled, or a task that
    an outer task group started from inside the scope (it sees the token, but the scope does
    not enclose it: the transport must abort the call itself)."""
    token = CancellationToken()
    errors: list[OperationCancelled] = []
    chunks: list[bytes] = []
    async with next_hop(anyio_backend) as (hop, url, client):

        async def request() -> None:
            try:
                async with client.stream("GET", f"{url}{path}") as response:
                    chunks.extend([chunk async for chunk in response.aiter_raw()])
            except OperationCancelled as exc:
                errors.append(exc)

        async def call() -> None:
            if how == "in-scope":
                with token.move_on():
                    await request()
            elif how == "signalled":
                with current(token):
                    await request()
            else:
                async with anyio.create_task_group() as outer:
                    with token.move_on():
                        outer.start_soon(request)
                        await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await hop.started.wait()
            token.cancel()
        await hop.ended.wait()
        assert open_connections(client) == 0
    assert [e.reason for e in errors] == ([] if how == "in-scope" else [token.reason])
    assert hop.reasons == [CancelKind.CLIENT_DISCONNECTED]
    assert b"".join(chunks) in (b"", b"first")


async def test_a_call_after_the_commit_point_is_not_aborted(anyio_backend: str) -> None:
    """Committed work is not stopped: a cancel after token.commit() leaves the call running."""
    token = CancellationToken(timeout=60)
    answers: list[httpx.Response] = []
    async with next_hop(anyio_backend) as (hop, url, client):

        async def call() -> None:
            with token.scope():
                token.commit()  # the deadline is lifted: no header either
                answers.append(await client.get(f"{url}/release"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await hop.started.wait()
            assert not token.cancel()  # too late: the commit won
            hop.release.set()
    assert answers[0].text == "ok"
    assert hop.headers == [None]


async def test_a_deadline_that_passes_aborts_the_request(anyio_backend: str) -> None:
    """The token's deadline ends the call; a next hop that ignores it sees its client go."""
    async with next_hop(anyio_backend) as (hop, url, client):
        await client.get(f"{url}/ok")  # connected: the budget is all for the call
        token = CancellationToken(timeout=0.2)
        with token.move_on() as scope:
            await client.get(f"{url}/deaf")  # a next hop that ignores its deadline
        await hop.ended.wait()  # it saw its client go
    assert scope.reason is not None
    assert scope.reason.kind is CancelKind.DEADLINE
    assert hop.headers[0] is None
    sent = hop.headers[1]
    assert sent is not None
    assert 0 <= int(sent) <= 199


async def test_an_expired_answer_far_from_our_deadline_is_passed_on(anyio_backend: str) -> None:
    """A 504 Deadline-Expired while our own deadline is far: the next hop's own limit; the
    caller gets the answer as it is."""
    async with next_hop(anyio_backend) as (_, url, client):
        with CancellationToken(timeout=60).scope():
            response = await client.get(f"{url}/expired")
    assert response.status_code == 504


async def test_an_expired_answer_to_our_deadline_ends_the_call_at_it(anyio_backend: str) -> None:
    """A 504 Deadline-Expired that answers the deadline we sent (ours is at most 6 ms away:
    RETURN_MS + 2): the caller gets OperationCancelled(deadline) at its own deadline, not the
    504."""
    token = CancellationToken(timeout=0.05)
    app_response: list[httpx.Response] = []

    def answer_expired(request: httpx.Request) -> httpx.Response:
        # the next hop answers as its deadline passes (ours less RETURN_MS; here 2 ms before)
        while token.deadline - time.monotonic() > 0.002:
            time.sleep(0.0002)
        response = httpx.Response(504, headers={"Deadline-Expired": "true"})
        app_response.append(response)
        return response

    transport = TokenTransport(httpx.MockTransport(answer_expired))
    async with httpx.AsyncClient(transport=transport) as client:
        with current(token), pytest.raises(OperationCancelled) as caught:
            await client.get("http://next/expired")
    assert caught.value.reason.kind is CancelKind.DEADLINE
    assert app_response  # the 504 came, and was turned into this hop's deadline
    assert token.deadline <= time.monotonic()


async def test_the_transport_wraps_and_closes_its_transport() -> None:
    """The default transport is httpx's; aclose() closes the wrapped one; bad input refused."""
    closed: list[bool] = []

    class Inner(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            return httpx.Response(200)

        async def aclose(self) -> None:
            closed.append(True)

    inner = Inner()
    transport = TokenTransport(inner)
    assert transport.transport is inner
    assert repr(transport).startswith("<TokenTransport transport=")
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get("http://x/")).status_code == 200
    assert closed == [True]
    assert isinstance(TokenTransport().transport, httpx.AsyncHTTPTransport)
    with pytest.raises(TypeError, match="httpx transport"):
        TokenTransport(object())  # type: ignore[arg-type]
