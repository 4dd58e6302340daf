"""install() and the OpenAPI schema: each route lists the answers its dependencies can give."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from fastapi import FastAPI

from cancelkit import BackgroundOperations, TokenRegistry
from cancelkit.fastapi import cancel_router, install, operations_router
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
