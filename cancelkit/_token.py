"""CancellationToken: a thread-safe, linkable cancellation signal with deadlines."""

from __future__ import annotations

import math
import sys
import threading
import time
from asyncio import current_task
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar, cast, final

import anyio
import anyio.lowlevel

from . import _loop
from ._exceptions import OperationCancelled
from ._frames import _DEFERRED, _EXITED, _PIN, Frame, Pinnable, commit_here
from ._frames import current as _current
from ._loop import Scope, running_loop, this_loop
from ._reason import CancelKind, CancelReason, _fast_reason
from ._signal import CallbackHandle, _lock, _Node, _Signal, _take, new_handle

__all__ = [
    "CancellationToken",
    "TokenScope",
    "TokenStatistics",
    "current_token",
]

T = TypeVar("T")
_INF = math.inf


def current_token() -> CancellationToken | None:
    """Return the cancellation token of the work running in this context, if any.

    Set inside :meth:`CancellationToken.scope` and :meth:`CancellationToken.move_on` (and so
    inside everything built on them: ``TokenRegistry.track()``, ``LatestOnly.claim()``,
    requests under the disconnect middleware; the non-interrupting ``hold()`` forms leave it
    as it was). Context variables follow work into :func:`anyio.to_thread.run_sync`, so a sync
    function running in a worker thread sees the token of the request that called it.

    Not to be confused with :func:`anyio.lowlevel.current_token`, which returns the *event
    loop's* token (for calling into the loop from other threads) and has nothing to do with
    cancellation. This one returns a :class:`CancellationToken`: what code deep in a call
    stack checks (``raise_if_cancelled()``) without threading a parameter through.

    Returns:
        The innermost active token, or ``None`` outside any.

    .. versionadded:: 0.1
    """
    frame = _current.get()
    return None if frame is None else frame.token


def shorten_deadline(token: CancellationToken, deadline: float) -> None:
    """Bring ``token``'s own deadline forward to ``deadline`` (:func:`time.monotonic` seconds).

    For the adapters that run a request under a token made elsewhere (a claim's, an
    operation's), so that the request's deadline holds there too. Never moves a deadline
    later; scopes already entered and tokens already linked to ``token`` keep what they saw.
    """
    with _lock:
        if deadline < token._deadline and not token.committed:  # (a commit lifts deadlines)
            token._deadline = deadline
            token._effective_deadline = min(token._effective_deadline, deadline)


