"""TokenTransport: outgoing httpx requests that follow the current cancellation token."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, final

import anyio.lowlevel
import httpx

from .. import _frames, _loop
from .._deadline import EXPIRED_HEADER, HEADER, RETURN_MS, header_value
from .._exceptions import OperationCancelled
from .._token import CancellationToken

__all__ = ["TokenTransport"]

_INF = math.inf
_HEADER = HEADER.encode()
_HEADERS_WRITTEN = "send_request_headers.started"  # httpcore's trace event (HTTP/1.1 and 2)
# A 504 marked Deadline-Expired answers a deadline this hop sent: the next hop's deadline is
# ours less RETURN_MS, floored (and later by the time the request took to get there), so ours
# is less than RETURN_MS + 1 ms away when the answer arrives (+ 2 ms: slack). Further away,
# the next hop gave up on a limit of its own: its answer is passed on as it is.
_OURS = (RETURN_MS + 2) / 1000

T = TypeVar("T")
Trace = Callable[[str, dict[str, Any]], Awaitable[None]]


def _trace(deadline: float, inner: Trace | None) -> Trace:
    """An httpcore ``trace`` extension that writes the header's value as the headers go out.

    Once it has, it takes itself out of the request's extensions (a dict of the transport's
    own, which httpcore reads at each step): httpcore then skips tracing the steps that follow
    (a third of the transport's cost), or calls the caller's own ``trace`` directly.
    """

    async def trace(event: str, info: dict[str, Any]) -> None:
        if event.endswith(_HEADERS_WRITTEN):
            request = info["request"]
            headers = request.headers  # httpcore's list of (name, value) pairs
            value = header_value(deadline - time.monotonic()).encode()
            for i, (name, _) in enumerate(headers):
                if name == _HEADER:
                    headers[i] = (name, value)
            if inner is None:
                request.extensions.pop("trace", None)
            else:
                request.extensions["trace"] = inner
        if inner is not None:
            await inner(event, info)

    return trace


@final
class TokenTransport(httpx.AsyncBaseTransport):
    """An httpx transport whose requests follow :func:`~cancelkit.current_token`.

    ``httpx.AsyncClient(transport=TokenTransport())``: inside a token's scope (a request under
    :class:`~cancelkit.CancelOnDisconnect`, a ``latest_only`` or ``tracked`` endpoint,
    ``token.scope()``), each request the client sends

    - carries the time left of the token's deadline as ``Request-Timeout-Ms`` (whole
      milliseconds less one for the answer's way back, computed as the request's headers are
      written: after the pool gave it a connection), so that the next hop gives up just
      before this one does; a token without a deadline sends no header;
    - is never sent when the token is cancelled already;
    - is aborted when the token is cancelled (or its deadline passes) while it waits for the
      response or reads its body, streaming too: its connection is closed, so the next server
      sees its client go away and stops its handler.

    An aborted request raises :exc:`~cancelkit.OperationCancelled` with the token's reason
    (inside an interrupting scope of the same token, that scope's interruption arrives
    first). A ``504`` marked ``Deadline-Expired`` that answers the deadline this request
    carried is this hop's deadline too: the transport waits for it (it is then at most 6 ms
    away: the 4 ms kept for the answer's way back, 2 of slack) and raises
    :exc:`~cancelkit.OperationCancelled` with reason ``deadline``, so that this hop answers
    ``504`` in turn instead of an error. Outside any token, requests pass through untouched.

    Args:
        transport: the transport that sends the requests; by default an
            :class:`httpx.AsyncHTTPTransport`. Give it the options you would give the client
            (``limits``, ``http2``, ``verify``, ``retries``...): a client given a transport
            ignores its own.

    .. versionadded:: 0.1
    """

    __slots__ = ("_transport",)

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None) -> None:
        if transport is None:
            transport = httpx.AsyncHTTPTransport()
        elif not isinstance(transport, httpx.AsyncBaseTransport):
            raise TypeError(f"transport must be an httpx transport, not {type(transport).__name__}")
        self._transport = transport

    @property
    def transport(self) -> httpx.AsyncBaseTransport:
        """The transport that sends the requests."""
        return self._transport

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` under the current token (see the class)."""
        frame = _frames.current.get()
        if frame is None:
            return await self._transport.handle_async_request(request)
        token = frame.token
        reason = token.reason
        if reason is not None:
            raise OperationCancelled(reason)
        deadline = token.deadline
        if deadline < _INF:
            request.headers[HEADER] = header_value(deadline - time.monotonic())
            extensions = request.extensions
            request.extensions = {**extensions, "trace": _trace(deadline, extensions.get("trace"))}
        if frame.covers(_loop.running_task()):
            # The token's own scope interrupts this task: a cancel ends every await of the
            # request (httpcore then closes its connection), with no abort of ours.
            abort = None
            response = await self._transport.handle_async_request(request)
        else:
            abort = _Abort(token)
            try:
                response = await abort.run(self._transport.handle_async_request(request))
            except BaseException:
                abort.handle.unregister()
                raise
        if (
            response.status_code == 504
            and EXPIRED_HEADER in response.headers
            and deadline - time.monotonic() <= _OURS
        ):  # the next hop's answer to our deadline: it is (nearly) ours too
            if abort is not None:
                abort.handle.unregister()
            await response.aclose()
            reason = await token.wait()
            # An interruption of this request by the same deadline comes first, if there is
            # one: the request then ends by it (its guard answers), not by an exception.
            await anyio.lowlevel.checkpoint()
            raise OperationCancelled(reason)
        if abort is not None:
            response.stream = _TokenStream(response.stream, abort)
        return response

    async def aclose(self) -> None:
        """Close the transport it wraps."""
        await self._transport.aclose()

    def __repr__(self) -> str:
        return f"<TokenTransport transport={self._transport!r}>"


