"""The read-ahead buffer (ReadAhead), through the guard that owns it: order, bounds, errors."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from cancelkit import CancelOnDisconnect, DisconnectGuard, request_token
from tests.test_asgi import DISCONNECT, FakeServer, Message, body, http_scope, respond

pytestmark = pytest.mark.anyio


async def test_body_reaches_app_in_order_with_bounded_read_ahead() -> None:
    """Body messages arrive untouched and in order; the guard reads ahead only max_buffer."""
    chunks = [bytes([i]) * 10 for i in range(8)]
    server = FakeServer(*(body(c, more=True) for c in chunks), body(b"end"))
    got: list[Message] = []
    step = anyio.Event()
    reading = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reading.set()
        await step.wait()  # let the watcher read ahead as far as it may
        while True:
            message = await receive()
            got.append(message)
            if not message.get("more_body"):
                break
        await respond(send)

    guard_box: list[DisconnectGuard] = []

    async def run() -> None:
        guard = DisconnectGuard(http_scope(), server.receive, server.send, max_buffer=25)
        guard_box.append(guard)
        await guard.run(app)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await reading.wait()
        await anyio.wait_all_tasks_blocked()
        assert server.pulled == 3  # 30 bytes read ahead: stops at the first >= 25
        assert guard_box[0].watching
        step.set()
    assert got == [body(c, more=True) for c in chunks] + [body(b"end")]
    assert server.status == 200


async def test_read_ahead_bounded_by_message_count() -> None:
    """Empty body messages cannot make the guard buffer without bound."""
    server = FakeServer(*(body(more=True) for _ in range(40)), body())
    reading = anyio.Event()
    step = anyio.Event()
    count = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal count
        reading.set()
        await step.wait()
        while (await receive()).get("more_body"):
            count += 1
        await respond(send)

    async with anyio.create_task_group() as tg:
        tg.start_soon(CancelOnDisconnect(app), http_scope(), server.receive, server.send)
        await reading.wait()
        await anyio.wait_all_tasks_blocked()
        assert server.pulled == 16
        step.set()
    assert count == 40


async def test_app_reading_while_watcher_waits() -> None:
    """While the app itself reads from the server the watcher waits; no message is lost."""
    server = FakeServer()
    got: list[bytes] = []
    reading = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reading.set()
        while True:
            message = await receive()
            got.append(message["body"])
            if not message["more_body"]:
                break
        await respond(send)

    async with anyio.create_task_group() as tg:
        tg.start_soon(CancelOnDisconnect(app), http_scope(), server.receive, server.send)
        await reading.wait()
        await anyio.wait_all_tasks_blocked()
        for i in range(5):
            server.client(body(b"%d" % i, more=True))
            await anyio.wait_all_tasks_blocked()
        server.client(body(b"last"))
    assert got == [b"0", b"1", b"2", b"3", b"4", b"last"]


async def test_two_app_readers_share_one_server_reader() -> None:
    """Two concurrent receive() calls of the app never read the server twice at once."""
    server = FakeServer()
    got: list[Message] = []
    two = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        async def read() -> None:
            got.append(await receive())

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            tg.start_soon(read)
            await anyio.wait_all_tasks_blocked()
            two.set()
        await respond(send)

    async with anyio.create_task_group() as tg:
        tg.start_soon(CancelOnDisconnect(app), http_scope(), server.receive, server.send)
        await two.wait()
        server.client(body(b"a", more=True))
        await anyio.wait_all_tasks_blocked()
        server.client(body(b"b"))
    assert sorted(m["body"] for m in got) == [b"a", b"b"]


async def test_receive_after_body_waits_for_disconnect() -> None:
    """After the body, the app's receive() returns http.disconnect once the client leaves."""
    server = FakeServer(body(b"x"))
    got: list[Message] = []
    listening = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        got.append(await receive())
        listening.set()
        got.append(await receive())
        got.append(await receive())

    mw = CancelOnDisconnect(app, mode="signal")
    async with anyio.create_task_group() as tg:
        tg.start_soon(mw, http_scope(), server.receive, server.send)
        await listening.wait()
        await anyio.wait_all_tasks_blocked()
        server.client(DISCONNECT)
    assert got == [body(b"x"), DISCONNECT, DISCONNECT]
    assert server.pulled == 2


async def test_disconnect_while_app_reads_body() -> None:
    """A disconnect seen by the app's own receive() cancels the token and reaches the app."""
    server = FakeServer(body(b"a", more=True), DISCONNECT)
    got: list[Message] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        got.append(await receive())
        got.append(await receive())
        assert request_token(scope).cancelled

    await CancelOnDisconnect(app, mode="signal")(http_scope(), server.receive, server.send)
    assert got == [body(b"a", more=True), DISCONNECT]


async def test_interrupt_mode_disconnect_mid_upload_ends_quietly() -> None:
    """Interrupt mode: a client gone mid-upload interrupts the app at its receive(), the
    same as at any other await. Starlette's Request.body() raises ClientDisconnect on the
    http.disconnect message without awaiting anything else: handed the message, a plain
    Starlette route escaped the guard with it (uvicorn: 'Exception in ASGI application' for
    every upload cut short) instead of ending quietly."""
    from starlette.requests import Request

    server = FakeServer(body(b"a", more=True), DISCONNECT)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await Request(scope, receive).body()
        await respond(send)

    mw = CancelOnDisconnect(app)
    await mw(http_scope(method="POST"), server.receive, server.send)
    stats = mw.statistics()
    assert (stats.disconnects, stats.interrupted) == (1, 1)
    assert server.status == 499  # for an outer middleware still awaiting a response


async def test_watcher_error_reaches_app_receive() -> None:
    """An exception from the server's receive in the watcher is raised by the app's receive."""
    reading = anyio.Event()
    server = FakeServer()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await anyio.lowlevel.checkpoint()
        reading.set()
        await anyio.wait_all_tasks_blocked()
        await receive()

    server.receive_error = RuntimeError("server broke")
    with pytest.raises(RuntimeError, match="server broke"):
        await CancelOnDisconnect(app)(http_scope(), server.receive, server.send)


async def test_receive_in_a_cancelled_scope_leaves_read_ahead_body_in_place() -> None:
    """A receive() made in a cancelled scope (Starlette's is_disconnected()) takes no body."""
    server = FakeServer(body(b"first-", more=True), body(b"second-", more=True), body(b"third"))
    got: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await anyio.wait_all_tasks_blocked()  # the guard has read ahead what the server had
        with anyio.CancelScope() as scope_:  # what Request.is_disconnected() does
            scope_.cancel()
            await receive()
        more = True
        while more:
            message = await receive()
            got.append(message.get("body", b""))
            more = message.get("more_body", False)
        await respond(send)

    await CancelOnDisconnect(app)(http_scope(method="POST"), server.receive, server.send)
    assert b"".join(got) == b"first-second-third"