def _check_timeout(timeout: object) -> float:
    if not isinstance(timeout, int | float) or isinstance(timeout, bool):
        raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout must be a number of seconds >= 0, not {timeout!r}")
    return float(timeout)


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
class CancellationToken(_Signal):
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

    __slots__ = ()

    #: Whether a backend decides this token's commit (a tracked operation's, a claim's).
    _backed = False

    def __init__(self, *, timeout: float | None = None, name: str | None = None) -> None:
        deadline = _INF if timeout is None else time.monotonic() + _check_timeout(timeout)
        label: object = name
        if label is not None and not isinstance(label, str):
            raise TypeError(f"name must be a str or None, not {type(label).__name__}")
        self._reason = None
        self._head = None  # the newest waiter; the list runs to the oldest
        self._links = ()
        self._deadline = deadline
        self._effective_deadline = deadline  # the earliest of its own and its parents'
        self._rare = None  # what few tokens need: who cancelled, callback errors
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
        released when the new token is cancelled, closed (:meth:`close`) or garbage-collected,
        so a long-lived input does not grow with the short-lived tokens linked to it.

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
        child._follow(tokens)
        return child

    def child(self, *, timeout: float | None = None, name: str | None = None) -> CancellationToken:
        """Return a new token that is cancelled when this one is (see :meth:`any_of`)."""
        return CancellationToken.any_of(self, timeout=timeout, name=name)

    def close(self) -> None:
        """Stop following the tokens this one is linked to, and release the links.

        For work that is done with its token: the long-lived parent (an application's shutdown
        token) then holds nothing for it, without waiting for the garbage collector. The
        token keeps its state and its own deadline; only the parents' cancellations and
        deadlines no longer reach it. Idempotent; safe from any thread.

        .. versionadded:: 0.1
        """
        self._unfollow()

    # -- state -----------------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """Whether the token is cancelled (a passed deadline counts)."""
        if self._reason is None and self._effective_deadline < _INF:  # self._poll(), inlined
            self._expire(time.monotonic())
        return self._reason is not None

    @property
    def reason(self) -> CancelReason | None:
        """Why the token was cancelled, or ``None`` while it is live.

        This is the token's whole state in one read: a passed deadline is applied first.
        """
        if self._reason is None and self._effective_deadline < _INF:  # self._poll(), inlined
            self._expire(time.monotonic())
        return self._reason

    @property
    def cancelled_by(self) -> CancellationToken | None:
        """The linked token whose cancellation cancelled this one, if that is what happened."""
        rare = self._rare
        return None if rare is None else cast(CancellationToken, rare.cancelled_by)

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
        with _lock:
            rare = self._rare
            return () if rare is None else tuple(rare.errors)

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
        :attr:`callback_errors`. A deadline that has passed counts as the first reason even if
        nobody looked at the token in between.

        Args:
            reason: why; :attr:`CancelKind.REQUESTED` when omitted.

        Returns:
            True for the call that cancelled the token; False if it was already cancelled
            (the first reason is kept).

        Raises:
            TypeError: if ``reason`` is not a :class:`CancelReason`.
        """
        if reason is None:
            reason = _fast_reason(CancelKind.REQUESTED)
        elif not isinstance(reason, CancelReason):
            raise TypeError(f"reason must be a CancelReason or None, not {type(reason).__name__}")
        if self._effective_deadline < _INF and self._reason is None:  # self._poll(), inlined
            self._expire(time.monotonic())
        return self._cancel(reason, None)

    def commit(self) -> None:
        """Pass the commit point: from now on nothing cancelkit does stops this work.

        Exactly one of :meth:`cancel` and ``commit()`` wins, atomically. Afterwards
        :meth:`cancel` returns False, the deadline is lifted, and the cancelkit scopes around
        the caller stop interrupting it (see the "Commit points" guide). Idempotent.

        Raises:
            OperationCancelled: if the token, or a scope around the caller, was cancelled first.
            RuntimeError: for the token of a tracked operation or a claim: use
                ``await op.commit()`` / ``await claim.commit()``, which ask the backend.

        .. versionadded:: 0.1
        """
        if self._backed:
            raise RuntimeError(
                "this token belongs to a tracked operation or a claim, whose backend decides "
                "the commit: use 'await op.commit()' or 'await claim.commit()'"
            )
        if not self.committed:
            commit_token(self)

    @property
    def committed(self) -> bool:
        """Whether the token passed its commit point (:meth:`commit`)."""
        rare = self._rare
        return rare is not None and rare.committed

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
        self._poll()
        handle = new_handle(callback, this_loop())
        self._add(handle)
        return handle

    # -- waiting ---------------------------------------------------------------------------

    async def wait(self) -> CancelReason:
        """Wait until the token is cancelled (or its deadline passes).

        Returns:
            The reason.
        """
        return await _wait(self)

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
        return _wait_blocking(self, timeout)

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
        return token_scope(self, _RAISE)

    def move_on(self) -> TokenScope:
        """Like :meth:`scope`, but a cancellation by this token just ends the block.

        Check :attr:`TokenScope.cancelled_caught` afterwards to learn whether it did.
        """
        return token_scope(self, 0)

    def until_cancelled(self, source: AsyncIterable[T]) -> AsyncIterator[T]:
        """Yield the items of ``source`` until the token is cancelled, then stop.

        A pending wait for the next item is interrupted at once. Made for streaming
        responses that must end cleanly (not with an error) when the work is cancelled:
        ``StreamingResponse(claim.token.until_cancelled(chunks()))``.

        Args:
            source: an async iterable (a sync one raises ``TypeError`` naming the fix); it is
                closed when the iteration stops early.

        Returns:
            An async iterator over the items of ``source``.
        """
        return _until_cancelled(self, _async(source))

    # -- introspection ---------------------------------------------------------------------

    def statistics(self) -> TokenStatistics:
        """Return a snapshot of the token's state."""
        return _statistics(self)

    def __repr__(self) -> str:
        return _describe(self)


def _statistics(token: CancellationToken) -> TokenStatistics:
    with _lock:
        rare = token._rare
        return TokenStatistics(
            cancelled=token._reason is not None,
            callbacks=token._waiters(),
            parents=len(token._links),
            callback_errors=0 if rare is None else len(rare.errors),
        )