@final
class _Abort:
    """One outgoing request's link to its token: a cancel cancels the step in progress.

    Each step (waiting for the response, reading a chunk of its body) runs in a cancel scope
    of its own, without a deadline: a token's deadline cancels the token on time wherever
    ``current_token()`` is set (its scope's deadline, or the disconnect guard's timer), and
    the one callback registered here passes every cancel on. Scopes without a timer and one
    callback per request cost less than a token scope per step.
    """

    __slots__ = ("handle", "scope", "token")

    def __init__(self, token: CancellationToken) -> None:
        self.token = token
        self.scope: _loop.Scope | None = None
        self.handle = token.on_cancel(self._fire)

    def _fire(self, reason: object) -> None:
        scope = self.scope
        if scope is not None:
            scope.cancel()

    async def run(self, step: Awaitable[T]) -> T:
        """Await ``step``; raise :exc:`~cancelkit.OperationCancelled` if the token stops it."""
        scope: _loop.Scope = (
            (_loop.asyncio_scope or _loop.asyncio_scope_class())()
            if _loop.running_loop() is not None
            else sys.modules["trio"].CancelScope()
        )
        self.scope = scope
        try:
            with scope:
                if self.token.cancelled:  # between two steps
                    scope.cancel()
                return await step
        finally:
            self.scope = None
        reason = self.token.reason
        assert reason is not None  # only the callback cancels the scope
        raise OperationCancelled(reason)


@final
class _TokenStream(httpx.AsyncByteStream):
    """A response body whose reads are aborted when the token is cancelled.

    Its own async iterator (no async generator: none for the event loop's hooks to track).
    """

    __slots__ = ("_abort", "_chunks", "_stream")

    def __init__(self, stream: httpx.SyncByteStream | httpx.AsyncByteStream, abort: _Abort) -> None:
        assert isinstance(stream, httpx.AsyncByteStream)
        self._stream = stream
        self._abort = abort

    def __aiter__(self) -> _TokenStream:
        self._chunks = aiter(self._stream)
        return self

    def __anext__(self) -> Awaitable[bytes]:
        return self._abort.run(anext(self._chunks))

    async def aclose(self) -> None:
        self._abort.handle.unregister()
        await self._stream.aclose()
