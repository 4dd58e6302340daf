"""install() and the OpenAPI side: exception handlers, documented answers, the body models."""

# No "from __future__ import annotations" here: pydantic and FastAPI read these annotations.
import logging
import re
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from typing import Any, Literal, cast

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from .._asgi import LIFESPAN_GUARDED
from .._http import exception_handlers
from ..backends import CancelOutcome

__all__ = [
    "COMMITTED",
    "UNAVAILABLE",
    "CancelledBody",
    "OperationBody",
    "OperationErrorBody",
    "OperationProgressBody",
    "OperationReasonBody",
    "OperationStartedBody",
    "OperationStatusBody",
    "install",
]

#: The attribute of a dependency that lists the answers it adds to its route's OpenAPI entry.
RESPONSES_ATTR = "__cancelkit_responses__"
#: The attribute of a cancelkit router's endpoint naming the function that made it.
ROUTER_ATTR = "__cancelkit_router__"
#: The attribute (True) of a dependency whose token a client disconnect should cancel.
TOKEN_ATTR = "__cancelkit_token__"

logger = logging.getLogger("cancelkit")


class CancelledBody(BaseModel):
    """The JSON body of a response to stopped work.

    .. versionadded:: 0.1
    """

    detail: str
    reason: str
    source: str | None = None


#: The description of the ``409`` a cancel endpoint answers for a committed operation.
COMMITTED = "Too late: the operation passed its commit point; nothing was changed"


class OperationBody(BaseModel):
    """The JSON body of an answer of the cancel endpoint.

    .. versionadded:: 0.1
    """

    id: str
    outcome: str


def cancel_answer(operation_id: str, outcome: CancelOutcome) -> Any:
    """The answer of a cancel endpoint: 202 (the body), 404 not found, 409 committed."""
    body = {"id": operation_id, "outcome": outcome.value}
    if outcome is CancelOutcome.NOT_FOUND:
        return JSONResponse(body, status_code=404)
    if outcome is CancelOutcome.COMMITTED:  # too late: it passed its commit point
        return JSONResponse(body, status_code=409)
    return body


class OperationStartedBody(BaseModel):
    """The JSON body of ``202 Accepted`` for a started background operation.

    .. versionadded:: 0.1
    """

    id: str
    state: str
    status_url: str


class OperationErrorBody(BaseModel):
    """Why a background operation failed: the error's type (``"type"`` in JSON) and message.

    .. versionadded:: 0.1
    """

    type_name: str = Field(alias="type")
    message: str


class OperationReasonBody(BaseModel):
    """Why a background operation was cancelled (the root reason, as in :class:`CancelledBody`).

    .. versionadded:: 0.1
    """

    kind: str
    message: str
    source: str | None = None


class OperationProgressBody(BaseModel):
    """The latest progress report of a background operation.

    .. versionadded:: 0.1
    """

    done: int | float  # an int stays an int (1, not 1.0)
    total: int | float | None = None
    message: str | None = None


class OperationStatusBody(BaseModel):
    """The JSON body of the status endpoint (see :class:`~cancelkit.OperationStatus`).

    .. versionadded:: 0.1
    """

    id: str
    state: Literal["running", "completed", "failed", "cancelled", "lost"]
    started_at: float
    ended_at: float | None = None
    result: Any = None
    error: OperationErrorBody | None = None
    reason: OperationReasonBody | None = None
    progress: OperationProgressBody | None = None
    worker: str | None = None


# -- the answers of each dependency, documented ------------------------------------------

#: The 503 of a backend that cannot be reached (with install(): the handler answers it).
UNAVAILABLE = "The shared state (Redis) cannot be reached: retry after Retry-After seconds"
LATEST_RESPONSES = {
    409: "Superseded by a newer request, stale (an older sequence number), or the key is busy",
    429: "The key is busy (reject policy, when configured so)",
    503: "The shared state (Redis) cannot be reached, with fail_open=False",
}
TRACKED_RESPONSES = {
    409: "Cancelled by id from another request, or that id is already running",
    503: "Too many operations, the server is shutting down, or the shared state (Redis) "
    "cannot be reached",
}
START_RESPONSES = {
    409: "An operation with this id is running already",
    503: "Too many operations (in all, or of this owner), or the server is shutting down",
}
_COMMON_RESPONSES = {504: "The operation's deadline passed"}


def install(
    app: FastAPI, *, busy_status: Literal[409, 429] = 409, busy_retry_after: float = 1.0
) -> None:
    """Map cancellations to HTTP answers and document them in the OpenAPI schema.

    Exception handlers for :exc:`~cancelkit.OperationCancelled` (by the root reason:
    superseded or cancelled by id → ``409``, deadline → ``504``, shutdown → ``503``, client
    gone → ``499``, logged on the ``cancelkit`` logger since nobody reads it), for
    :exc:`~cancelkit.SlotBusy` (``busy_status`` with ``Retry-After``) and for
    :exc:`~cancelkit.RegistryFull` and :exc:`~cancelkit.BackendUnavailable` (``503`` with
    ``Retry-After``) and for :exc:`~cancelkit.OperationExists` (``409``: a retry with the id of
    a running operation).
    Each body is a :class:`CancelledBody` naming the reason. Routes that use :func:`latest_only` or
    :func:`tracked` list these responses in the OpenAPI schema. At startup (the lifespan) it
    logs a WARNING naming the fix when routes use a request's token (:data:`RequestToken`,
    :func:`latest_only`, :func:`tracked`) but the application does not run under
    :class:`~cancelkit.CancelOnDisconnect` (a client that leaves would never cancel them).
    Call it for every FastAPI application (a mounted sub-application too).

    Args:
        app: the application.
        busy_status: ``409`` or ``429`` for a claim refused by the ``reject`` policy.
        busy_retry_after: seconds for that answer's ``Retry-After``.

    .. versionadded:: 0.1
    """
    for exc_class, handler in exception_handlers(
        busy_status=busy_status, busy_retry_after=busy_retry_after
    ).items():
        # The handlers answer with an ASGI application, as Starlette allows.
        app.add_exception_handler(exc_class, cast(Any, handler))
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _document(original(), app, busy_status)
        return original()  # cached by FastAPI: the schema documented above

    app.openapi = openapi  # type: ignore[method-assign]
    serve = app.router.lifespan_context

    @asynccontextmanager
    async def checked(app_: Any) -> AsyncIterator[Any]:
        if not LIFESPAN_GUARDED.get():  # CancelOnDisconnect passed this lifespan on: guarded
            routes = [
                f"{min(getattr(route, 'methods', None) or ('GET',))} {route.path}"
                for route in _routes(app)
                if any(getattr(call, TOKEN_ATTR, False) for call in _dependency_calls(route))
            ]
            if routes:
                warn_unguarded(app, ", ".join(routes))
        async with serve(app_) as state:
            yield state

    app.router.lifespan_context = checked


