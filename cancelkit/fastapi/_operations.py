"""Background operations over HTTP: start now (202 + Location), read the status, cancel by id.

The core is :class:`~cancelkit.BackgroundOperations`; these are its FastAPI adapters.
"""

# No "from __future__ import annotations" here: FastAPI reads the annotations of the
# dependencies made below at run time, and they refer to local variables.
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from .._exceptions import BackendUnavailable, OperationCancelled, OperationExists, RegistryFull
from .._http import HTTPAnswer, answer_for, answer_unavailable
from .._operations import BackgroundOperations
from .._reason import CancelKind, CancelReason
from .._registry import _ID_PATTERN, _check
from .._status import OperationStatus
from ._openapi import (
    COMMITTED,
    RESPONSES_ATTR,
    ROUTER_ATTR,
    START_RESPONSES,
    CancelledBody,
    OperationBody,
    OperationStatusBody,
    cancel_answer,
    refusing_shadows,
)
from ._requests import _as_dependency, _no_owner, _OwnerDependency

__all__ = ["OperationStarter", "operation_starter", "operations_router"]

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
    return _answer(answer_unavailable(exc))


def _answer(answer: HTTPAnswer) -> Response:
    headers = {} if answer.retry_after is None else {"Retry-After": str(answer.retry_after)}
    return Response(
        answer.body(), status_code=answer.status, headers=headers, media_type="application/json"
    )


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
        # a path, not the absolute URL of this worker (wrong behind a load balancer); the
        # root path of a mounted app or a proxy prefix included
        location = self._request.url_for(self._route, operation_id=id).path
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

    setattr(starter, RESPONSES_ATTR, START_RESPONSES)
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

    At the startup of the app that includes it (the lifespan), a route that shadows one of
    the router's, or that it shadows (:func:`cancel_router` and :func:`operations_router`
    both default to ``/operations/{operation_id}``), fails the startup with a
    ``RuntimeError`` naming both and the fix.

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
    router = refusing_shadows(APIRouter(**router_options))
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
            409: {"model": OperationBody, "description": COMMITTED},
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
        return cancel_answer(operation_id, outcome)

    setattr(operation_status, ROUTER_ATTR, "operations_router")
    setattr(cancel_background_operation, ROUTER_ATTR, "operations_router")
    return router
