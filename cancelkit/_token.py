"""CancellationToken: a thread-safe, linkable cancellation signal with deadlines."""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextvars import ContextVar
from contextvars import Token as _VarToken
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar, final

import anyio
import anyio.lowlevel
from anyio.lowlevel import EventLoopToken

from ._reason import CancelKind, CancelReason, OperationCancelled

__all__ = [
    "CallbackHandle",
    "CancellationToken",
    "TokenScope",
    "TokenStatistics",
    "current_token",
]

logger = logging.getLogger("cancelkit")

T = TypeVar("T")
_INF = math.inf
_current: ContextVar[CancellationToken | None] = ContextVar("cancelkit_token", default=None)


def current_token() -> CancellationToken | None:
    """Return the token of the work running in this context, if any.

    Set inside :meth:`CancellationToken.scope` and :meth:`CancellationToken.move_on` (and so
    inside everything built on them: tracked operations, latest-only claims, requests under
    the disconnect middleware). Context variables follow work into
    :func:`anyio.to_thread.run_sync`, so a sync function running in a worker thread sees the
    token of the request that called it.

    Returns:
        The innermost active token, or ``None`` outside any.

    .. versionadded:: 0.1
    """
    return _current.get()


def _this_loop() -> EventLoopToken | None:
    try:
        return anyio.lowlevel.current_token()
    except anyio.NoEventLoopError:
        return None


_NO_LINKS: tuple[()] = ()


def _check_timeout(timeout: object) -> float:
    if not isinstance(timeout, int | float) or isinstance(timeout, bool):
        raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout must be a number of seconds >= 0, not {timeout!r}")
    return float(timeout)


@final
class CallbackHandle:
    """A registered :meth:`CancellationToken.on_cancel` callback.

    .. versionadded:: 0.1
    """

    __slots__ = ("_backend", "_callback", "_native", "_thread", "_token")

    def __init__(
        self,
        token: CancellationToken | None,
        callback: Callable[[CancelReason], object] | None,
        *,
        anywhere: bool = False,
    ) -> None:
        self._token = token
        self._callback = callback
        self._thread = threading.get_ident()
        loop = None if anywhere else _this_loop()
        # kept as its two parts: an EventLoopToken per handle costs memory
        self._backend = None if loop is None else loop.backend_class
        self._native = None if loop is None else loop.native_token

    @property
    def registered(self) -> bool:
        """Whether the callback is still waiting to run."""
        return self._callback is not None

    def unregister(self) -> bool:
        """Remove the callback so that it will not run.

        Safe to call more than once and from any thread.

        Returns:
            True if this call prevented the callback from running, False if it had already run,
            was already scheduled to run in progress, or was removed before.
        """
        token = self._token
        if token is None:
            return False
        return token._take(self) is not None

    def __repr__(self) -> str:
        state = "registered" if self._callback is not None else "done"
        return f"<CallbackHandle {state} callback={self._callback!r}>"


class _ChildRef(weakref.ref["CancellationToken"]):
    """The link from a parent to a child: weak, so finished children cost the parent nothing."""

    __slots__ = ("handle", "parent")

    handle: CallbackHandle | None
    parent: CancellationToken

    def propagate(self, reason: CancelReason) -> None:
        child = self()
        if child is not None:
            child._cancel(CancelReason(CancelKind.PARENT, origin=reason), self.parent)


def _child_collected(ref: weakref.ref[CancellationToken]) -> None:
    assert isinstance(ref, _ChildRef)
    if ref.handle is not None:
        ref.handle.unregister()


@final
@dataclass(frozen=True, slots=True)
class TokenStatistics:
    """A snapshot of a token's state, from :meth:`CancellationToken.statistics`.

    Attributes:
        cancelled: whether the token is cancelled.
        callbacks: callbacks registered and waiting (links from children included).
        parents: tokens this one is still linked to.
        callback_errors: exceptions raised by its callbacks so far.

    .. versionadded:: 0.1
    """

    cancelled: bool
    callbacks: int
    parents: int
    callback_errors: int


