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
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ._http import exception_handlers
from ._latest import _MAX_SEQ, Claim, LatestOnly
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


def _request_level_token(request: Request) -> CancellationToken:
    """The request's token, creating it on first use (see :func:`request_level_token`)."""
    scope = request.scope
    token = scope.get(_REQUEST_TOKEN)
    if token is None:
        outer = scope.get(_ASGI_TOKEN)
        token = CancellationToken() if outer is None else outer.child()
        scope[_REQUEST_TOKEN] = token
    return cast(CancellationToken, token)


async def request_level_token(request: Request) -> CancellationToken:
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
    # async def: a sync dependency costs every request a trip through the threadpool.
    return _request_level_token(request)


#: ``token: RequestToken`` in an endpoint or dependency: the request's token (see
#: :func:`request_level_token`). In a sync ``def`` endpoint (run in a worker thread), call
#: ``token.raise_if_cancelled()`` between steps to stop when it is cancelled.
RequestToken: TypeAlias = Annotated[CancellationToken, Depends(request_level_token)]


@contextmanager
def _relayed(source: CancellationToken, request: Request) -> Iterator[None]:
    """While in the block, link ``source`` (a claim's or an operation's token) both ways.

    The request-level token (:data:`RequestToken`) is cancelled when ``source`` is, and
    ``source`` when the :class:`~cancelkit.CancelOnDisconnect` token of the request is (a
    client disconnect, shutdown): the endpoint runs in ``source.scope()``, so that is the
    token :func:`~cancelkit.current_token` returns there, in a worker thread too.
    """
    handle = source.on_cancel(_request_level_token(request).cancel)
    outer = request.scope.get(_ASGI_TOKEN)
    outer_handle = None if outer is None else outer.on_cancel(source.cancel)
    try:
        yield
    finally:
        handle.unregister()
        if outer_handle is not None:
            outer_handle.unregister()


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


_SeqDependency = Callable[..., int | Awaitable[int | None] | None]


def _seq_error(value: object, loc: tuple[str, ...]) -> RequestValidationError:
    return RequestValidationError(
        [
            {
                "type": "value_error",
                "loc": loc,
                "msg": f"the sequence number must be an int from 0 to 2**53, not {value!r}",
                "input": value,
            }
        ]
    )


def _seq_from_header(name: str) -> Callable[..., Awaitable[int | None]]:
    """A dependency reading the sequence number from header ``name``: ASCII digits only."""

    async def sequence_header(  # async: a sync dependency is a threadpool trip per request
        value: Annotated[
            str | None,
            Header(
                alias=name,
                pattern=r"^[0-9]{1,16}$",  # no sign, no "1.0", no "5_000", no spaces
                description=(
                    "The client's own number for this request (decimal digits, at most 2**53), "
                    "increasing per key (a keystroke counter): a request whose number is not "
                    "above the newest one seen is stale and answered 409 without running. "
                    "Omit it to keep arrival order."
                ),
            ),
        ] = None,
    ) -> int | None:
        if value is None:
            return None
        seq = int(value)
        if seq > _MAX_SEQ:
            raise _seq_error(value, ("header", name))
        return seq

    return sequence_header


async def _no_seq() -> None:
    return None


def _checked_seq(seq: _SeqDependency) -> Callable[..., Any]:
    """Wrap a user dependency: its result must be an int in range or None, else 422."""
    dependency = _as_dependency(seq, "seq")

    async def sequence(value: Annotated[Any, Depends(dependency)]) -> int | None:
        if value is None or (
            isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_SEQ
        ):
            return value
        raise _seq_error(value, ("seq",))

    return sequence


