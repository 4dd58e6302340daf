"""FastAPI adapters: dependencies, a cancel router and exception handlers.

Install the extra with ``pip install 'cancelkit[fastapi]'``. Everything here is a thin layer
over the framework-agnostic core:

- :data:`RequestToken`: the request's token, cancelled by a client disconnect (with
  :class:`~cancelkit.CancelOnDisconnect` installed), by a cancel-by-id and by a newer request,
  whichever comes first;
- :func:`latest_only`: a dependency that runs the endpoint as the newest claim on a key;
- :func:`tracked`: a dependency that registers the request in a
  :class:`~cancelkit.TokenRegistry` so that another request can cancel it by id;
- :func:`cancel_router`: the ``DELETE`` (or ``POST``) endpoint that does that;
- :func:`install`: exception handlers that turn cancellations into clean HTTP answers, and the
  matching responses in the OpenAPI schema.

.. versionadded:: 0.1
"""

# No "from __future__ import annotations" here: FastAPI reads the annotations of the
# dependencies made below at run time, and they refer to local variables.
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal, TypeAlias, cast

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ._http import exception_handlers
from ._latest import Claim, LatestOnly
from ._reason import CancelKind, CancelReason
from ._registry import _ID_PATTERN, TokenRegistry, TrackedOperation
from ._token import CancellationToken
from .backends import CancelOutcome

__all__ = [
    "CancelledBody",
    "OperationBody",
    "RequestToken",
    "cancel_router",
    "install",
    "latest_only",
    "request_level_token",
    "tracked",
]

_Scope = Literal["function", "request"]  # when a dependency lets go

_REQUEST_TOKEN = "cancelkit.fastapi.token"
_ASGI_TOKEN = "cancelkit.token"  # where CancelOnDisconnect keeps the disconnect token
_RESPONSES_ATTR = "__cancelkit_responses__"


class CancelledBody(BaseModel):
    """The JSON body of a response to stopped work.

    .. versionadded:: 0.1
    """

    detail: str
    reason: str
    source: str | None = None


class OperationBody(BaseModel):
    """The JSON body of an answer of the cancel endpoint.

    .. versionadded:: 0.1
    """

    id: str
    outcome: str


# -- the request's token ----------------------------------------------------------------------


def request_level_token(request: Request) -> CancellationToken:
    """Return the request's token, creating it on first use.

    It follows the :class:`~cancelkit.CancelOnDisconnect` token when that middleware runs the
    request, and it is cancelled too when a :func:`latest_only` claim or a :func:`tracked`
    operation of the same request is (with that reason), in whatever order the dependencies
    were declared.

    Args:
        request: the request.

    Returns:
        The token; the same object for every call within one request.

    .. versionadded:: 0.1
    """
    scope = request.scope
    token = scope.get(_REQUEST_TOKEN)
    if token is None:
        outer = scope.get(_ASGI_TOKEN)
        token = CancellationToken() if outer is None else outer.child()
        scope[_REQUEST_TOKEN] = token
    return cast(CancellationToken, token)


#: ``token: RequestToken`` in an endpoint or dependency: the request's token (see
#: :func:`request_level_token`). In a sync ``def`` endpoint (run in a worker thread), call
#: ``token.raise_if_cancelled()`` between steps to stop when it is cancelled.
RequestToken: TypeAlias = Annotated[CancellationToken, Depends(request_level_token)]


@contextmanager
def _relayed(source: CancellationToken, request: Request) -> Iterator[None]:
    """Cancel the request-level token too when ``source`` is cancelled, while in the block."""
    handle = source.on_cancel(request_level_token(request).cancel)
    try:
        yield
    finally:
        handle.unregister()


def _interrupting(
    held: Callable[..., AsyncIterator[Claim | TrackedOperation]],
    scope: _Scope,
    responses: dict[int, str],
) -> Any:
    """Hold the claim/operation for ``scope``, but interrupt only the endpoint function.

    The token scope must not span the sending of the response: a cancellation there would
    turn a streamed response that already started into an error. A stream can end cleanly
    with ``token.until_cancelled(...)`` instead.
    """

    async def interrupted(
        held_value: Annotated[Any, Depends(held, scope=scope)],
    ) -> AsyncIterator[Any]:
        with held_value.token.scope():
            yield held_value

    setattr(interrupted, _RESPONSES_ATTR, responses)
    return Depends(interrupted, scope="function")


