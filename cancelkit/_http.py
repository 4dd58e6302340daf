"""One HTTP answer per reason: the status, the body and the log line of stopped work.

Both the ASGI layer (:class:`~cancelkit.CancelOnDisconnect`) and the FastAPI adapters answer
from this table, so a plain-ASGI application and a FastAPI application give the same answers:

=================================================  ======  ============================
what stopped the work                              status  notes
=================================================  ======  ============================
superseded (a stale sequence number too)           409
cancelled by request (by id, ``token.cancel()``)   409
deadline                                           504     ``Deadline-Expired: true``
shutdown                                           503     ``Retry-After: 1``
client disconnected                                499     nobody reads it: logged once
linked token (``parent``)                          the root reason's answer
key busy (:exc:`~cancelkit.SlotBusy`)              409     or 429; ``Retry-After``
registry full (:exc:`~cancelkit.RegistryFull`)     503     ``Retry-After: 1``
id already running (:exc:`~cancelkit.OperationExists`)  409
backend unreachable (:exc:`~cancelkit.BackendUnavailable`)  503  ``Retry-After: 1``
=================================================  ======  ============================

The body is JSON: ``{"detail": <message>, "reason": <kind>, "source": <id or null>}``. A
``504`` says ``Deadline-Expired: true``: the caller's budget is spent, a retry with the same
budget cannot succeed (and :class:`cancelkit.httpx.TokenTransport`, calling this service from
another hop, turns it into that hop's own deadline).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal, final

import anyio

from ._deadline import EXPIRED_HEADER
from ._exceptions import (
    BackendUnavailable,
    OperationCancelled,
    OperationExists,
    RegistryFull,
    SlotBusy,
)
from ._reason import CancelKind, CancelReason

__all__ = [
    "HTTPAnswer",
    "answer_for",
    "answer_for_reason",
    "answer_unavailable",
    "exception_handlers",
    "log_gone",
]

logger = logging.getLogger("cancelkit")

# The ASGI types (the spec's names), for the modules that speak ASGI.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Status of each root reason kind (``parent`` never is a root).
STATUS: dict[CancelKind, int] = {
    CancelKind.SUPERSEDED: 409,
    CancelKind.REQUESTED: 409,
    CancelKind.DEADLINE: 504,
    CancelKind.SHUTDOWN: 503,
    CancelKind.CLIENT_DISCONNECTED: 499,
}
#: Statuses whose answer carries ``Retry-After``; seconds.
_RETRY_AFTER = {503: 1}

#: The most seconds the sending of an answer may hold off a cancellation (a slow client).
SEND_LIMIT = 5.0

#: The header of a deadline's answer.
_EXPIRED = (EXPIRED_HEADER.lower().encode(), b"true")

#: The scope key that records that this request's 499 line was written.
_LOGGED_KEY = "cancelkit.gone_logged"


@final
@dataclass(frozen=True, slots=True)
class HTTPAnswer:
    """The HTTP answer to stopped or refused work: status, JSON body fields, ``Retry-After``.

    An instance is also an ASGI application that sends the answer, so a Starlette exception
    handler may return it as its response. A ``499`` is logged too (once per request), since
    nobody reads it.
    """

    status: int
    reason: str
    detail: str
    source: str | None = None
    retry_after: int | None = None

    def body(self) -> bytes:
        """The JSON body."""
        fields = {"detail": self.detail, "reason": self.reason, "source": self.source}
        return json.dumps(fields, separators=(",", ":")).encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The response headers (content type and length, ``Retry-After``, ``Deadline-Expired``)."""
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self.body())).encode()),
        ]
        if self.retry_after is not None:
            headers.append((b"retry-after", str(self.retry_after).encode()))
        if self.reason == "deadline":
            headers.append(_EXPIRED)
        return headers

    async def send(self, send: Send, *, close: bool = False) -> None:
        """Send the answer through an ASGI ``send``; ``close`` asks to close the connection.

        The two messages go out shielded (for at most :data:`SEND_LIMIT` seconds): the guard
        may interrupt the request for the same reason while an exception handler sends this
        answer (a deadline that the handler's scope and the guard see at once), and a response
        cut between its start and its body is worse than none (hypercorn on trio even fails
        the connection).
        """
        headers = self.headers()
        if close:
            headers.append((b"connection", b"close"))
        with anyio.move_on_after(SEND_LIMIT, shield=True):
            start = {"type": "http.response.start", "status": self.status, "headers": headers}
            await send(start)
            await send({"type": "http.response.body", "body": self.body()})

    async def __call__(self, scope: Scope, receive: Any, send: Send) -> None:
        if self.status == 499:
            log_gone(scope)
        await self.send(send)