def latest_only(
    slot: LatestOnly,
    key: Callable[..., str | Awaitable[str]],
    *,
    seq: str | _SeqDependency | None = "X-Sequence",
    scope: _Scope = "function",
) -> Any:
    """Make a dependency that runs the endpoint as the newest claim on a key.

    ``claim: Annotated[Claim, latest_only(slot, key=search_key)]``: the endpoint runs inside
    ``claim.token.scope()``. A newer request for the same key supersedes it (or is refused, or
    waits: the slot's policy decides); the superseded endpoint's awaits are interrupted and,
    with :func:`install`, its client gets ``409`` naming the reason.

    Requests of one client may arrive out of order; the client's own order wins when it sends
    an increasing number per key (the ``X-Sequence`` header by default): a request whose number
    is not above the newest one seen is *stale* and never runs; with :func:`install` it gets
    the same ``409`` as a superseded request, whose ``detail`` starts with ``"stale:"``. A
    malformed number is answered ``422`` naming the header.

    Args:
        slot: the :class:`~cancelkit.LatestOnly` that holds the keys (its policy, debounce and
            backend apply).
        key: a function of the request that returns the key, e.g.
            ``lambda request: f"{request.client.host}:search"``; or any FastAPI dependency
            (it may depend on your auth dependency: ``def key(user: CurrentUser) -> str``).
            Include the user in the key, so that one user never supersedes another.
        seq: where the sequence number comes from: the name of a request header (an int from
            0 to 2**53; absent means arrival order), or a function of the request, or any
            FastAPI dependency returning an int or ``None`` (another value is a ``422``);
            ``None``: arrival order always.
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
    if seq is None:
        seq_dependency: Callable[..., Any] = _no_seq
    elif isinstance(seq, str):
        seq_dependency = _seq_from_header(seq)
    else:
        seq_dependency = _checked_seq(seq)

    async def held_claim(
        request: Request,
        key: Annotated[str, Depends(key_dependency)],
        seq: Annotated[int | None, Depends(seq_dependency)],
    ) -> AsyncIterator[Claim]:
        async with slot.hold(key, seq=seq) as claim:
            with _relayed(claim.token, request):
                yield claim

    return _interrupting(held_claim, scope, _LATEST_RESPONSES)


# -- cancel by id -----------------------------------------------------------------------------

_OwnerDependency = Callable[..., str | Awaitable[str | None] | None]


async def _no_owner() -> None:
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
        async with registry.hold(operation_id, owner=owner) as op:
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
    409: "Superseded by a newer request, stale (an older sequence number), or the key is busy",
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


# =============================================================================================
# Background operations (#15): start now (202 + Location), read the status, cancel by id.
# Kept apart from the request-level adapters above; the core is cancelkit._operations.
# =============================================================================================

import logging  # noqa: E402

import anyio  # noqa: E402
from fastapi import HTTPException, Query  # noqa: E402
from pydantic import Field  # noqa: E402

from ._exceptions import (  # noqa: E402
    BackendUnavailable,
    OperationCancelled,
    OperationExists,
    RegistryFull,
)
from ._http import HTTPAnswer, answer_for  # noqa: E402
from ._operations import BackgroundOperations, OperationStatus  # noqa: E402
from ._registry import _check  # noqa: E402

__all__ += [
    "OperationErrorBody",
    "OperationProgressBody",
    "OperationReasonBody",
    "OperationStartedBody",
    "OperationStarter",
    "OperationStatusBody",
    "operation_starter",
    "operations_router",
]

_STATUS_ROUTE = "cancelkit_operation_status"

_INVALID_OWNER = (
    "the owner that the application's auth dependency gave is not a valid cancelkit owner "
    "(None, or 1 to 256 printable characters without whitespace); the server log says more"
)


def _checked_owner(owner: _OwnerDependency | None) -> Callable[..., Any]:
    """The app's owner dependency, checked: an owner cancelkit refuses answers a clear 500.

    The owner is the application's (its auth dependency), not the client's input, so an
    owner cancelkit cannot use is a server error; the body names the problem, the log the
    owner, and no operation is started, read or cancelled.
    """
    dependency = _no_owner if owner is None else _as_dependency(owner, "owner")

    async def operation_owner(
        value: Annotated[str | None, Depends(dependency)],
    ) -> str | None:
        try:
            _check("-", value)
        except (TypeError, ValueError) as exc:
            log = logging.getLogger("cancelkit.fastapi")
            log.error("%s: %s", _INVALID_OWNER, exc)  # noqa: TRY400 - no traceback wanted
            raise HTTPException(500, _INVALID_OWNER) from None
        return value

    return operation_owner


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

    done: float
    total: float | None = None
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


def _status_body(status: OperationStatus) -> dict[str, Any]:
    data = status.to_json()
    del data["owner"]  # the caller is the owner
    if status.reason is not None:
        root = status.reason.root
        data["reason"] = {"kind": root.kind.value, "message": root.message, "source": root.source}
    return data


def _unavailable(exc: Exception) -> Response | None:
    """503 for a store or backend that cannot be reached (a Redis server, say)."""
    if not isinstance(exc, BackendUnavailable):
        return None
    return _answer(HTTPAnswer(503, "unavailable", str(exc), None, 1))


def _answer(answer: HTTPAnswer) -> Response:
    headers = {} if answer.retry_after is None else {"Retry-After": str(answer.retry_after)}
    return Response(
        answer.body(), status_code=answer.status, headers=headers, media_type="application/json"
    )


_START_RESPONSES = {
    409: "An operation with this id is running already",
    503: "Too many operations (in all, or of this owner), or the server is shutting down",
}


class OperationStarter:
    """Starts background operations for one request; given by :func:`operation_starter`.

    ``return await start(export, table)`` starts ``export(table)`` for the request's owner
    (with the id from the request's id header, if any) and answers ``202 Accepted`` with
    the id and a ``Location`` of its status; a refusal is answered from cancelkit's table:
    ``409`` for a running id, ``503`` with ``Retry-After`` for a limit or a shutdown.

    .. versionadded:: 0.1
    """

    __slots__ = ("_id", "_operations", "_owner", "_request", "_route")

    def __init__(
        self,
        operations: BackgroundOperations,
        request: Request,
        owner: str | None,
        id: str | None,
        route: str,
    ) -> None:
        """Made by the :func:`operation_starter` dependency, once per request."""
        self._operations = operations
        self._request = request
        self._owner = owner
        self._id = id
        self._route = route

    @property
    def owner(self) -> str | None:
        """The owner the operations are started for."""
        return self._owner

    async def __call__(self, func: Callable[..., Awaitable[Any]], *args: Any) -> Response:
        """Start ``func(*args)`` and return the response (202, or the refusal)."""
        try:
            id = await self._operations.start(func, *args, id=self._id, owner=self._owner)
        except (OperationExists, RegistryFull, OperationCancelled) as exc:
            answer = answer_for(exc)
            assert answer is not None
            return _answer(answer)
        except Exception as exc:
            if (response := _unavailable(exc)) is not None:
                return response
            raise
        location = str(self._request.url_for(self._route, operation_id=id))
        status = await self._operations.status(id, owner=self._owner)
        state = "running" if status is None else status.state.value
        body = {"id": id, "state": state, "status_url": location}
        return JSONResponse(body, status_code=202, headers={"Location": location})


def operation_starter(
    operations: BackgroundOperations,
    *,
    owner: _OwnerDependency | None = None,
    header: str = "X-Operation-Id",
    status_route: str = _STATUS_ROUTE,
) -> Any:
    """Make a dependency that gives an endpoint an :class:`OperationStarter`.

    ::

        Start = Annotated[OperationStarter, operation_starter(operations, owner=current_user)]

        @app.post("/exports", status_code=202, response_model=OperationStartedBody)
        async def start_export(table: str, start: Start) -> Response:
            return await start(export, table)

    Args:
        operations: the application's :class:`~cancelkit.BackgroundOperations`.
        owner: your dependency that returns the owner (the authenticated user or tenant); the
            same one you give :func:`operations_router`. An owner cancelkit refuses (not
            ``None`` or 1 to 256 printable characters without whitespace) answers ``500``
            with a ``detail`` saying so.
        header: the request header that may carry a client-chosen operation id (so that the
            client can cancel before it has the answer); a random id otherwise.
        status_route: the name of the status route the ``Location`` points at (the default
            is the name :func:`operations_router` gives it).

    Returns:
        A ``Depends`` marker for ``Annotated[OperationStarter, ...]``.

    .. versionadded:: 0.1
    """
    if not isinstance(operations, BackgroundOperations):
        raise TypeError(f"operations must be BackgroundOperations, not {type(operations).__name__}")
    owner_dependency = _checked_owner(owner)

    async def starter(
        request: Request,
        owner: Annotated[str | None, Depends(owner_dependency)],
        operation_id: Annotated[
            str | None,
            Header(
                alias=header,
                pattern=_ID_PATTERN,
                max_length=128,
                description="Operation id: 1 to 128 characters from A-Z a-z 0-9 . _ : -",
            ),
        ] = None,
    ) -> OperationStarter:
        return OperationStarter(operations, request, owner, operation_id, status_route)

    setattr(starter, _RESPONSES_ATTR, _START_RESPONSES)
    return Depends(starter)


def operations_router(
    operations: BackgroundOperations,
    *,
    owner: _OwnerDependency | None = None,
    path: str = "/operations/{operation_id}",
    max_wait: float = 30.0,
    status_route: str = _STATUS_ROUTE,
    **router_options: Any,
) -> APIRouter:
    """Make a router with the status (``GET``) and cancel (``DELETE``) endpoints of operations.

    - ``GET path`` answers ``200`` with an :class:`OperationStatusBody` (running, completed
      with its result, failed with the error's type and message, cancelled with the reason,
      or lost), ``404`` when this owner has no such operation (never had, or it expired).
      ``?wait=S`` waits up to ``S`` seconds (at most ``max_wait``) for the operation to end.
    - ``DELETE path`` cancels it wherever it runs: ``202`` with ``"cancelled"`` or
      ``"pending"`` (not started yet: it will start already cancelled), ``404`` when there
      is nothing of this owner's to cancel (ended, lost, or someone else's).

    Both answer ``503`` with ``Retry-After`` (reason ``"unavailable"``) while Redis cannot
    be reached, as does a start.

    Args:
        operations: the application's :class:`~cancelkit.BackgroundOperations`.
        owner: your dependency that returns the owner; another owner's operations look absent
            (an owner cancelkit refuses answers ``500`` with a ``detail`` saying so).
        path: the route path; it must contain ``{operation_id}``.
        max_wait: the most seconds a ``GET`` may wait for the end.
        status_route: the name of the ``GET`` route (for ``Location`` headers).
        **router_options: passed to :class:`fastapi.APIRouter` (``prefix``, ``tags``,
            ``dependencies``...).

    Returns:
        The router, for ``app.include_router(...)``.

    Raises:
        ValueError: for a path without ``{operation_id}`` or a negative ``max_wait``.

    .. versionadded:: 0.1
    """
    if not isinstance(operations, BackgroundOperations):
        raise TypeError(f"operations must be BackgroundOperations, not {type(operations).__name__}")
    if "{operation_id}" not in path:
        raise ValueError(f"path must contain '{{operation_id}}', not {path!r}")
    if not 0 <= max_wait <= 3600:
        raise ValueError(f"max_wait must be seconds from 0 to 3600, not {max_wait!r}")
    owner_dependency = _checked_owner(owner)
    router = APIRouter(**router_options)
    unavailable = {"model": CancelledBody, "description": "Redis cannot be reached"}
    not_found: dict[int | str, dict[str, Any]] = {
        404: {"model": CancelledBody, "description": "No such operation of yours"},
        503: unavailable,
    }

    @router.get(
        path,
        name=status_route,
        response_model=OperationStatusBody,
        responses=not_found,
        summary="The status of a background operation",
    )
    async def operation_status(
        operation_id: Annotated[str, Path(pattern=_ID_PATTERN, max_length=128)],
        owner: Annotated[str | None, Depends(owner_dependency)],
        wait: Annotated[
            float,
            Query(ge=0, le=max_wait, description="Seconds to wait for the operation to end"),
        ] = 0,
    ) -> Any:
        try:
            if wait > 0:
                with anyio.move_on_after(wait):
                    await operations.wait(operation_id, owner=owner)
            status = await operations.status(operation_id, owner=owner)
        except Exception as exc:
            if (response := _unavailable(exc)) is not None:
                return response
            raise
        if status is None:
            body = {"detail": "no such operation", "reason": "not_found", "source": None}
            return JSONResponse(body, status_code=404)
        return _status_body(status)

    @router.delete(
        path,
        status_code=202,
        response_model=OperationBody,
        responses={
            404: {"model": OperationBody, "description": "Nothing of yours to cancel"},
            503: unavailable,
        },
        summary="Cancel a background operation",
    )
    async def cancel_background_operation(
        operation_id: Annotated[str, Path(pattern=_ID_PATTERN, max_length=128)],
        owner: Annotated[str | None, Depends(owner_dependency)],
    ) -> Any:
        try:
            outcome = await operations.cancel(
                operation_id, owner=owner, reason=CancelReason(CancelKind.REQUESTED)
            )
        except Exception as exc:
            if (response := _unavailable(exc)) is not None:
                return response
            raise
        body = {"id": operation_id, "outcome": outcome.value}
        if outcome is CancelOutcome.NOT_FOUND:
            return JSONResponse(body, status_code=404)
        return body

    return router