def _as_dependency(func: Callable[..., Any], what: str) -> Callable[..., Any]:
    """Accept ``lambda request: ...`` as well as a real FastAPI dependency."""
    if not callable(func):
        raise TypeError(f"{what} must be callable, not {type(func).__name__}")
    params = list(inspect.signature(func).parameters.values())
    if len(params) == 1 and params[0].annotation is inspect.Parameter.empty:

        async def call_with_request(request: Request) -> Any:
            result = func(request)
            return await result if inspect.isawaitable(result) else result

        return call_with_request
    return func


# -- latest-only ------------------------------------------------------------------------------


def latest_only(
    slot: LatestOnly,
    key: Callable[..., str | Awaitable[str]],
    *,
    scope: _Scope = "function",
) -> Any:
    """Make a dependency that runs the endpoint as the newest claim on a key.

    ``claim: Annotated[Claim, latest_only(slot, key=search_key)]``: the endpoint runs inside
    ``claim.token.scope()``. A newer request for the same key supersedes it (or is refused, or
    waits: the slot's policy decides); the superseded endpoint's awaits are interrupted and,
    with :func:`install`, its client gets ``409`` naming the reason.

    Args:
        slot: the :class:`~cancelkit.LatestOnly` that holds the keys (its policy, debounce and
            backend apply).
        key: a function of the request that returns the key, e.g.
            ``lambda request: f"{request.client.host}:search"``; or any FastAPI dependency
            (it may depend on your auth dependency: ``def key(user: CurrentUser) -> str``).
            Include the user in the key, so that one user never supersedes another.
        scope: when the claim is released: ``"function"`` when the endpoint returns,
            ``"request"`` after the response was sent (a streaming endpoint keeps it while
            it streams; end the stream with ``claim.token.until_cancelled(...)``).

    Returns:
        A ``Depends`` marker for ``Annotated[Claim, ...]``.

    .. versionadded:: 0.1
    """
    if not isinstance(slot, LatestOnly):
        raise TypeError(f"slot must be a LatestOnly, not {type(slot).__name__}")
    key_dependency = _as_dependency(key, "key")

    async def held_claim(
        request: Request, key: Annotated[str, Depends(key_dependency)]
    ) -> AsyncIterator[Claim]:
        async with slot.claim(key, interrupt=False) as claim:
            with _relayed(claim.token, request):
                yield claim

    return _interrupting(held_claim, scope, _LATEST_RESPONSES)


# -- cancel by id -----------------------------------------------------------------------------

_OwnerDependency = Callable[..., str | Awaitable[str | None] | None]


def _no_owner() -> None:
    return None


def tracked(
    registry: TokenRegistry,
    *,
    owner: _OwnerDependency | None = None,
    header: str = "X-Operation-Id",
    path_param: str | None = None,
    scope: _Scope = "function",
) -> Any:
    """Make a dependency that registers the request as a cancellable operation.

    ``op: Annotated[TrackedOperation, tracked(registry, owner=current_user_id)]``: the endpoint
    runs inside the operation's ``token.scope()``; :func:`cancel_router` (or
    :meth:`TokenRegistry.cancel <cancelkit.TokenRegistry.cancel>`) stops it by id, even before it
    registered. The id comes from the client (the ``header``, or the path parameter
    ``path_param``; invalid ids are answered with ``422``) or is generated; it is returned in
    the ``header`` of the response.

    Args:
        registry: where operations are tracked.
        owner: your dependency that returns the owner (the authenticated user or tenant); the
            same one you give :func:`cancel_router`. ``None``: no owner scoping.
        header: the request/response header that carries the operation id.
        path_param: take the id from this path parameter instead of the header.
        scope: when the registration is released: ``"function"`` when the endpoint
            returns, ``"request"`` after the response was sent (for streaming).

    Returns:
        A ``Depends`` marker for ``Annotated[TrackedOperation, ...]``.

    .. versionadded:: 0.1
    """
    if not isinstance(registry, TokenRegistry):
        raise TypeError(f"registry must be a TokenRegistry, not {type(registry).__name__}")
    owner_dependency = _no_owner if owner is None else _as_dependency(owner, "owner")
    id_kind = Path if path_param is not None else Header
    id_default = inspect.Parameter.empty if path_param is not None else None
    id_param = inspect.Parameter(
        "operation_id",
        inspect.Parameter.KEYWORD_ONLY,
        default=id_default,
        annotation=Annotated[
            str if path_param is not None else str | None,
            id_kind(
                alias=path_param or header,
                pattern=_ID_PATTERN,
                max_length=128,
                description="Operation id: 1 to 128 characters from A-Z a-z 0-9 . _ : -",
            ),
        ],
    )

    async def tracked_dependency(
        request: Request,
        response: Response,
        owner: str | None,
        operation_id: str | None = None,
    ) -> AsyncIterator[TrackedOperation]:
        async with registry.track(operation_id, owner=owner, interrupt=False) as op:
            response.headers[header] = op.id
            with _relayed(op.token, request):
                yield op

    tracked_dependency.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=Request),
            inspect.Parameter("response", inspect.Parameter.KEYWORD_ONLY, annotation=Response),
            inspect.Parameter(
                "owner",
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Annotated[str | None, Depends(owner_dependency)],
            ),
            id_param,
        ]
    )
    return _interrupting(tracked_dependency, scope, _TRACKED_RESPONSES)


