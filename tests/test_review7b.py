"""Adversarial review 7b: failing cases of the event seam and the lifespan changes."""

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Annotated, Any

import anyio
import pytest
from fastapi import FastAPI

import cancelkit
from cancelkit import (
    CancelEvent,
    CancelOnDisconnect,
    Claim,
    LatestOnly,
    TokenRegistry,
    TrackedOperation,
    _events,
    request_token,
)
from cancelkit.fastapi import install, latest_only, tracked
from tests.test_asgi import DISCONNECT, FakeServer, body, http_scope

pytestmark = pytest.mark.anyio


@pytest.fixture
def events() -> Iterator[list[CancelEvent]]:
    seen: list[CancelEvent] = []
    remove = cancelkit.add_listener(seen.append)
    yield seen
    remove()


async def test_side_by_side_operations_of_one_request_all_carry_its_route(
    events: list[CancelEvent],
) -> None:
    """Two operations side by side in one request, both stopped by the client leaving: two
    events (one each), and both name the request's route."""
    registry = TokenRegistry()
    running = anyio.Event()
    server = FakeServer(body())

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scope["route"] = SimpleNamespace(path="/work/{id}")
        token = request_token(scope)
        entered = 0

        async def op(name: str) -> None:
            nonlocal entered
            async with registry.track(name, parent=token):
                entered += 1
                if entered == 2:
                    running.set()
                await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            tg.start_soon(op, "a")
            tg.start_soon(op, "b")

    async with anyio.create_task_group() as tg:
        tg.start_soon(CancelOnDisconnect(app), http_scope("/work/1"), server.receive, server.send)
        await running.wait()
        await anyio.wait_all_tasks_blocked()
        server.client(DISCONNECT)
    assert sorted((e.where, e.name, e.route) for e in events) == [
        ("operation", "a", "/work/{id}"),
        ("operation", "b", "/work/{id}"),
    ]
    assert _events.requests == {}


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


def fastapi_app(running: anyio.Event, where: str) -> Any:
    app = FastAPI()
    install(app)
    slot, registry = LatestOnly(), TokenRegistry()

    if where == "claim":

        @app.get("/items/{item}")
        async def claimed(
            item: str, claim: Annotated[Claim, latest_only(slot, key=lambda r: "k")]
        ) -> None:
            running.set()
            await anyio.sleep_forever()

    else:

        @app.get("/items/{item}")
        async def operation(item: str, op: Annotated[TrackedOperation, tracked(registry)]) -> None:
            running.set()
            await anyio.sleep_forever()

    return app


@pytest.mark.parametrize("where", ["claim", "operation"])
async def test_a_disconnect_under_latest_only_or_tracked_is_one_event_with_the_route(
    events: list[CancelEvent], where: str
) -> None:
    """FastAPI: a claim (latest_only) or an operation (tracked) in a guarded request, the
    client leaves: one event, the inner unit's, naming the route template."""
    running = anyio.Event()
    server = FakeServer(body())
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            CancelOnDisconnect(fastapi_app(running, where)),
            {**http_scope("/items/1"), "query_string": b"", "headers": []},
            server.receive,
            server.send,
        )
        with anyio.fail_after(5):
            await running.wait()
        await anyio.wait_all_tasks_blocked()
        server.client(DISCONNECT)
    assert [(e.kind, e.where, e.route) for e in events] == [
        ("client_disconnected", where, "/items/{item}")
    ]


@pytest.mark.parametrize("where", ["claim", "operation"])
async def test_a_deadline_under_latest_only_or_tracked_is_one_event(
    events: list[CancelEvent], where: str
) -> None:
    """FastAPI: the request's deadline (a Request-Timeout-Ms header) passes while a claim or
    an operation runs the endpoint: one cause, one event (the inner unit's)."""
    running = anyio.Event()
    server = FakeServer(body())
    scope = {**http_scope("/items/1"), "query_string": b""}
    scope["headers"] = [(b"request-timeout-ms", b"50")]
    with anyio.fail_after(5):
        await CancelOnDisconnect(fastapi_app(running, where))(scope, server.receive, server.send)
    assert server.status == 504
    assert [(e.kind, e.where) for e in events] == [("deadline", where)]


async def test_a_shadowed_route_in_a_mounted_sub_application_is_refused() -> None:
    """install() is documented for "a mounted sub-application too", and the routers carry
    their collision check in their lifespan; but Starlette never runs a mounted app's
    lifespan: the outer app starts, and the sub-app's DELETE /operations/{id} of
    operations_router is never reached (cancel_router answers it)."""
    from cancelkit import BackgroundOperations
    from cancelkit.fastapi import cancel_router, operations_router
    from tests.test_fastapi_openapi import lifespan as run_lifespan

    sub = FastAPI()
    install(sub)
    sub.include_router(cancel_router(TokenRegistry()))
    sub.include_router(operations_router(BackgroundOperations()))
    outer = FastAPI()
    outer.mount("/sub", sub)
    [outcome, *_] = await run_lifespan(outer)
    assert "is served by cancel_router and by operations_router" in outcome


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


async def test_an_unguarded_app_started_from_a_guarded_lifespan_is_warned_of(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The main app (under CancelOnDisconnect) serves an admin app from its lifespan (a
    second server task); the admin app has token routes and no CancelOnDisconnect: install()
    must warn at its startup. LIFESPAN_GUARDED, a ContextVar, is inherited by every task the
    guarded lifespan starts, and silences it."""
    from contextlib import asynccontextmanager

    from cancelkit.fastapi import RequestToken
    from tests.test_fastapi_openapi import lifespan as run_lifespan

    admin = FastAPI()
    install(admin)

    @admin.get("/admin/job")
    async def job(token: RequestToken) -> None: ...

    @asynccontextmanager
    async def serves_admin(app: Any) -> Any:
        async with anyio.create_task_group() as tg:  # as uvicorn.Server(admin).serve() would
            tg.start_soon(run_lifespan, admin)
            yield

    await run_lifespan(CancelOnDisconnect(FastAPI(lifespan=serves_admin)))
    assert "GET /admin/job uses a cancelkit token" in caplog.text


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