@final
class CancellationToken:
    """A cancellation signal that work can check, wait for, and be interrupted by.

    A token starts live and is cancelled at most once; the first reason wins. It can be
    cancelled from any thread, carries an optional deadline, can follow other tokens
    (:meth:`child`, :meth:`any_of`), and runs a block of async code that is interrupted when it
    is cancelled (:meth:`scope`, :meth:`move_on`) on asyncio and trio alike.

    Args:
        timeout: seconds from now after which the token counts as cancelled with reason
            :attr:`CancelKind.DEADLINE`. The deadline is enforced wherever the token is used:
            :meth:`scope`, :meth:`move_on` and :meth:`wait` end on time, and :attr:`cancelled`,
            :attr:`reason` and :meth:`raise_if_cancelled` see it as soon as it has passed.
        name: a label for ``repr()`` and logs.

    Raises:
        ValueError: if ``timeout`` is negative or not a number.

    .. versionadded:: 0.1
    """

    __slots__ = (
        "__weakref__",
        "_callbacks",
        "_cancelled_by",
        "_deadline",
        "_effective_deadline",
        "_errors",
        "_links",
        "_lock",
        "_name",
        "_parents_deadline",
        "_reason",
    )

    def __init__(self, *, timeout: float | None = None, name: str | None = None) -> None:
        deadline = _INF if timeout is None else time.monotonic() + _check_timeout(timeout)
        label: object = name
        if label is not None and not isinstance(label, str):
            raise TypeError(f"name must be a str or None, not {type(label).__name__}")
        # Reentrant: a child collected by the GC while this thread holds the lock (any
        # allocation can trigger it) unregisters its link, which takes the lock again.
        self._lock = threading.RLock()
        self._reason: CancelReason | None = None
        self._callbacks: dict[CallbackHandle, None] = {}
        self._links: list[CallbackHandle] | tuple[()] = _NO_LINKS
        self._deadline = deadline
        self._parents_deadline = _INF
        self._effective_deadline = deadline
        self._cancelled_by: CancellationToken | None = None
        self._errors: list[Exception] | None = None
        self._name = name

    # -- linking -------------------------------------------------------------------------

    @classmethod
    def any_of(
        cls, *tokens: CancellationToken, timeout: float | None = None, name: str | None = None
    ) -> CancellationToken:
        """Return a new token that is cancelled as soon as any of ``tokens`` is.

        Its reason is :attr:`CancelKind.PARENT` with the input's reason as
        :attr:`CancelReason.origin`, and :attr:`cancelled_by` names the input that fired. If an
        input is already cancelled, the new token starts cancelled. The links are weak and are
        released when the new token is cancelled or garbage-collected, so a long-lived input
        does not grow with the short-lived tokens linked to it.

        Args:
            *tokens: the tokens to follow.
            timeout: an optional deadline of the new token's own, as for the constructor.
            name: a label for ``repr()``.

        Raises:
            TypeError: if an input is not a :class:`CancellationToken`.
        """
        for token in tokens:
            if not isinstance(token, CancellationToken):
                raise TypeError(
                    f"any_of() takes CancellationToken objects, not {type(token).__name__}"
                )
        child = cls(timeout=timeout, name=name)
        links: list[CallbackHandle] = []
        for parent in tokens:
            parent._poll()
            ref = _ChildRef(child, _child_collected)
            ref.handle = None
            ref.parent = parent
            # A link runs in whatever thread cancels the parent, never via an event loop: the
            # child's state must change at once (its own callbacks keep their loop affinity).
            handle = parent._register(ref.propagate, anywhere=True)
            if child._reason is not None:  # this parent had already fired: done
                break
            ref.handle = handle
            links.append(handle)
            child._links = links
            child._parents_deadline = min(child._parents_deadline, parent._effective_deadline)
        child._effective_deadline = min(child._deadline, child._parents_deadline)
        return child

    def child(self, *, timeout: float | None = None, name: str | None = None) -> CancellationToken:
        """Return a new token that is cancelled when this one is (see :meth:`any_of`)."""
        return CancellationToken.any_of(self, timeout=timeout, name=name)

    # -- state -----------------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """Whether the token is cancelled (a passed deadline counts)."""
        self._poll()
        return self._reason is not None

    @property
    def reason(self) -> CancelReason | None:
        """Why the token was cancelled, or ``None`` while it is live."""
        self._poll()
        return self._reason

    @property
    def cancelled_by(self) -> CancellationToken | None:
        """The linked token whose cancellation cancelled this one, if that is what happened."""
        return self._cancelled_by

    @property
    def deadline(self) -> float:
        """The effective deadline in :func:`time.monotonic` seconds (``math.inf`` if none).

        It is the earliest of this token's own deadline and those of the tokens it follows.
        """
        return self._effective_deadline

    @property
    def name(self) -> str | None:
        """The label given at creation."""
        return self._name

    @property
    def callback_errors(self) -> tuple[Exception, ...]:
        """Exceptions raised by :meth:`on_cancel` callbacks; each is also logged."""
        with self._lock:
            return tuple(self._errors or ())

    def raise_if_cancelled(self) -> None:
        """Raise :exc:`OperationCancelled` if the token is cancelled; works in any thread.

        Raises:
            OperationCancelled: carrying :attr:`reason`.
        """
        reason = self.reason
        if reason is not None:
            raise OperationCancelled(reason)

    # -- cancelling ------------------------------------------------------------------------

    def cancel(self, reason: CancelReason | None = None) -> bool:
        """Cancel the token. Idempotent, and safe to call from any thread.

        Callbacks registered in an event loop run in that loop (a call from another thread
        wakes it); others run in the calling thread before this returns. An exception from a
        callback does not stop the others: it is logged on the ``cancelkit`` logger and kept in
        :attr:`callback_errors`.

        Args:
            reason: why; :attr:`CancelKind.REQUESTED` when omitted.

        Returns:
            True for the call that cancelled the token; False if it was already cancelled
            (the first reason is kept).

        Raises:
            TypeError: if ``reason`` is not a :class:`CancelReason`.
        """
        if reason is None:
            reason = CancelReason(CancelKind.REQUESTED)
        elif not isinstance(reason, CancelReason):
            raise TypeError(f"reason must be a CancelReason or None, not {type(reason).__name__}")
        return self._cancel(reason, None)

    def _cancel(self, reason: CancelReason, by: CancellationToken | None) -> bool:
        with self._lock:
            if self._reason is not None:
                return False
            self._reason = reason
            self._cancelled_by = by
            handles = self._callbacks
            self._callbacks = {}
        self._detach()
        me = threading.get_ident()
        errors: list[tuple[Callable[[CancelReason], object], Exception]] = []
        for handle in handles:
            backend = handle._backend
            if backend is not None and handle._thread != me:
                try:
                    backend.run_sync_soon(self._run_later, (handle, reason), handle._native)
                except anyio.RunFinishedError:
                    self._take(handle)  # nobody is left in that loop to wake
                continue
            callback = self._take(handle)
            if callback is not None:
                try:
                    callback(reason)
                except Exception as exc:
                    errors.append((callback, exc))
        if errors:
            self._record(errors)
        return True

    def _detach(self) -> None:
        """Release the links to the tokens this one follows (done with them: no more relays)."""
        with self._lock:
            links = self._links
            self._links = _NO_LINKS
        for link in links:
            link.unregister()

    def _run_later(self, handle: CallbackHandle, reason: CancelReason) -> None:
        callback = self._take(handle)
        if callback is not None:
            try:
                callback(reason)
            except Exception as exc:
                self._record([(callback, exc)])

    def _take(self, handle: CallbackHandle) -> Callable[[CancelReason], object] | None:
        with self._lock:
            callback = handle._callback
            handle._callback = None
            handle._token = None
            self._callbacks.pop(handle, None)
            if not self._callbacks:
                self._callbacks = {}  # a dict never shrinks: let a drained one go
        return callback

    def _record(self, errors: list[tuple[Callable[[CancelReason], object], Exception]]) -> None:
        with self._lock:
            if self._errors is None:
                self._errors = []
            self._errors.extend(exc for _, exc in errors)
        for callback, exc in errors:
            logger.error("on_cancel callback %r of %r failed", callback, self, exc_info=exc)

    def _expire(self, now: float) -> None:
        """Cancel for a passed deadline: the earliest one in this token's ancestry wins."""
        deadline = self._effective_deadline
        if self._reason is not None or deadline == _INF or deadline > now:
            return
        if self._deadline <= self._parents_deadline:
            self._cancel(CancelReason(CancelKind.DEADLINE, source=self._name), None)
            return
        for link in tuple(self._links):
            parent = link._token
            if parent is not None:
                parent._expire(now)
        if self._deadline <= now:  # no-op if a parent's deadline already cancelled it
            self._cancel(CancelReason(CancelKind.DEADLINE, source=self._name), None)

    def _poll(self) -> None:
        if self._reason is None and self._effective_deadline < _INF:
            self._expire(time.monotonic())

    # -- callbacks -------------------------------------------------------------------------

    def on_cancel(self, callback: Callable[[CancelReason], object]) -> CallbackHandle:
        """Call ``callback(reason)`` when the token is cancelled; at once if it already is.

        A callback registered inside an event loop runs in that loop's thread even when
        :meth:`cancel` is called from another thread; one registered outside any event loop
        runs in the thread that cancels. Keep callbacks short and non-blocking.

        Args:
            callback: called with the :class:`CancelReason`.

        Returns:
            A handle whose :meth:`~CallbackHandle.unregister` removes the callback.

        Raises:
            TypeError: if ``callback`` is not callable.
        """
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        return self._register(callback, anywhere=False)

    def _register(
        self, callback: Callable[[CancelReason], object], *, anywhere: bool
    ) -> CallbackHandle:
        self._poll()
        handle = CallbackHandle(self, callback, anywhere=anywhere)
        with self._lock:
            reason = self._reason
            if reason is None:
                self._callbacks[handle] = None
                return handle
            handle._callback = None
            handle._token = None
        try:
            callback(reason)
        except Exception as exc:
            self._record([(callback, exc)])
        return handle

    # -- waiting ---------------------------------------------------------------------------

    async def wait(self) -> CancelReason:
        """Wait until the token is cancelled (or its deadline passes).

        Returns:
            The reason.
        """
        self._poll()
        reason = self._reason
        if reason is not None:
            await anyio.lowlevel.checkpoint()
            return reason
        event = anyio.Event()
        handle = self.on_cancel(lambda _: event.set())
        try:
            with anyio.CancelScope(deadline=self._loop_deadline()) as scope:
                await event.wait()
            if scope.cancelled_caught:
                self._expire(max(time.monotonic(), self._effective_deadline))
        finally:
            handle.unregister()
        assert self._reason is not None
        return self._reason

    def wait_blocking(self, timeout: float | None = None) -> bool:
        """Block the calling thread until the token is cancelled or ``timeout`` passes.

        For worker threads (a sync endpoint in a threadpool, :func:`anyio.to_thread.run_sync`).

        Args:
            timeout: the most seconds to wait; ``None`` waits without limit (the token's own
                deadline still applies).

        Returns:
            Whether the token is cancelled.

        Raises:
            RuntimeError: when called in an event loop's thread, where it would block the loop.
        """
        if _this_loop() is not None:
            raise RuntimeError(
                "wait_blocking() would block the event loop; use 'await token.wait()' there"
            )
        if self.cancelled:
            return True
        event = threading.Event()
        handle = self.on_cancel(lambda _: event.set())
        try:
            remaining = self._effective_deadline - time.monotonic()
            if timeout is not None:
                remaining = min(remaining, timeout)
            event.wait(None if remaining == _INF else max(remaining, 0.0))
        finally:
            handle.unregister()
        return self.cancelled

    def _loop_deadline(self) -> float:
        if self._effective_deadline == _INF:
            return _INF
        return anyio.current_time() + (self._effective_deadline - time.monotonic())

    # -- scopes ----------------------------------------------------------------------------

    def scope(self) -> TokenScope:
        """Run a block that is interrupted when the token is cancelled.

        ``with token.scope(): ...`` runs the block inside an anyio cancel scope that is
        cancelled when the token is (or its deadline passes); the interruption then surfaces as
        :exc:`OperationCancelled`. If the token is already cancelled, entering raises at once and
        the block never starts. A cancellation from anywhere else (an outer cancel scope,
        ``Task.cancel()``) propagates untouched, even when it arrives together with the token's.
        Inside the block, :func:`current_token` returns this token.

        Raises:
            OperationCancelled: when the token stopped the block.
        """
        return TokenScope(self, swallow=False)

    def move_on(self) -> TokenScope:
        """Like :meth:`scope`, but a cancellation by this token just ends the block.

        Check :attr:`TokenScope.cancelled_caught` afterwards to learn whether it did.
        """
        return TokenScope(self, swallow=True)

    async def until_cancelled(self, source: AsyncIterable[T]) -> AsyncIterator[T]:
        """Yield the items of ``source`` until the token is cancelled, then stop.

        A pending wait for the next item is interrupted at once. Made for streaming
        responses that must end cleanly (not with an error) when the work is cancelled:
        ``StreamingResponse(claim.token.until_cancelled(chunks()))``.

        Args:
            source: an async iterable; it is closed when the iteration stops early.

        Yields:
            The items of ``source``.
        """
        iterator = aiter(source)
        try:
            while not self.cancelled:
                with self.move_on() as scope:
                    try:
                        item = await anext(iterator)
                    except StopAsyncIteration:
                        return
                if scope.cancelled_caught:
                    return
                yield item
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()

    # -- introspection ---------------------------------------------------------------------

    def statistics(self) -> TokenStatistics:
        """Return a snapshot of the token's state."""
        with self._lock:
            return TokenStatistics(
                cancelled=self._reason is not None,
                callbacks=len(self._callbacks),
                parents=len(self._links),
                callback_errors=len(self._errors or ()),
            )

    def __repr__(self) -> str:
        name = f" {self._name!r}" if self._name is not None else ""
        reason = self._reason
        if reason is not None:
            return f"<CancellationToken{name} cancelled ({reason})>"
        extra = ""
        if self._effective_deadline < _INF:
            extra = f" deadline_in={self._effective_deadline - time.monotonic():.3f}s"
        return f"<CancellationToken{name} live callbacks={len(self._callbacks)}{extra}>"