_warned: weakref.WeakSet[Any] = weakref.WeakSet()  # the apps told they run unguarded


def warn_unguarded(app: Any, routes: str) -> None:
    """Warn once per application that ``routes`` do not run under CancelOnDisconnect."""
    if app in _warned:
        return
    _warned.add(app)
    logger.warning(
        "%s uses a cancelkit token, but the application does not run under "
        "CancelOnDisconnect: a client that goes away never cancels it (only a superseding "
        "request or a cancel by id does). Wrap the application: app = CancelOnDisconnect(app) "
        "or app.add_middleware(CancelOnDisconnect). (Said once per application.)",
        routes,
    )


def refusing_shadows(router: APIRouter) -> APIRouter:
    """Make ``router`` check, at the startup of the app that includes it, that it is reached.

    FastAPI merges an included router's lifespan into the including app's, so the check runs
    whenever the router is included (with :func:`install` or without).
    """
    serve = router.lifespan_context

    @asynccontextmanager
    async def checked(app: Any) -> AsyncIterator[Any]:
        if getattr(app, "routes", None) is not None:  # the app the server serves
            refuse_shadowed_routes(app)
        async with serve(app) as state:
            yield state

    router.lifespan_context = checked
    return router


def refuse_shadowed_routes(app: FastAPI) -> None:
    """Raise if a route of a cancelkit router is shadowed by another route (at startup).

    ``cancel_router`` and ``operations_router`` both default to
    ``/operations/{operation_id}``: the router included second was silently never reached.

    Raises:
        RuntimeError: naming both routes and the fix.
    """
    routes = [r for r in _routes(app) if getattr(r, "path_regex", None) is not None]
    owners = [getattr(getattr(r, "endpoint", None), ROUTER_ATTR, None) for r in routes]
    pairs = sorted(  # (earlier, later) around each cancelkit route: k x n checks, not n x n
        {
            (min(i, j), max(i, j))
            for i, owner in enumerate(owners)
            if owner
            for j in range(len(routes))
        }
    )
    for i, j in pairs:
        first, route = routes[i], routes[j]
        methods = set(getattr(first, "methods", None) or ())
        methods &= set(getattr(route, "methods", None) or ())
        # Starlette takes the first route that matches: an earlier one that matches this
        # path (a parameter filled in) takes its requests, all of them for a fixed path.
        if i != j and methods and first.path_regex.match(re.sub(r"{[^}]*}", "x", route.path)):
            names = [owners[k] or f"your route {routes[k].name!r}" for k in (i, j)]
            raise RuntimeError(
                f"{min(methods)} {route.path} is served by {names[0]} and by {names[1]}, so "
                f"the second is never reached: give one of them another path (for example "
                f"operations_router(operations, path='/background/{{operation_id}}'))"
            )


def _routes(app: FastAPI) -> Iterable[Any]:
    """Every route of the app, through included routers (whatever FastAPI's internals)."""
    from fastapi import routing

    iter_route_contexts = getattr(routing, "iter_route_contexts", None)
    if iter_route_contexts is None:  # pragma: no cover - FastAPI before 0.16x
        return list(app.routes)
    return list(iter_route_contexts(app.routes))


def _dependency_calls(route: Any) -> Iterator[Any]:
    """The callables of every dependency of ``route``, its sub-dependencies included."""
    dependant = getattr(route, "dependant", None)
    stack = [] if dependant is None else [dependant]
    while stack:
        dependant = stack.pop()
        yield dependant.call
        stack.extend(dependant.dependencies)


def _document(schema: dict[str, Any], app: FastAPI, busy_status: int) -> None:
    """Add the cancellation responses to the operations whose route uses the dependencies."""
    documented: dict[str, dict[int, str]] = {}
    for route in _routes(app):
        found: dict[int, str] = {}
        for call in _dependency_calls(route):
            found.update(getattr(call, RESPONSES_ATTR, {}))
        if found:
            found.update(_COMMON_RESPONSES)
            if busy_status != 429:
                found.pop(429, None)
            documented[route.unique_id] = found
    if not documented:
        return
    ref = {"$ref": "#/components/schemas/CancelledBody"}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for status, description in documented.get(operation.get("operationId"), {}).items():
                operation.setdefault("responses", {}).setdefault(
                    str(status),
                    {"description": description, "content": {"application/json": {"schema": ref}}},
                )
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault("CancelledBody", CancelledBody.model_json_schema())
