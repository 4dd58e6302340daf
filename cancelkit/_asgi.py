"""Cancel on client disconnect: one reader of ``receive``, a per-request token, a middleware.

Pure ASGI and anyio: no web framework is imported here.
"""

from __future__ import annotations

import asyncio
import enum
import math
import re
import threading
import time
from collections.abc import Iterable, Mapping
from contextlib import suppress
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal, final

import anyio
import anyio.lowlevel

from . import _events, _loop
from ._deadline import parse_deadline
from ._exceptions import BackendUnavailable, OperationCancelled
from ._frames import InterruptFrame, interrupt_frame
from ._frames import current as _current
from ._http import (
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    answer_for_reason,
    answer_unavailable,
    log_ended,
    log_gone,
)
from ._reason import CancelKind, CancelReason
from ._receive import ReadAhead
from ._signal import CallbackHandle
from ._stopping import on_stop_signal
from ._token import CancellationToken, _check_timeout

__all__ = [
    "CancelOnDisconnect",
    "DisconnectGuard",
    "DisconnectMode",
    "DisconnectOutcome",
    "DisconnectStatistics",
    "request_token",
]

#: ``"interrupt"``: the handler's awaits are cancelled when the client leaves.
#: ``"signal"``: only the request's token is cancelled; the handler decides what to do.
DisconnectMode = Literal["interrupt", "signal"]

#: A path pattern: a string matches that path and everything below it (``"/api"`` matches
#: ``/api`` and ``/api/items`` but not ``/apix``); a compiled regular expression must match
#: the whole path.
PathPattern = str | re.Pattern[str]

#: The ASGI scope key under which the request's token is stored.
SCOPE_KEY = "cancelkit.token"
#: Where the FastAPI adapters put response headers the response must carry (an operation id)
#: even when the endpoint returns a response of its own (a ``StreamingResponse``).
ECHO_KEY = "cancelkit.echo"
#: Set (True) on a request CancelOnDisconnect leaves unguarded on purpose (include/exclude).
EXCLUDED_KEY = "cancelkit.excluded"
#: True in the lifespan CancelOnDisconnect passes on (the FastAPI adapters warn of no guard).
LIFESPAN_GUARDED: ContextVar[bool] = ContextVar("cancelkit.lifespan_guarded", default=False)

_MODES = ("interrupt", "signal")


def request_token(scope: Mapping[str, Any]) -> CancellationToken:
    """Return the cancellation token of the request that ``scope`` belongs to.

    Args:
        scope: the ASGI scope (``request.scope`` in Starlette and FastAPI).

    Returns:
        The token that :class:`CancelOnDisconnect` (or a :class:`DisconnectGuard`) created for
        this request.

    Raises:
        LookupError: if no disconnect guard runs this request (the middleware is not
            installed, or the path is excluded).

    .. versionadded:: 0.1
    """
    token = scope.get(SCOPE_KEY)
    if token is None:
        raise LookupError(
            "this request has no cancellation token: wrap the application in "
            "cancelkit.CancelOnDisconnect (and check that the path is not excluded)"
        )
    assert isinstance(token, CancellationToken)
    return token


@final
@dataclass(frozen=True, slots=True)
class DisconnectStatistics:
    """Counters of a :class:`CancelOnDisconnect` middleware, from its ``statistics()``.

    Attributes:
        requests: HTTP requests run under a guard (excluded paths are not counted).
        running: guarded requests running now.
        watchers: requests that needed a watcher task (the others finished before the event
            loop ran anything else, and cost no task).
        disconnects: requests whose client left before the response was complete.
        interrupted: requests ended by an interruption (client gone, shutdown, or their token
            cancelled otherwise) rather than by the handler returning.
        shutdown_cancelled: request tokens cancelled because the application shut down.

    .. versionadded:: 0.1
    """

    requests: int
    running: int
    watchers: int
    disconnects: int
    interrupted: int
    shutdown_cancelled: int


@final
@dataclass(frozen=True, slots=True)
class DisconnectOutcome:
    """How one guarded request went, as returned by :meth:`DisconnectGuard.run`.

    Attributes:
        watched: a watcher task waited on ``receive`` for this request.
        client_gone: the client left before the response was complete.
        interrupted: the request was ended by its token (the handler's awaits were interrupted,
            or it raised its token's :exc:`~cancelkit.OperationCancelled`), not by returning.
        reason: the token's reason, if it was cancelled.

    .. versionadded:: 0.1
    """

    watched: bool
    client_gone: bool
    interrupted: bool
    reason: CancelReason | None