@final
class TokenScope:
    """The context manager returned by :meth:`CancellationToken.scope` and ``move_on()``.

    Use it once, with ``with``, inside a task.

    .. versionadded:: 0.1
    """

    __slots__ = ("_handle", "_scope", "_swallow", "_var", "cancelled_caught", "token")

    def __init__(self, token: CancellationToken, *, swallow: bool) -> None:
        #: The token that interrupts the block.
        self.token = token
        #: Whether the token interrupted the block (set on exit).
        self.cancelled_caught = False
        self._swallow = swallow
        self._scope: anyio.CancelScope | None = None
        self._handle: CallbackHandle | None = None
        self._var: _VarToken[CancellationToken | None] | None = None

    @property
    def reason(self) -> CancelReason | None:
        """The token's reason when it interrupted the block, else ``None``."""
        return self.token._reason if self.cancelled_caught else None

    def __enter__(self) -> TokenScope:
        if self._scope is not None:
            raise RuntimeError("a TokenScope can only be entered once")
        token = self.token
        token._poll()
        if not self._swallow and token._reason is not None:
            self._scope = anyio.CancelScope()
            raise OperationCancelled(token._reason)
        scope = self._scope = anyio.CancelScope(deadline=token._loop_deadline())
        scope.__enter__()
        self._var = _current.set(token)
        self._handle = token.on_cancel(self._interrupt)
        return self

    def _interrupt(self, reason: CancelReason) -> None:
        assert self._scope is not None
        self._scope.cancel(reason.message)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._scope is not None
        assert self._handle is not None
        assert self._var is not None
        self._handle.unregister()
        try:
            _current.reset(self._var)
        except BaseException:  # exited in another context: keep the task's scope stack sound
            self._scope.__exit__(exc_type, exc, tb)
            raise
        self._scope.__exit__(exc_type, exc, tb)
        if not self._scope.cancelled_caught:
            return False  # not our cancellation (or none at all): let it through untouched
        token = self.token
        if token._reason is None:  # the scope's deadline fired first
            token._expire(max(time.monotonic(), token._effective_deadline))
        reason = token._reason
        assert reason is not None
        self.cancelled_caught = True
        if self._swallow:
            return True
        raise OperationCancelled(reason) from None

    def __repr__(self) -> str:
        kind = "move_on" if self._swallow else "scope"
        return f"<TokenScope {kind} cancelled_caught={self.cancelled_caught} token={self.token!r}>"