def cancel_router(
    registry: TokenRegistry,
    *,
    owner: _OwnerDependency | None = None,
    path: str = "/operations/{operation_id}",
    methods: Iterable[str] = ("DELETE",),
    **router_options: Any,
) -> APIRouter:
    """Make a router with the endpoint that cancels an operation by id.

    It answers ``202`` when the operation was running (``"cancelled"``) or has not registered
    yet (``"pending"``: it will start already cancelled), ``404`` when there is nothing of
    this owner's to cancel, and ``422`` for an invalid id. It never answers ``GET``: a cancel
    changes state, and link prefetchers must not trigger it.

    Args:
        registry: the registry the operations are tracked in.
        owner: your dependency that returns the owner; an operation of another owner looks
            absent (``404``) and is left alone.
        path: the route path; it must contain ``{operation_id}``.
        methods: ``"DELETE"``, ``"POST"`` or both.
        **router_options: passed to :class:`fastapi.APIRouter` (``prefix``, ``tags``,
            ``dependencies``...).

    Returns:
        The router, for ``app.include_router(...)``.

    Raises:
        ValueError: for a path without ``{operation_id}`` or a method other than DELETE/POST.

    .. versionadded:: 0.1
    """
    methods = [m.upper() for m in methods]
    if not methods or not set(methods) <= {"DELETE", "POST"}:
        raise ValueError(f"methods must be DELETE and/or POST (never GET), not {methods!r}")
    if "{operation_id}" not in path:
        raise ValueError(f"path must contain '{{operation_id}}', not {path!r}")
    owner_dependency = _no_owner if owner is None else _as_dependency(owner, "owner")
    router = APIRouter(**router_options)

    @router.api_route(
        path,
        methods=methods,
        status_code=202,
        response_model=OperationBody,
        responses={404: {"model": OperationBody, "description": "Nothing of yours to cancel"}},
        summary="Cancel an operation by id",
    )
    async def cancel_operation(
        operation_id: Annotated[str, Path(pattern=_ID_PATTERN, max_length=128)],
        owner: Annotated[str | None, Depends(owner_dependency)],
    ) -> Any:
        outcome = await registry.cancel(
            operation_id, owner=owner, reason=CancelReason(CancelKind.REQUESTED)
        )
        body = {"id": operation_id, "outcome": outcome.value}
        if outcome is CancelOutcome.NOT_FOUND:
            return JSONResponse(body, status_code=404)
        return body

    return router


# -- exception handlers and OpenAPI -----------------------------------------------------------

_LATEST_RESPONSES = {
    409: "Superseded by a newer request, or the key is busy",
    429: "The key is busy (reject policy, when configured so)",
}
_TRACKED_RESPONSES = {
    409: "Cancelled by id from another request, or that id is already running",
    503: "Too many operations, or the server is shutting down",
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
    :exc:`~cancelkit.RegistryFull` (``503`` with ``Retry-After``) and for
    :exc:`~cancelkit.OperationExists` (``409``: a retry with the id of a running operation).
    Each body is a :class:`CancelledBody` naming the reason. Routes that use :func:`latest_only` or
    :func:`tracked` list these responses in the OpenAPI schema. Call it for every FastAPI
    application (a mounted sub-application too).

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


def _routes(app: FastAPI) -> Iterable[Any]:
    """Every route of the app, through included routers (whatever FastAPI's internals)."""
    from fastapi import routing

    iter_route_contexts = getattr(routing, "iter_route_contexts", None)
    if iter_route_contexts is None:  # pragma: no cover - FastAPI before 0.16x
        return list(app.routes)
    return list(iter_route_contexts(app.routes))


def _document(schema: dict[str, Any], app: FastAPI, busy_status: int) -> None:
    """Add the cancellation responses to the operations whose route uses the dependencies."""
    documented: dict[str, dict[int, str]] = {}
    for route in _routes(app):
        dependant = getattr(route, "dependant", None)
        if dependant is None:
            continue
        found: dict[int, str] = {}
        stack = [dependant]
        while stack:
            dependant = stack.pop()
            found.update(getattr(dependant.call, _RESPONSES_ATTR, {}))
            stack.extend(dependant.dependencies)
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
