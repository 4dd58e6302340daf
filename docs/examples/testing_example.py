"""Tests of an app that uses cancelkit (testing_app.py), on asyncio and on trio.

No sleeps to order requests. In-process with httpx.ASGITransport where that is enough;
a real server (hypercorn, in the test's event loop) for streams and clients that leave.

Run: python -m pytest docs/examples/testing_example.py
"""

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import httpx
import pytest
from hypercorn.config import Config
from testing_app import app, operations, searches

from cancelkit import CancelEvent, add_listener

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)  # every test runs on both


@asynccontextmanager
async def running(app: Any) -> AsyncIterator[None]:
    """Run ``app``'s lifespan as a server does (httpx.ASGITransport does not)."""
    to_app, receive = anyio.create_memory_object_stream[dict[str, Any]]()
    send, from_app = anyio.create_memory_object_stream[dict[str, Any]]()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    async with to_app, receive, send, from_app, anyio.create_task_group() as tg:
        tg.start_soon(app, scope, receive.receive, send.send)
        await to_app.send({"type": "lifespan.startup"})
        assert await from_app.receive() == {"type": "lifespan.startup.complete"}
        yield
        await to_app.send({"type": "lifespan.shutdown"})
        assert await from_app.receive() == {"type": "lifespan.shutdown.complete"}


@pytest.fixture
async def lifespan() -> AsyncIterator[None]:
    async with running(app):
        yield  # anyio runs fixtures in the test's task: it exits where it entered


def client(user: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app)  # in this event loop: no server, no sockets
    return httpx.AsyncClient(
        transport=transport,
        base_url="http://test",
        headers={"x-user": user},
    )


# [search]
@pytest.mark.usefixtures("lifespan")
async def test_a_newer_search_supersedes_the_older_one() -> None:
    results: dict[str, httpx.Response] = {}
    async with client("alice") as http, anyio.create_task_group() as tg:

        async def search(q: str) -> None:
            results[q] = await http.get("/search", params={"q": q})

        tg.start_soon(search, "ca")
        await anyio.wait_all_tasks_blocked()  # 'ca' is inside the endpoint: no guessing
        assert searches.statistics().running == 1
        tg.start_soon(search, "cat")
    assert results["ca"].status_code == 409
    assert results["ca"].json()["reason"] == "superseded"
    assert results["cat"].status_code == 200


@pytest.mark.usefixtures("lifespan")
async def test_users_do_not_supersede_each_other() -> None:
    responses: list[httpx.Response] = []
    async with (
        client("alice") as alice,
        client("bob") as bob,
        anyio.create_task_group() as tg,
    ):

        async def search(http: httpx.AsyncClient, q: str) -> None:
            responses.append(await http.get("/search", params={"q": q}))

        tg.start_soon(search, alice, "cats")
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(search, bob, "dogs")
    assert [r.status_code for r in responses] == [200, 200]


# [operations]
@pytest.mark.usefixtures("lifespan")
async def test_only_the_owner_sees_and_cancels_an_export() -> None:
    async with client("alice") as alice, client("bob") as bob:
        started = await alice.post("/exports", params={"table": "users"})
        assert started.status_code == 202  # it runs once the answer is here
        location = started.headers["location"]
        op_id = started.json()["id"]
        # owned operations are listed per owner: operations() alone lists owner None's
        assert [s.id for s in operations.operations(owner="alice")] == [op_id]
        tracked = operations.registry.operations(owner="alice")  # a TokenRegistry's
        assert [op.id for op in tracked] == [op_id]
        assert operations.operations() == []
        assert (await bob.get(location)).status_code == 404  # bob cannot see it...
        assert (await bob.delete(location)).status_code == 404  # ...nor cancel it
        stop = await alice.delete(location)
        assert (stop.status_code, stop.json()["outcome"]) == (202, "cancelled")
        status = (await alice.get(location, params={"wait": 5})).json()
    assert status["state"] == "cancelled"
    assert status["reason"]["kind"] == "requested"


# [server]
@pytest.fixture
async def port(anyio_backend: str) -> AsyncIterator[int]:
    """The app served by hypercorn on 127.0.0.1 in this event loop, lifespan and all."""
    if anyio_backend == "trio":
        from hypercorn.trio import serve
    else:
        from hypercorn.asyncio import serve
    config = Config()
    config.accesslog = config.errorlog = None
    stop = anyio.Event()
    with socket.create_server(("127.0.0.1", 0)) as sock:  # a free port, listening
        config.bind = [f"fd://{os.dup(sock.fileno())}"]  # hypercorn closes its own copy
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(serve, app, config, shutdown_trigger=stop.wait))
            yield sock.getsockname()[1]
            stop.set()


async def read(lines: AsyncIterator[str], count: int) -> list[str]:
    """The next ``count`` lines of a server-sent event stream (blank lines left out)."""
    seen: list[str] = []
    async for line in lines:
        seen += [line] if line else []
        if len(seen) == count:
            break
    return seen


# [streams]
async def test_a_newer_stream_ends_the_older_one_cleanly(port: int) -> None:
    url = f"http://127.0.0.1:{port}"
    with anyio.fail_after(10):
        async with (
            httpx.AsyncClient(base_url=url, headers={"x-user": "alice"}) as http,
            http.stream("GET", "/ticks") as older,
        ):
            lines = older.aiter_lines()
            assert await read(lines, 2) == ["data: 0", "data: 1"]
            async with http.stream("GET", "/ticks") as newer:  # it holds the slot now
                assert newer.status_code == 200
                rest = [line async for line in lines if line]  # older ends, not cut
    assert rest[-2:] == ["event: end", "data: superseded"]


async def test_a_stream_stops_when_its_client_leaves(port: int) -> None:
    seen: list[CancelEvent] = []
    stopped = anyio.Event()

    def note(event: CancelEvent) -> None:  # called where the server's work exits
        seen.append(event)
        stopped.set()

    remove = add_listener(note)
    try:
        with anyio.fail_after(10):
            async with await anyio.connect_tcp("127.0.0.1", port) as connection:
                request = b"GET /ticks HTTP/1.1\r\nHost: test\r\nX-User: bob\r\n\r\n"
                await connection.send(request)
                received = b""
                while received.count(b"data: ") < 2:  # two events arrived
                    received += await connection.receive()
            # bob left in the middle of the stream: the server notices on its own
            await stopped.wait()  # not wait_all_tasks_blocked(): a stream never blocks
    finally:
        remove()
    assert [(e.where, e.kind) for e in seen] == [("claim", "client_disconnected")]
