"""install() and the OpenAPI schema: each route lists the answers its dependencies can give."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import pytest
from fastapi import APIRouter, FastAPI

from cancelkit import (
    BackgroundOperations,
    CancelOnDisconnect,
    Claim,
    LatestOnly,
    TokenRegistry,
    TrackedOperation,
)
from cancelkit.fastapi import (
    RequestToken,
    cancel_router,
    install,
    latest_only,
    operations_router,
    tracked,
)
from tests.test_fastapi_operations import Export
from tests.test_fastapi_operations import make_app as make_operations_app
from tests.test_fastapi_requests import client
from tests.test_fastapi_requests import make_app as make_requests_app

pytestmark = pytest.mark.anyio


async def test_openapi_documents_the_responses_where_the_dependencies_are_used() -> None:
    """Routes using the dependencies list 409/504 (and 503); the cancel route 202/404/422."""
    app, _ = make_requests_app()
    async with client(app) as http:
        schema = (await http.get("/openapi.json")).json()
    paths = schema["paths"]
    search = paths["/search"]["get"]["responses"]
    assert {"200", "409", "422", "504"} <= set(search)
    assert "429" not in search
    assert search["409"]["content"]["application/json"]["schema"]["$ref"].endswith("CancelledBody")
    assert {"409", "503", "504"} <= set(paths["/reports"]["post"]["responses"])
    cancel = paths["/operations/{operation_id}"]
    assert "get" not in cancel
    assert {"202", "404", "422"} <= set(cancel["delete"]["responses"])
    assert set(paths["/plain"]["get"]["responses"]) == {"200"}
    assert "CancelledBody" in schema["components"]["schemas"]


async def test_openapi_documents_the_answers_of_background_operations() -> None:
    """The schema lists 202/409/503 for the start, 200/404 for GET, 202/404 for DELETE."""
    app = make_operations_app(BackgroundOperations(), Export())
    paths = app.openapi()["paths"]
    start = paths["/exports"]["post"]["responses"]
    assert {"202", "409", "503"} <= set(start)
    assert start["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/OperationStartedBody"
    }
    status = paths["/operations/{operation_id}"]["get"]
    assert {"200", "404", "422", "503"} <= set(status["responses"])
    assert [p["name"] for p in status["parameters"]] == ["operation_id", "wait", "x-user"]
    cancel = paths["/operations/{operation_id}"]["delete"]["responses"]
    assert {"202", "404", "503"} <= set(cancel)


async def test_a_shadowed_cancelkit_route_is_refused_at_startup() -> None:
    """cancel_router and operations_router both default to /operations/{operation_id}: the
    second was silently never reached. The lifespan's startup now refuses it, naming both."""
    app = FastAPI()
    install(app)
    app.include_router(cancel_router(TokenRegistry()))
    app.include_router(operations_router(BackgroundOperations()))
    with pytest.raises(
        RuntimeError,
        match=r"DELETE /operations/\{operation_id\} is served by "
        r"cancel_router and by operations_router",
    ):
        async with app.router.lifespan_context(app):
            pass  # pragma: no cover


async def lifespan(app: Any) -> list[str]:
    """Start ``app`` and shut it down through the ASGI lifespan protocol, as a server does;
    return the types of the messages it sent."""
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Any] = []

    async def receive() -> dict[str, str]:
        return messages.pop(0)

    async def send(message: dict[str, str]) -> None:
        sent.append(message)

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    try:
        await app(scope, receive, send)
    except RuntimeError:
        assert sent[-1]["type"] == "lifespan.startup.failed"
    return [m.get("message", m["type"]) for m in sent]