def _describe(token: CancellationToken) -> str:
    """The token's ``repr()``: its name, state, waiters and time left."""
    name = f" {token._name!r}" if token._name is not None else ""
    reason = token._reason
    if reason is not None:
        return f"<CancellationToken{name} cancelled ({reason})>"
    if token.committed:
        return f"<CancellationToken{name} committed>"
    extra = ""
    if token._effective_deadline < _INF:
        extra = f" deadline_in={token._effective_deadline - time.monotonic():.3f}s"
    return f"<CancellationToken{name} live callbacks={token._waiters()}{extra}>"


def settled_reason(token: CancellationToken) -> CancelReason | None:
    """The token's reason as it stands, without applying a deadline that passed unnoticed.

    For the exits of tracked operations and claims: a body that returned before anyone saw
    its deadline pass did finish; only a cancellation that already happened counts.
    """
    return token._reason


def commit_token(token: CancellationToken) -> list[Frame]:
    """Commit ``token`` and pin the frames around the caller (see :mod:`._frames`)."""
    return commit_here(token, token._commit)


def uncommit_token(
    token: CancellationToken, frames: list[Frame], reason: CancelReason | None
) -> None:
    """Undo :func:`commit_token`: un-commit (then cancel with ``reason`` if given), unpin."""
    token._uncommit(reason)
    for frame in frames:
        frame._unpin()


class HeldToken(CancellationToken):  # type: ignore[misc]  # private: same slots, one flag
    """The token of a tracked operation or a claim: its backend decides its commit."""

    __slots__ = ()
    _backed = True


def held_token(name: str, parent: CancellationToken | None = None) -> CancellationToken:
    """Return the token of a tracked operation or a claim (``commit()`` refuses it)."""
    if parent is None:
        return HeldToken(name=name)
    return HeldToken.any_of(parent, name=name)


# -- the bodies of the waiting methods ---------------------------------------------------------


async def _wait(token: CancellationToken) -> CancelReason:
    """:meth:`CancellationToken.wait`: an event set by a callback, bounded by the deadline."""
    token._poll()
    reason = token._reason
    if reason is not None:
        await anyio.lowlevel.checkpoint()
        return reason
    event = anyio.Event()
    handle = token.on_cancel(lambda _: event.set())
    try:
        with anyio.CancelScope(deadline=token._loop_deadline()) as scope:
            await event.wait()
        if scope.cancelled_caught:
            token._expire(max(time.monotonic(), token._effective_deadline))
    finally:
        handle.unregister()
    assert token._reason is not None
    return token._reason


def _wait_blocking(token: CancellationToken, timeout: float | None) -> bool:
    """:meth:`CancellationToken.wait_blocking`: a thread event set by a callback."""
    if this_loop() is not None:
        raise RuntimeError(
            "wait_blocking() would block the event loop; use 'await token.wait()' there"
        )
    if token.cancelled:
        return True
    event = threading.Event()
    handle = token.on_cancel(lambda _: event.set())
    try:
        remaining = token._effective_deadline - time.monotonic()
        if timeout is not None:
            remaining = min(remaining, timeout)
        event.wait(None if remaining == _INF else max(remaining, 0.0))
    finally:
        handle.unregister()
    return token.cancelled


def _async(source: AsyncIterable[T]) -> AsyncIterable[T]:
    """``source``, if it is an async iterable; else a ``TypeError`` that names the fix."""
    if not hasattr(source, "__aiter__"):
        raise TypeError(
            f"until_cancelled() takes an async iterable, not {type(source).__name__}: make the "
            "generator 'async def', or wrap a sync one, e.g. with "
            "starlette.concurrency.iterate_in_threadpool()"
        )
    return source


async def _until_cancelled(token: CancellationToken, source: AsyncIterable[T]) -> AsyncIterator[T]:
    """:meth:`CancellationToken.until_cancelled`: each wait for an item in a ``move_on()``."""
    iterator = aiter(source)
    try:
        while not token.cancelled:
            with token.move_on() as scope:
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


