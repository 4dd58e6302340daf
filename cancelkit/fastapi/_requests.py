"""The request-level adapters: the request's token, latest_only, tracked, cancel_router."""

# No "from __future__ import annotations" here: FastAPI reads the annotations of the
# dependencies made below at run time, and they refer to local variables.
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Annotated, Any, Literal, TypeAlias, TypeVar, cast

from fastapi import APIRouter, Depends, Header, Path, Request, Response
from fastapi.exceptions import RequestValidationError

from .. import _events
from .._asgi import ECHO_KEY, EXCLUDED_KEY, SCOPE_KEY
from .._exceptions import OperationCancelled
from .._latest import _MAX_SEQ, Claim, LatestOnly
from .._reason import CancelKind, CancelReason
from .._registry import _ID_PATTERN, TokenRegistry, TrackedOperation
from .._token import CancellationToken, shorten_deadline
from ._openapi import (
    COMMITTED,
    LATEST_RESPONSES,
    RESPONSES_ATTR,
    ROUTER_ATTR,
    TOKEN_ATTR,
    TRACKED_RESPONSES,
    UNAVAILABLE,
    CancelledBody,
    OperationBody,
    cancel_answer,
    refusing_shadows,
    warn_unguarded,
)

__all__ = [
    "RequestToken",
    "cancel_router",
    "latest_only",
    "request_level_token",
    "tracked",
]

_Scope = Literal["function", "request"]  # when a dependency lets go
_T = TypeVar("_T")
logger = logging.getLogger("cancelkit")


@asynccontextmanager
async def _answered(held: AbstractAsyncContextManager[_T], scope: _Scope) -> AsyncIterator[_T]:
    """Hold a claim or an operation for a dependency of ``scope``.

    A cancel that won before the endpoint finished makes the exit raise (its answer is the
    cancellation's, not a 200); with ``scope="request"`` the response was sent already by
    then (a stream that ended), so that is logged instead.
    """
    ended = False
    try:
        async with held as value:
            yield value
            ended = True
    except OperationCancelled as exc:
        if not ended or scope == "function":
            raise
        logger.info("cancelled after its response was sent: %s", exc.reason)


_REQUEST_TOKEN = "cancelkit.fastapi.token"


# -- the request's token ----------------------------------------------------------------------


def _unguarded(request: Request) -> None:
    """Warn once per application that its requests do not run under CancelOnDisconnect."""
    app = request.scope.get("app")
    if app is not None and not request.scope.get(EXCLUDED_KEY):
        warn_unguarded(app, f"{request.scope.get('method')} {request.scope.get('path')}")


def _request_level_token(request: Request) -> CancellationToken:
    """The request's token, creating it on first use (see :func:`request_level_token`)."""
    scope = request.scope
    token = scope.get(_REQUEST_TOKEN)
    if token is None:
        outer = scope.get(SCOPE_KEY)
        if outer is None:
            _unguarded(request)
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


setattr(request_level_token, TOKEN_ATTR, True)  # install() warns of a route without the guard


# The request's token as an annotation (documented where it is exported: __init__.py).
RequestToken: TypeAlias = Annotated[CancellationToken, Depends(request_level_token)]


_NOT_INSTALLED = (
    "cancelkit.fastapi.install(app) was not called for this application: without it a "
    "superseded or cancelled request is a 500 with OperationCancelled in the log instead of "
    "its answer (409, 504, 499...). Call install(app) once for every FastAPI application, a "
    "mounted sub-application too"
)


@contextmanager
def _relayed(source: CancellationToken, request: Request) -> Iterator[None]:
    """While in the block, link ``source`` (a claim's or an operation's token) both ways.

    The request-level token (:data:`RequestToken`) is cancelled when ``source`` is, and
    ``source`` when the :class:`~cancelkit.CancelOnDisconnect` token of the request is (a
    client disconnect, shutdown), whose deadline ``source`` gets too: the endpoint runs in
    ``source.scope()``, so that is the token :func:`~cancelkit.current_token` returns there
    (in a worker thread too), and the deadline outgoing calls carry.
    """
    if OperationCancelled not in request.app.exception_handlers:
        raise RuntimeError(_NOT_INSTALLED)
    handle = source.on_cancel(_request_level_token(request).cancel)
    outer = request.scope.get(SCOPE_KEY)
    outer_handle = None
    if outer is None:
        _unguarded(request)
    else:
        shorten_deadline(source, outer.deadline)
        outer_handle = outer.on_cancel(source.cancel)
        if _events.listeners:  # one event for the two tokens (the innermost unit's)
            _events.relayed[source] = outer
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

    setattr(interrupted, RESPONSES_ATTR, responses)
    setattr(interrupted, TOKEN_ATTR, True)
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
        async with _answered(slot.hold(key, seq=seq), scope) as claim:
            with _relayed(claim.token, request):
                yield claim

    return _interrupting(held_claim, scope, LATEST_RESPONSES)


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
    the ``header`` of the response (also when the endpoint returns a response of its own,
    a ``StreamingResponse``, if :class:`~cancelkit.CancelOnDisconnect` runs the app).

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
        async with _answered(registry.hold(operation_id, owner=owner), scope) as op:
            response.headers[header] = op.id  # and, for a response of its own, the guard's:
            echo = request.scope.setdefault(ECHO_KEY, [])
            echo.append((header.lower().encode("latin-1"), op.id.encode("ascii")))
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
    return _interrupting(tracked_dependency, scope, TRACKED_RESPONSES)


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

    At the startup of the app that includes it (the lifespan), a route that shadows one of
    the router's, or that it shadows (:func:`cancel_router` and :func:`operations_router`
    both default to ``/operations/{operation_id}``), fails the startup with a
    ``RuntimeError`` naming both and the fix.

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
    router = refusing_shadows(APIRouter(**router_options))

    @router.api_route(
        path,
        methods=methods,
        status_code=202,
        response_model=OperationBody,
        responses={
            404: {"model": OperationBody, "description": "Nothing of yours to cancel"},
            409: {"model": OperationBody, "description": COMMITTED},
            503: {"model": CancelledBody, "description": UNAVAILABLE},
        },
        summary="Cancel an operation by id",
    )
    async def cancel_operation(
        operation_id: Annotated[str, Path(pattern=_ID_PATTERN, max_length=128)],
        owner: Annotated[str | None, Depends(owner_dependency)],
    ) -> Any:
        outcome = await registry.cancel(
            operation_id, owner=owner, reason=CancelReason(CancelKind.REQUESTED)
        )
        return cancel_answer(operation_id, outcome)

    setattr(cancel_operation, ROUTER_ATTR, "cancel_router")
    return router