def answer_for_reason(reason: CancelReason) -> HTTPAnswer:
    """Return the answer to work stopped for ``reason`` (a linked reason answers as its root)."""
    root = reason.root
    status = STATUS.get(root.kind, 409)
    return HTTPAnswer(status, root.kind.value, root.message, root.source, _RETRY_AFTER.get(status))


def answer_for(
    exc: BaseException, *, busy_status: Literal[409, 429] = 409, busy_retry_after: float = 1.0
) -> HTTPAnswer | None:
    """Return the answer to a cancelkit exception, or ``None`` for any other exception."""
    if isinstance(exc, OperationCancelled):
        return answer_for_reason(exc.reason)
    if isinstance(exc, SlotBusy):
        return HTTPAnswer(busy_status, "busy", str(exc), None, max(1, round(busy_retry_after)))
    if isinstance(exc, RegistryFull):
        return HTTPAnswer(503, "full", str(exc), None, 1)
    if isinstance(exc, OperationExists):
        return HTTPAnswer(409, "exists", str(exc))
    if isinstance(exc, BackendUnavailable):
        return answer_unavailable(exc)
    return None


def answer_unavailable(exc: BackendUnavailable) -> HTTPAnswer:
    """The ``503`` for a backend or status store that cannot be reached (Redis down)."""
    return HTTPAnswer(503, "unavailable", str(exc), None, 1)


def client(scope: Scope) -> str:
    """The client's ``host:port`` for a log line, ``-`` when unknown."""
    peer = scope.get("client")
    if peer:
        return f"{peer[0]}:{peer[1]}"
    return "-"


def _request_line(scope: Scope) -> str:
    return f'{client(scope)} "{scope.get("method", "")} {scope.get("path", "")}"'


def log_gone(scope: Scope) -> None:
    """Write the one ``499 client disconnected`` line of this request (later calls: nothing)."""
    if scope.get(_LOGGED_KEY):
        return
    scope[_LOGGED_KEY] = True
    logger.info("%s 499 client disconnected", _request_line(scope))


def log_ended(scope: Scope, reason: CancelReason, *, cut: bool) -> None:
    """Log an interrupted request that was answered (``ended``) or left incomplete (``cut``)."""
    logger.info("%s %s: %s", _request_line(scope), "cut short" if cut else "ended", reason)


#: ``(request, exc) -> an ASGI application that sends the answer`` (an :class:`HTTPAnswer`).
Handler = Callable[[Any, Exception], Awaitable[Callable[..., Awaitable[None]]]]


def exception_handlers(
    *, busy_status: Literal[409, 429] = 409, busy_retry_after: float = 1.0
) -> dict[type[Exception], Handler]:
    """Return exception handlers that answer cancelkit's exceptions from the one table.

    For Starlette (``Starlette(exception_handlers=cancelkit.exception_handlers())``); FastAPI
    applications get the same handlers from :func:`cancelkit.fastapi.install`. Each handler
    takes ``(request, exc)`` and returns an ASGI application that sends the answer.

    Args:
        busy_status: ``409`` or ``429`` for a claim refused by the ``reject`` policy.
        busy_retry_after: seconds for that answer's ``Retry-After`` (at least 1).

    Raises:
        ValueError: for a ``busy_status`` other than 409 or 429.

    .. versionadded:: 0.1
    """
    if busy_status not in (409, 429):
        raise ValueError(f"busy_status must be 409 or 429, not {busy_status!r}")

    async def handler(request: Any, exc: Exception) -> HTTPAnswer:
        answer = answer_for(exc, busy_status=busy_status, busy_retry_after=busy_retry_after)
        assert answer is not None  # registered for cancelkit's exceptions only
        return answer

    return {
        OperationCancelled: handler,
        SlotBusy: handler,
        RegistryFull: handler,
        OperationExists: handler,
        BackendUnavailable: handler,
    }