_QUIET = DisconnectOutcome(watched=False, client_gone=False, interrupted=False, reason=None)


class _Response(enum.Enum):
    """Where the response of a guarded request stands."""

    PENDING = "pending"  # nothing sent yet
    STARTED = "responding"  # http.response.start sent, more to come
    COMPLETE = "response complete"  # the last body message was handed to the server
    GONE = "client gone"  # the client left before the response started
    CUT = "client gone mid-response"  # the client left after it started, before its end


_GONE = (_Response.GONE, _Response.CUT)


@final
class _WatcherBatch:
    """The guards started during one turn of an asyncio loop: one ``call_soon`` for them all.

    On the loop's next turn each guard whose request is still running gets its watcher task;
    the others (most trivial requests) never cost one.
    """

    __slots__ = ("guards", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.guards: list[DisconnectGuard] = []

    def add(self, guard: DisconnectGuard) -> None:
        if not self.guards:
            self.loop.call_soon(self._spawn)
        self.guards.append(guard)

    def _spawn(self) -> None:
        guards, self.guards = self.guards, []
        for guard in guards:
            guard._start_watcher(self.loop)


_batches = threading.local()  # .current: the _WatcherBatch of this thread's running loop


@final
class DisconnectGuard:
    """Run one HTTP request so that a client disconnect cancels its token at once.

    The guard is the only reader of the server's ``receive`` (through its read-ahead buffer).
    Request-body messages reach the application untouched and in order; ahead of the
    application the guard reads at most ``max_buffer`` bytes (then waits for the application
    to catch up), so a slow handler neither loses an upload nor makes the guard hold all of
    it. An ``http.disconnect`` before the response is complete, or an :exc:`OSError` from
    ``send``, cancels :attr:`token` with reason :attr:`CancelKind.CLIENT_DISCONNECTED`; a
    disconnect after the response completed (uvicorn reports one) cancels nothing.

    No watcher task is started for a request that completes before the event loop runs
    anything else; otherwise one task waits on ``receive`` for the rest of the response.

    In ``"interrupt"`` mode the application runs in a scope the token cancels: its awaits are
    cancelled, and :meth:`run` ends the exchange quietly: to a client that left, a 499 the
    server drops (one INFO line on the ``cancelkit`` logger); to a client still there, the
    answer of the token's reason (409, 503, 504: the same table as
    :func:`cancelkit.fastapi.install`) if the response had not started, else the response is
    left incomplete, so that the client can tell. In ``"signal"`` mode only the token is
    cancelled. Either way :func:`~cancelkit.current_token` returns the token inside the
    request, and an :exc:`~cancelkit.OperationCancelled` carrying this token's reason that
    escapes the application ends the request just as quietly. A cancellation that the guard
    did not cause (server shutdown cancelling the application) propagates.

    ``timeout`` and a caller's ``Request-Timeout-Ms`` set its deadline: see :doc:`/beyond`.

    Args:
        scope: the HTTP scope; the token is stored in it (see :func:`request_token`).
        receive: the server's ``receive``.
        send: the server's ``send``.
        mode: ``"interrupt"`` or ``"signal"``.
        max_buffer: how many request-body bytes may be read ahead of the application.
        token: the token to use (a new one by default; with a deadline, a child of it).
        timeout: this server's limit in seconds (a deadline header can only shorten it).

    Raises:
        ValueError: for a bad ``mode``, ``max_buffer`` or ``timeout``, or a non-HTTP scope.

    .. versionadded:: 0.1
    """

    __slots__ = (
        "_app_done",
        "_interrupt",
        "_interrupted",
        "_link",
        "_max_buffer",
        "_mode",
        "_on_asyncio",
        "_own_token",
        "_reader",
        "_receive",
        "_response",
        "_scope",
        "_send",
        "_watch_done",
        "_watch_scope",
        "token",
    )

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        mode: DisconnectMode = "interrupt",
        max_buffer: int = 65536,
        token: CancellationToken | None = None,
        timeout: float | None = None,
    ) -> None:
        #: The request's token.
        self.token = _request_token(scope, token, mode, max_buffer, timeout)
        self._scope = scope
        self._receive = receive
        self._send = send
        self._mode = mode
        self._max_buffer = max_buffer
        self._own_token = token is None
        self._reader: ReadAhead | None = None  # made on first use: most GETs never read
        self._response = _Response.PENDING
        self._interrupt: InterruptFrame | None = None
        self._link: CallbackHandle | None = None
        self._on_asyncio = False
        self._watch_scope: anyio.CancelScope | None = None
        self._watch_done: anyio.Event | None = None
        self._app_done = False
        self._interrupted = False

    @property
    def mode(self) -> DisconnectMode:
        """``"interrupt"`` or ``"signal"``."""
        return self._mode

    @property
    def client_gone(self) -> bool:
        """Whether the client left before the response was complete."""
        return self._response in _GONE

    @property
    def watching(self) -> bool:
        """Whether a watcher task has been waiting on ``receive`` for this request."""
        return self._watch_done is not None

    def outcome(self) -> DisconnectOutcome:
        """How the request went so far (final once :meth:`run` has returned or raised)."""
        watched = self._watch_done is not None
        gone = self._response in _GONE
        reason = self.token.reason
        if not (watched or gone or self._interrupted or reason is not None):
            return _QUIET  # most requests: no allocation
        return DisconnectOutcome(watched, gone, self._interrupted, reason)

    def cancel(self, reason: CancelReason) -> bool:
        """Cancel the token and, in ``"interrupt"`` mode, interrupt the application.

        Returns:
            True if this call cancelled the token (False: it already was).
        """
        cancelled = self.token.cancel(reason)
        if self._interrupt is not None:
            self._interrupt.interrupt()  # (not while a commit pins the request's scope)
        return cancelled

    # -- running the application -------------------------------------------------------------

    async def run(self, app: ASGIApp) -> DisconnectOutcome:
        """Run ``app`` for this request; return when it is done.

        Args:
            app: the ASGI application.

        Returns:
            How the request went.

        Raises:
            Exception: whatever the application raises, but an :exc:`~cancelkit.OperationCancelled`
                of this token and a :exc:`~cancelkit.BackendUnavailable` answered ``503``.
        """
        self._scope[SCOPE_KEY] = self.token
        loop = _loop.asyncio_loop()
        if loop is not None:
            # Deferred: a request that finishes before the loop runs anything else needs none.
            self._on_asyncio = True
            batch = getattr(_batches, "current", None)
            if batch is None or batch.loop is not loop:
                batch = _batches.current = _WatcherBatch(loop)
            batch.add(self)
        else:
            import trio  # only reached when running under trio, so it is installed

            trio.lowlevel.spawn_system_task(self._watch)
        try:
            try:
                await self._run_app(app)
            finally:
                self._stop_watcher()
                if self._watch_done is not None:
                    with anyio.CancelScope(shield=True):
                        await self._watch_done.wait()
        except OperationCancelled as exc:
            if exc.reason.root is not getattr(self.token.reason, "root", None):  # (or linked)
                raise
            await self._finish_interrupted()
        except BackendUnavailable as exc:  # 503 from the one table, if nothing was sent yet
            if self._response is not _Response.PENDING:
                raise
            await answer_unavailable(exc).send(self._send)
            self._response = _Response.COMPLETE
        return self.outcome()

    async def _run_app(self, app: ASGIApp) -> None:
        token = self.token
        if token.cancelled:  # nothing left of its deadline, a shutdown...: it never starts
            return await self._finish_interrupted()
        if self._mode == "interrupt" and not self._own_token:
            with token.move_on() as token_scope:  # a caller's token may carry a deadline
                await app(self._scope, self._app_receive, self._app_send)
            if token_scope.cancelled_caught:
                await self._finish_interrupted()
            return
        # The fast path: a bare cancel scope. The token is linked to it only once the request
        # yields to the event loop (see _watch); before that nobody else can run.
        scope = _loop.new_scope(self._on_asyncio) if self._mode == "interrupt" else None
        frame = interrupt_frame(token, scope)  # what a commit pins (never in signal mode)
        var = _current.set(frame)
        try:
            if scope is None:
                await app(self._scope, self._app_receive, self._app_send)
                return
            self._interrupt = frame
            with scope:
                await app(self._scope, self._app_receive, self._app_send)
        finally:
            frame.exit()
            _current.reset(var)
        if scope.cancelled_caught:
            await self._finish_interrupted()

    def _start_watcher(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._app_done:  # else the request finished before the loop's next turn
            loop.create_task(self._watch())

    def _stop_watcher(self) -> None:
        self._app_done = True
        self._interrupt = None
        if self._link is not None:
            self._link.unregister()
        if self._watch_scope is not None:
            self._watch_scope.cancel()

    async def _finish_interrupted(self) -> None:
        reason = self.token.reason
        assert reason is not None
        self._interrupted = True
        if self._response in _GONE:
            log_gone(self._scope)
            return
        if self._response is _Response.PENDING:
            try:
                await answer_for_reason(reason).send(self._send, close=True)
            except OSError:
                self._response = _Response.CUT  # (tried: no second answer)
                return
            self._response = _Response.COMPLETE  # a disconnect from now on is no news
        # A started response is left incomplete on purpose: the server closes the connection
        # without the final chunk, so the client sees it cut (a clean end: until_cancelled()).
        log_ended(self._scope, reason, cut=self._response is _Response.STARTED)

    # -- the client's side -----------------------------------------------------------------

    def _read_ahead(self) -> ReadAhead:
        reader = self._reader
        if reader is None:
            reader = self._reader = ReadAhead(
                self._receive, self._client_left, max_bytes=self._max_buffer
            )
        return reader

    def _client_left(self) -> None:
        if (response := self._response) is _Response.PENDING or response is _Response.STARTED:
            self._response = _Response.CUT if response is _Response.STARTED else _Response.GONE
            self.cancel(CancelReason(CancelKind.CLIENT_DISCONNECTED))

    async def _watch(self) -> None:
        if self._app_done:
            return  # the request finished before the watcher got to run
        done = self._watch_done = anyio.Event()
        if self._interrupt is not None and self._own_token:
            # The request yields: from now on anyone may cancel the token (shutdown, the
            # application itself, another thread), and that must interrupt the request.
            self._link = self.token.on_cancel(self._interrupt_app)
        try:
            with anyio.CancelScope() as self._watch_scope:
                if self.token.deadline < math.inf:
                    await _until_deadline(self._read_ahead(), self.token)
                await self._read_ahead().fill()
        finally:
            done.set()

    def _interrupt_app(self, reason: CancelReason) -> None:
        self._interrupt.interrupt()  # type: ignore[union-attr]  # unlinked before it is None

    async def _app_receive(self) -> Message:
        message = await self._read_ahead().receive()
        if message["type"] == "http.disconnect" and self._mode == "interrupt":
            await anyio.lowlevel.checkpoint_if_cancelled()  # not Starlette's ClientDisconnect
        return message

    async def _app_send(self, message: Message) -> None:
        if self._response in _GONE:
            return  # nobody is reading any more
        kind = message["type"]
        if kind == "http.response.start":
            self._response = _Response.STARTED
            if (echo := self._scope.get(ECHO_KEY)) is not None:
                message = _echoed(message, echo)
        elif kind == "http.response.pathsend" or (
            kind in ("http.response.body", "http.response.zerocopysend")
            and not message.get("more_body", False)
        ):
            self._response = _Response.COMPLETE
        try:
            await self._send(message)
        except OSError:
            self._read_ahead().disconnected = True
            self._response = _Response.STARTED  # not complete after all
            self._client_left()
            if self._mode == "interrupt":
                await anyio.lowlevel.checkpoint()  # the token's scope is cancelled: unwind
            raise

    def __repr__(self) -> str:
        state = "running" if self._response is _Response.PENDING else self._response.value
        return (
            f"<DisconnectGuard {self._mode} {self._scope.get('method', '')} "
            f"{self._scope.get('path', '')!r} {state} watching={self.watching}>"
        )


def _check(mode: str, max_buffer: int, timeout: float | None) -> float | None:
    """Check the options that the guard and the middleware share; return ``timeout``."""
    if mode not in _MODES:
        raise ValueError(f"mode must be 'interrupt' or 'signal', not {mode!r}")
    if max_buffer < 0:
        raise ValueError(f"max_buffer must be >= 0, not {max_buffer!r}")
    return None if timeout is None else _check_timeout(timeout)


def _request_token(
    scope: Scope,
    token: CancellationToken | None,
    mode: str,
    max_buffer: int,
    timeout: float | None,
) -> CancellationToken:
    """Check a guard's options; return the token its request runs under, with its deadline."""
    if mode not in _MODES or max_buffer < 0 or timeout is not None:  # (no call when usual)
        _check(mode, max_buffer, timeout)
    if scope.get("type") != "http":
        raise ValueError(f"a DisconnectGuard runs HTTP requests, not {scope.get('type')!r}")
    deadline = parse_deadline(scope.get("headers", ()), timeout)
    if deadline is None:  # most requests (a keyword argument alone costs a third more)
        return CancellationToken() if token is None else token
    return CancellationToken(timeout=deadline) if token is None else token.child(timeout=deadline)


async def _until_deadline(reader: ReadAhead, token: CancellationToken) -> None:
    """The watcher's wait until the token's deadline: then cancel the token (if still live).

    The deadline is checked wherever the token is looked at; this cancels it on time even if
    nothing looks, so that its callbacks (an interrupted handler, a relayed claim) run then.
    """
    deadline = anyio.current_time() + (token.deadline - time.monotonic())
    with anyio.CancelScope(deadline=deadline) as timer:
        await reader.fill()
    if timer.cancelled_caught:  # (a reason the token got first is kept)
        token.cancel(CancelReason(CancelKind.DEADLINE))


def _compile(patterns: Iterable[PathPattern], what: str) -> tuple[PathPattern, ...]:
    result = tuple(patterns)
    for pattern in result:
        if isinstance(pattern, str):
            if not pattern.startswith("/"):
                raise ValueError(f"{what} path {pattern!r} must start with '/'")
        elif not isinstance(pattern, re.Pattern):
            raise TypeError(f"{what} patterns are str or re.Pattern, not {type(pattern).__name__}")
    return result


def _matches(patterns: tuple[PathPattern, ...], path: str) -> bool:
    for pattern in patterns:
        if isinstance(pattern, str):
            if path.startswith(pattern) and (
                len(path) == len(pattern) or pattern.endswith("/") or path[len(pattern)] == "/"
            ):
                return True
        elif pattern.fullmatch(path):
            return True
    return False


@final
class CancelOnDisconnect:
    """ASGI middleware: cancel each request's token when its client disconnects.

    Wrap the application (``app = CancelOnDisconnect(app)``); every HTTP request then runs
    under a :class:`DisconnectGuard`. WebSocket connections pass through untouched. The
    lifespan protocol is passed through; when it reports ``lifespan.shutdown`` (and whenever
    :meth:`shutdown` is called) in-flight requests get ``shutdown_grace`` seconds to finish,
    then their tokens are cancelled with reason :attr:`CancelKind.SHUTDOWN`, and requests that
    arrive are answered ``503`` until that lifespan has ended; then it serves again (a later
    request comes from another server, or a test's client).

    Args:
        app: the ASGI application.
        mode: the default mode, ``"interrupt"`` or ``"signal"``.
        include: if given, only requests whose path matches one of these patterns are guarded.
        exclude: requests whose path matches one of these patterns are passed through untouched.
        modes: per-route modes, ``{pattern: mode}``; the first matching pattern wins.
        shutdown_grace: seconds in-flight requests get to finish at shutdown.
        max_buffer: request-body bytes that may be read ahead of the application.
        timeout: the most seconds a request may run (this server's own limit); a deadline
            header from the caller can only shorten it (see :class:`DisconnectGuard`).
            ``None``: only such a header limits a request.

    Raises:
        ValueError: for an unknown mode, a negative number, or a path not starting with ``/``.
        TypeError: for a pattern that is neither ``str`` nor ``re.Pattern``.

    .. versionadded:: 0.1
    """

    __slots__ = (
        "_disconnects",
        "_exclude",
        "_idle",
        "_include",
        "_interrupted",
        "_max_buffer",
        "_mode",
        "_modes",
        "_requests",
        "_running",
        "_shutdown_cancelled",
        "_shutdown_reason",
        "_stopping",
        "_timeout",
        "_watchers",
        "app",
        "shutdown_grace",
    )

    def __init__(
        self,
        app: ASGIApp,
        *,
        mode: DisconnectMode = "interrupt",
        include: Iterable[PathPattern] | None = None,
        exclude: Iterable[PathPattern] = (),
        modes: Mapping[PathPattern, DisconnectMode] | None = None,
        shutdown_grace: float = 5.0,
        max_buffer: int = 65536,
        timeout: float | None = None,
    ) -> None:
        self._timeout = _check(mode, max_buffer, timeout)
        if shutdown_grace < 0:
            raise ValueError(f"shutdown_grace must be >= 0, not {shutdown_grace!r}")
        route_modes = dict(modes or {})
        for route_mode in route_modes.values():
            if route_mode not in _MODES:
                raise ValueError(f"mode must be 'interrupt' or 'signal', not {route_mode!r}")
        #: The wrapped application.
        self.app = app
        #: Seconds in-flight requests get to finish at shutdown.
        self.shutdown_grace = shutdown_grace
        self._mode: DisconnectMode = mode
        self._include = None if include is None else _compile(include, "include")
        self._exclude = _compile(exclude, "exclude")
        self._modes = tuple(zip(_compile(route_modes, "modes"), route_modes.values(), strict=True))
        self._max_buffer = max_buffer
        self._running: set[DisconnectGuard] = set()
        self._idle: anyio.Event | None = None
        self._shutdown_reason: CancelReason | None = None
        self._stopping = 0  # lifespans shutting down now (servers sharing this middleware)
        self._requests = 0
        self._watchers = 0
        self._disconnects = 0
        self._interrupted = 0
        self._shutdown_cancelled = 0

    def mode_for(self, path: str) -> DisconnectMode | None:
        """Return the mode a request for ``path`` runs in, or ``None`` if it is not guarded."""
        if self._include is not None and not _matches(self._include, path):
            return None
        if self._exclude and _matches(self._exclude, path):
            return None
        for pattern, mode in self._modes:
            if _matches((pattern,), path):
                return mode
        return self._mode

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the application for one ASGI connection."""
        kind = scope["type"]
        if kind == "http":
            mode = self.mode_for(scope["path"])
            if mode is None or SCOPE_KEY in scope:
                if mode is None:
                    scope[EXCLUDED_KEY] = True  # (the FastAPI adapters warn of no guard)
                await self.app(scope, receive, send)
                return
            guard = DisconnectGuard(
                scope, receive, send, mode=mode, max_buffer=self._max_buffer, timeout=self._timeout
            )
            if self._shutdown_reason is not None:
                guard.token.cancel(self._shutdown_reason)  # the scope starts cancelled
            running = self._running
            running.add(guard)
            self._requests += 1
            outcome: DisconnectOutcome | None = None
            started = None
            if _events.listeners:
                started = time.monotonic()
                _events.requests[guard.token] = scope
            try:
                outcome = await guard.run(self.app)
            finally:
                running.discard(guard)
                if outcome is None:
                    outcome = guard.outcome()
                if outcome is not _QUIET:
                    self._count(outcome)
                if started is not None:  # a listener listened when the request began
                    del _events.requests[guard.token]
                    if outcome is not _QUIET and _events.listeners:
                        route = _events.route_of(scope)
                        _events.report("request", guard.token, route, started=started)
                if not running and self._idle is not None:
                    self._idle.set()
            if guard._response is _Response.GONE:  # after the report: it may end the span
                await _answer_gone(send)  # an outer middleware still awaits a response
        elif kind == "lifespan":
            guarded = LIFESPAN_GUARDED.set(True)
            stopping = [False]  # whether this lifespan is shutting the middleware down
            try:
                await self.app(scope, self._lifespan_receive(receive, stopping), send)
            finally:
                LIFESPAN_GUARDED.reset(guarded)
                # Ended (its shutdown raising too), and the server that sent it is gone: a
                # later request comes from another (httpx.ASGITransport sends no lifespan),
                # unless another server sharing this middleware is shutting down still.
                self._stopping -= stopping[0]
                if not self._stopping:
                    self._shutdown_reason = None
        else:
            await self.app(scope, receive, send)

    def _count(self, outcome: DisconnectOutcome) -> None:
        self._watchers += outcome.watched
        self._disconnects += outcome.client_gone
        self._interrupted += outcome.interrupted

    def _lifespan_receive(self, receive: Receive, stopping: list[bool]) -> Receive:
        serving = False

        async def wrapped() -> Message:
            nonlocal serving
            if serving:  # the next message is the shutdown: hear a stop signal before it
                message = await _receive_or_stop(self, receive)
            else:
                message = await receive()
            if message["type"] == "lifespan.startup":  # served (again): accept requests
                if not self._stopping:
                    self._shutdown_reason = None
                serving = True
            elif message["type"] == "lifespan.shutdown":
                serving = False
                if not stopping[0]:
                    stopping[0] = True
                    self._stopping += 1
                await self.shutdown()
            return message

        return wrapped

    async def shutdown(self, grace: float | None = None) -> None:
        """Wind down the requests in flight: wait for them, then cancel their tokens.

        Runs when the process gets SIGTERM or SIGINT while the lifespan is up (in the main
        thread: uvicorn, gunicorn's uvicorn workers; hypercorn's worker processes hear of a
        stop through an event, not a signal), and on ``lifespan.shutdown``.

        A request that arrives from now on is answered ``503`` (its token starts cancelled
        with reason :attr:`CancelKind.SHUTDOWN`). Waits up to ``grace`` seconds for in-flight
        requests to finish, then cancels the tokens of those still running, and waits up to
        ``grace`` seconds more for them to end.
        Interrupted handlers end at once; a streaming response is cut short (left incomplete,
        so the client can tell) instead of holding the server. Servers served without a
        lifespan (``--lifespan off``) need a call from their shutdown path, see the
        documentation.

        Args:
            grace: seconds; :attr:`shutdown_grace` by default.
        """
        if grace is None:
            grace = self.shutdown_grace
        if self._shutdown_reason is None:  # a request arriving from now on is answered 503
            self._shutdown_reason = CancelReason(CancelKind.SHUTDOWN)
        await self._wait_idle(grace)
        for guard in tuple(self._running):
            if guard.cancel(self._shutdown_reason):
                self._shutdown_cancelled += 1
        await self._wait_idle(grace)

    async def _wait_idle(self, grace: float) -> None:
        with anyio.move_on_after(grace):
            while self._running:
                if self._idle is None:  # shared by every caller waiting at the same time
                    self._idle = anyio.Event()
                idle = self._idle
                await idle.wait()
                if self._idle is idle:
                    self._idle = None

    def statistics(self) -> DisconnectStatistics:
        """Return the middleware's counters."""
        return DisconnectStatistics(
            requests=self._requests,
            running=len(self._running),
            watchers=self._watchers,
            disconnects=self._disconnects,
            interrupted=self._interrupted,
            shutdown_cancelled=self._shutdown_cancelled,
        )

    def __repr__(self) -> str:
        state = " shutting down" if self._shutdown_reason is not None else ""
        return (
            f"<CancelOnDisconnect mode={self._mode!r} running={len(self._running)}"
            f"{state} app={self.app!r}>"
        )


def _echoed(start: Message, echo: list[tuple[bytes, bytes]]) -> Message:
    """``http.response.start`` with the ``echo`` headers it does not carry yet."""
    headers = list(start.get("headers", ()))
    names = {name.lower() for name, _ in headers}
    headers += [(name, value) for name, value in echo if name not in names]
    return {**start, "headers": headers}


async def _answer_gone(send: Send) -> None:
    """Answer ``499`` to a client that left before the response started (the middleware).

    Nobody reads it, but an outer middleware that relays the response (Starlette's
    ``BaseHTTPMiddleware``) raises "No response returned" for every disconnect without one.
    """
    with suppress(OSError):  # the server may refuse to write to a closed connection
        await answer_for_reason(CancelReason(CancelKind.CLIENT_DISCONNECTED)).send(send, close=True)


async def _receive_or_stop(middleware: CancelOnDisconnect, receive: Receive) -> Message:
    """Wait for the lifespan's next message; on a stop signal meanwhile, begin the shutdown.

    uvicorn and hypercorn send ``lifespan.shutdown`` only once every request has ended: the
    grace period would wait for the server, and the server for the requests.
    """
    stop = anyio.Event()
    unhook = on_stop_signal(stop.set)
    received: list[Message] = []
    try:
        async with anyio.create_task_group() as tg:

            async def shut_down_on_stop() -> None:
                await stop.wait()
                await middleware.shutdown()

            tg.start_soon(shut_down_on_stop)
            received.append(await receive())
            if not stop.is_set():  # else the shutdown under way ends first
                tg.cancel_scope.cancel()
    finally:
        unhook()
    return received[0]