@final
class TokenScope(Pinnable):
    """The context manager returned by :meth:`CancellationToken.move_on` and ``scope()``.

    Use it once, with ``with``, inside a task. ``move_on()`` is the primitive: it ends the
    block quietly when the token interrupts it; ``scope()`` is the same thing, raising
    :exc:`OperationCancelled` on the way out instead.

    .. versionadded:: 0.1
    """

    __slots__ = (
        "_native",
        "_next",
        "_outer",
        "_prev",
        "_scope",
        "_task",
        "_token",
        "token",
    )

    #: The token that interrupts the block.
    token: CancellationToken
    _state: int  # _RAISE for scope(), | _CAUGHT on exit: one slot, not two
    _scope: Scope | None
    _prev: _Node | None
    _next: _Node | None
    _token: _Signal | None
    _native: object
    _outer: Frame | None

    def __init__(self) -> None:
        raise TypeError(
            "TokenScope cannot be created directly; use token.scope() or token.move_on()"
        )

    @property
    def reason(self) -> CancelReason | None:
        """The token's reason when it interrupted the block, else ``None``."""
        return self.token._reason if self._state & _CAUGHT else None

    @property
    def cancelled_caught(self) -> bool:
        """Whether the token interrupted the block (set on exit)."""
        return bool(self._state & _CAUGHT)

    def __enter__(self) -> TokenScope:
        if self._scope is not None:
            raise RuntimeError("a TokenScope can only be entered once")
        token = self.token
        deadline = token._effective_deadline
        if deadline < _INF:
            token._poll()
            deadline = token._loop_deadline()
        reason = token._reason
        if reason is not None and self._state & _RAISE:
            self._scope = _USED  # never entered
            raise OperationCancelled(reason)
        # anyio.CancelScope(deadline=deadline), made without detecting the event loop again
        # (anyio does on every CancelScope()), and on trio without anyio's wrapper: anyio's
        # trio scope only forwards to trio.CancelScope.
        loop = running_loop()
        if loop is not None:
            scope = self._scope = _loop.new_scope(True, deadline)
            self._native = loop
            self._task = current_task()
            scope.__enter__()
        else:
            native = self._native = this_loop()  # a trio token
            if native is not None:
                scope = self._scope = sys.modules["trio"].CancelScope(deadline=deadline)
                self._task = sys.modules["trio"].lowlevel.current_task()
            else:  # pragma: no cover - no event loop: anyio raises the error
                scope = self._scope = cast(Scope, anyio.CancelScope(deadline=deadline))
                self._task = None
            scope.__enter__()
        self._outer = _current.get()
        _current.set(self)
        token._add(self)  # fires at once (cancels the scope) if the token is cancelled already
        return self

    def _fire(self, token: _Signal, reason: CancelReason) -> None:
        if self._state >= _PIN:  # pinned by a commit: only once unpinned
            self._state |= _DEFERRED
        else:
            self._scope.cancel()  # type: ignore[union-attr]  # entered: a scope

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        scope = self._scope
        assert scope is not None
        if self._token is not None:
            _take(self)
        _current.set(self._outer)
        self._outer = None
        self._state |= _EXITED
        swallowed = scope.__exit__(exc_type, exc, tb)
        if not scope.cancelled_caught:
            return swallowed  # not our cancellation (or none at all): let it through untouched
        token = self.token
        if token._reason is None:  # the scope's deadline fired first
            token._expire(max(time.monotonic(), token._effective_deadline))
        reason = token._reason
        assert reason is not None
        self._state |= _CAUGHT
        if self._state & _RAISE:
            raise OperationCancelled(reason) from None
        return True

    def __repr__(self) -> str:
        kind = "scope" if self._state & _RAISE else "move_on"
        return f"<TokenScope {kind} cancelled_caught={self.cancelled_caught} token={self.token!r}>"


_RAISE, _CAUGHT = 1, 2  # the bits of TokenScope._state
_new = object.__new__


def token_scope(token: CancellationToken, state: int) -> TokenScope:
    """Return a new :class:`TokenScope` of ``token``: ``move_on()`` for 0, ``scope()`` for _RAISE.

    Built without a call of ``__init__`` (which refuses users): as fast as a constructor.
    """
    scope: TokenScope = _new(TokenScope)
    scope.token = token
    scope._state = state
    scope._scope = scope._prev = scope._next = scope._token = scope._native = scope._outer = None
    return scope


# The ``_scope`` of a TokenScope that raised on entry: used once, never entered.
_USED = cast(Scope, object())