async def test_a_shadowed_route_is_refused_at_startup_without_install_too() -> None:
    """install() was the only place the check ran: an app that never called it started, and
    DELETE answered 202 "pending" from cancel_router while the background operation ran on.
    The routers carry the check in their own lifespan (FastAPI merges it into the app's), at
    any depth of included routers; the server's startup fails naming both and the fix."""
    app = FastAPI()
    app.include_router(cancel_router(TokenRegistry()))
    nested = APIRouter()
    nested.include_router(operations_router(BackgroundOperations()))
    app.include_router(nested)
    [failure] = await lifespan(app)
    assert (
        "RuntimeError: DELETE /operations/{operation_id} is served by cancel_router and by "
        "operations_router, so the second is never reached: give one of them another path "
        "(for example operations_router(operations, path='/background/{operation_id}'))"
    ) in failure

    apart = FastAPI()
    apart.include_router(cancel_router(TokenRegistry(), path="/requests/{operation_id}"))
    apart.include_router(operations_router(BackgroundOperations()))
    assert await lifespan(apart) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def token_app() -> FastAPI:
    app = FastAPI()
    install(app)
    slot, registry = LatestOnly(), TokenRegistry()

    @app.get("/token")
    async def uses_the_token(token: RequestToken) -> None: ...

    @app.get("/search")
    async def search(claim: Annotated[Claim, latest_only(slot, key=lambda r: "k")]) -> None: ...

    @app.post("/reports")
    async def report(op: Annotated[TrackedOperation, tracked(registry)]) -> None: ...

    @app.get("/plain")
    async def plain() -> None: ...

    return app


async def test_routes_with_a_token_but_no_middleware_are_warned_about_at_startup(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With install() but without CancelOnDisconnect, a client that leaves never cancels a
    RequestToken, latest_only or tracked route: said at startup (it was said at the first
    request only), once, naming the routes and the fix. The middleware, wrapped around the
    app or added to it, keeps it quiet."""
    caplog.set_level(logging.WARNING, logger="cancelkit")
    bare = token_app()
    assert await lifespan(bare) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("GET /token, GET /search, POST /reports uses a cancelkit token")
    assert "app = CancelOnDisconnect(app) or app.add_middleware(CancelOnDisconnect)" in warning
    async with client(bare) as http:  # the first request does not say it again
        assert (await http.get("/token")).status_code == 200

    caplog.clear()
    added = token_app()
    added.add_middleware(CancelOnDisconnect)
    for app in (CancelOnDisconnect(token_app()), added):
        assert await lifespan(app) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    plain = FastAPI()
    install(plain)
    plain.get("/plain")(lambda: None)
    await lifespan(plain)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == []


async def test_a_user_route_shadowing_a_cancelkit_route_is_named() -> None:
    app = FastAPI()
    install(app)

    @app.delete("/operations/{id}")
    async def mine(id: str) -> None: ...

    app.include_router(operations_router(BackgroundOperations()))
    with pytest.raises(RuntimeError, match="by your route 'mine' and by operations_router"):
        async with app.router.lifespan_context(app):
            pass  # pragma: no cover


async def test_a_fixed_path_after_a_cancelkit_route_that_matches_it_is_refused() -> None:
    """GET /operations/stats after operations_router: its /operations/{operation_id} takes
    every GET /operations/stats ('stats' is a valid id), so the user's route is never reached.
    The same route before operations_router is fine (it only takes that one id)."""
    app = FastAPI()
    install(app)
    app.include_router(operations_router(BackgroundOperations()))

    @app.get("/operations/stats")
    async def stats() -> None: ...

    with pytest.raises(RuntimeError, match="by operations_router and by your route 'stats'"):
        async with app.router.lifespan_context(app):
            pass  # pragma: no cover

    first = FastAPI()
    install(first)
    first.get("/operations/stats")(stats)
    first.include_router(operations_router(BackgroundOperations()))
    async with first.router.lifespan_context(first):
        pass


async def test_routers_on_their_own_paths_start_and_keep_the_lifespan() -> None:
    entered: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, str]]:
        entered.append("in")
        yield {"db": "up"}
        entered.append("out")

    app = FastAPI(lifespan=lifespan)
    install(app)
    app.include_router(cancel_router(TokenRegistry(), path="/requests/{operation_id}"))
    app.include_router(operations_router(BackgroundOperations()))

    @app.get("/operations/{id}/report")  # another path: no conflict
    async def report(id: str) -> None: ...

    async with app.router.lifespan_context(app) as state:
        assert state == {"db": "up"}
    assert entered == ["in", "out"]
