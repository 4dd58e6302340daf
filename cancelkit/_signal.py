"""The machinery under a CancellationToken: its state, its waiters, and firing them once.

A token's waiters form an intrusive doubly-linked list (no dict and no handle object per
waiter): :class:`CallbackHandle` (``on_cancel``), :class:`_Link` (a child token) and
``TokenScope`` (an interrupted block). :class:`_Signal` is the token's state (reason,
deadlines, links to the tokens it follows) with the mechanics on it: add a waiter, cancel once
under one lock, run each waiter in its own event loop or at once, expire a passed deadline.
``CancellationToken`` (``_token.py``) is the public face over it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Protocol, final

import anyio

from . import _events
from ._exceptions import OperationCancelled
from ._loop import call_soon, this_loop
from ._reason import CancelKind, CancelReason, _fast_reason

__all__ = ["CallbackHandle", "cancelled_at", "new_handle"]

logger = logging.getLogger("cancelkit")

_INF = math.inf
_UNKNOWN = object()
_new = object.__new__

# One lock for the state of every token: the critical sections are a few pointer updates, and
# a lock per token would cost each token more memory than the rest of it. Reentrant: a child
# collected by the GC while this thread holds the lock (any allocation can trigger it)
# unregisters its link, which takes the lock again.
_lock = threading.RLock()


class _Node(Protocol):
    """Something waiting for a token's cancellation, in the token's list of waiters.

    The waiters form an intrusive doubly-linked list (no dict and no handle object per
    waiter): :class:`CallbackHandle` (``on_cancel``), :class:`_Link` (a child token) and
    ``TokenScope`` (an interrupted block). ``_token`` is the token while registered and
    ``None`` once taken (run or unregistered); ``_native`` the event loop it must run in, or
    ``None`` for any thread.
    """

    _prev: _Node | None
    _next: _Node | None
    _token: _Signal | None
    _native: object

    def _fire(self, token: _Signal, reason: CancelReason) -> None: ...


@final
class CallbackHandle:
    """A registered :meth:`CancellationToken.on_cancel` callback.

    .. versionadded:: 0.1
    """

    __slots__ = ("_callback", "_native", "_next", "_prev", "_token")

    _prev: _Node | None
    _next: _Node | None
    _token: _Signal | None
    _callback: Callable[[CancelReason], object] | None
    _native: object

    def __init__(self) -> None:
        raise TypeError("CallbackHandle cannot be created directly; use token.on_cancel()")

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
        if _take(self) is None:
            return False
        self._callback = None
        return True

    def _fire(self, token: _Signal, reason: CancelReason) -> None:
        callback, self._callback = self._callback, None
        if callback is not None:
            callback(reason)

    def __repr__(self) -> str:
        state = "registered" if self._callback is not None else "done"
        return f"<CallbackHandle {state} callback={self._callback!r}>"


class _Link(weakref.ref["_Signal"]):
    """A parent's link to a child: weak, so finished children cost the parent nothing."""

    __slots__ = ("_native", "_next", "_prev", "_token")

    _prev: _Node | None
    _next: _Node | None
    _token: _Signal | None
    _native: object

    def _fire(self, token: _Signal, reason: CancelReason) -> None:
        child = self()
        if child is not None:
            child._poll()  # a deadline of the child's own that passed first wins
            child._cancel(_fast_reason(CancelKind.PARENT, origin=reason), token)


def new_handle(callback: Callable[[CancelReason], object], native: object) -> CallbackHandle:
    """Return a registered-to-be :class:`CallbackHandle` (its ``__init__`` refuses users)."""
    handle: CallbackHandle = _new(CallbackHandle)
    handle._prev = handle._next = handle._token = None
    handle._callback = callback
    handle._native = native
    return handle


def _child_collected(ref: weakref.ref[_Signal]) -> None:
    assert isinstance(ref, _Link)
    _take(ref)


def _take(node: _Node) -> _Signal | None:
    """Take ``node`` out of its token's list; return the token, or None if already taken."""
    with _lock:
        token = node._token
        if token is None:
            return None
        node._token = None
        if token._reason is None:  # still in the live list (a cancel empties it)
            prev, nxt = node._prev, node._next
            if prev is None:
                token._head = nxt
            else:
                prev._next = nxt
            if nxt is not None:
                nxt._prev = prev
        node._prev = node._next = None
        return token


@final
class _Rare:
    """The state few tokens need, kept out of every token's slots (memory per live token)."""

    __slots__ = ("cancelled_at", "cancelled_by", "committed", "errors", "saved_deadline")

    def __init__(self, cancelled_by: _Signal | None) -> None:
        self.cancelled_by = cancelled_by
        self.cancelled_at: float | None = None  # monotonic, kept while an event listener is on
        self.errors: list[Exception] = []
        self.committed = False  # commit() won: cancel() refuses, the deadline is lifted
        self.saved_deadline = _INF  # the effective deadline before the commit


class _Signal:
    """A token's state and the mechanics on it; ``CancellationToken`` is its public face.

    ``_reason`` is ``None`` while live, then the first reason, never changed again (under
    ``_lock``); ``_head`` the newest waiter, the list running to the oldest; ``_links`` the
    links this token holds in the lists of the tokens it follows; ``_deadline`` its own
    deadline and ``_effective_deadline`` the earliest of its own and its parents' (both
    :func:`time.monotonic` seconds, ``inf`` for none); ``_rare`` what few tokens need.
    """

    __slots__ = (
        "__weakref__",
        "_deadline",
        "_effective_deadline",
        "_head",
        "_links",
        "_name",
        "_rare",
        "_reason",
    )

    _reason: CancelReason | None
    _head: _Node | None
    _links: tuple[_Link, ...]
    _deadline: float
    _effective_deadline: float
    _rare: _Rare | None
    _name: str | None

    def _follow(self, parents: Iterable[_Signal]) -> None:
        """Link this (new) token to ``parents``: cancelled when any is, by their deadlines too."""
        parents_deadline = _INF
        for parent in parents:
            parent._poll()
            link = _Link(self, _child_collected)
            # A link runs in whatever thread cancels the parent, never via an event loop: the
            # child's state must change at once (its own callbacks keep their loop affinity).
            link._native = None
            link._prev = link._next = link._token = None
            parent._add(link)
            with _lock:
                if self._reason is None:
                    self._links += (link,)
                    parents_deadline = min(parents_deadline, parent._effective_deadline)
                    continue
            # The child is cancelled already (this parent had fired, or another thread
            # cancelled a parent or the child meanwhile): this link is not needed.
            _take(link)
            break
        self._effective_deadline = min(self._deadline, parents_deadline)

    def _unfollow(self) -> None:
        """Release the links to the tokens this one follows (and their deadlines)."""
        with _lock:
            links = self._links
            self._links = ()
            if self._reason is None and links:
                rare = self._rare
                if rare is not None and rare.committed:  # lifted until an uncommit
                    rare.saved_deadline = self._deadline
                else:
                    self._effective_deadline = self._deadline
        for link in links:
            _take(link)

    def _cancel(self, reason: CancelReason, by: _Signal | None) -> bool:
        here: object = _UNKNOWN
        local: list[_Node] = []  # to run now, each taken just before it runs (see below)
        remote: list[_Node] = []  # to run in their own event loop, if still registered then
        with _lock:
            if self._reason is not None:
                return False
            rare = self._rare
            if rare is not None:
                if rare.committed:
                    return False  # too late: the work passed its commit point
                rare.cancelled_by = by
            elif by is not None:
                self._rare = _Rare(by)
            self._reason = reason
            if _events.listeners:  # when this process learned of it: cancel -> exit times
                if self._rare is None:
                    self._rare = _Rare(None)
                self._rare.cancelled_at = time.monotonic()
            links = self._links
            self._links = ()
            node = self._head
            self._head = None
            while node is not None:
                nxt = node._next
                node._prev = node._next = None
                native = node._native
                if native is not None:
                    if here is _UNKNOWN:
                        here = this_loop()
                    if native is not here:
                        remote.append(node)
                        node = nxt
                        continue
                local.append(node)
                node = nxt
        for link in links:  # done: no more relays from the tokens this one followed
            _take(link)
        for node in reversed(remote):  # in registration order
            try:
                call_soon(node._native, self._run_later, node, reason)
            except RuntimeError:  # that loop has finished: nobody is left to wake
                if _take(node) is not None and isinstance(node, CallbackHandle):
                    node._callback = None
        errors: list[tuple[_Node, Exception]] = []
        for node in reversed(local):  # in registration order
            # Taken one at a time: a callback that unregisters a later one (or closes a later
            # child) still stops it, as unregister() and close() promise.
            if _take(node) is None:
                continue
            try:
                node._fire(self, reason)
            except Exception as exc:
                errors.append((node, exc))
        if errors:
            self._record(errors)
        return True

    def _commit(self) -> None:
        """Mark the token committed, atomically with :meth:`_cancel`: exactly one of them wins.

        Raises:
            OperationCancelled: with the reason, if the token is cancelled (or its deadline
                has passed).
        """
        self._poll()
        with _lock:
            reason = self._reason
            if reason is None:
                rare = self._rare
                if rare is None:
                    rare = self._rare = _Rare(None)
                if not rare.committed:
                    rare.committed = True
                    rare.saved_deadline = self._effective_deadline
                    self._effective_deadline = _INF
                return
        raise OperationCancelled(reason)

    def _uncommit(self, reason: CancelReason | None) -> None:
        """Undo :meth:`_commit` (a backend refused it), then cancel with ``reason`` if given."""
        with _lock:
            rare = self._rare
            if rare is None or not rare.committed:
                return
            rare.committed = False
            self._effective_deadline = rare.saved_deadline
        if reason is not None:
            self._cancel(reason, None)

    def _run_later(self, node: _Node, reason: CancelReason) -> None:
        if _take(node) is not None:
            try:
                node._fire(self, reason)
            except Exception as exc:
                self._record([(node, exc)])

    def _add(self, node: _Node) -> None:
        """Put ``node`` on the list of waiters, or fire it at once if the token is cancelled."""
        with _lock:
            reason = self._reason
            if reason is None:
                node._token = self
                head = node._next = self._head
                if head is not None:
                    head._prev = node
                self._head = node
                return
        try:
            node._fire(self, reason)
        except Exception as exc:
            self._record([(node, exc)])

    def _record(self, errors: list[tuple[_Node, Exception]]) -> None:
        with _lock:
            if self._rare is None:
                self._rare = _Rare(None)
            self._rare.errors.extend(exc for _, exc in errors)
        for node, exc in errors:
            logger.error("on_cancel callback %r of %r failed", node, self, exc_info=exc)

    def _expire(self, now: float) -> None:
        """Cancel for a passed deadline: the earliest one in this token's ancestry wins."""
        deadline = self._effective_deadline
        if self._reason is not None or deadline == _INF or deadline > now:
            return
        if self._deadline <= deadline:  # its own deadline is the earliest
            self._cancel(_fast_reason(CancelKind.DEADLINE, self._name), None)
            return
        for link in self._links:
            parent = link._token
            if parent is not None:
                parent._expire(now)
        if self._deadline <= now:  # no-op if a parent's deadline already cancelled it
            self._cancel(_fast_reason(CancelKind.DEADLINE, self._name), None)

    def _poll(self) -> None:
        if self._reason is None and self._effective_deadline < _INF:
            self._expire(time.monotonic())

    def _loop_deadline(self) -> float:
        """The effective deadline on the event loop's clock (``anyio.current_time()``)."""
        if self._effective_deadline == _INF:
            return _INF
        return anyio.current_time() + (self._effective_deadline - time.monotonic())

    def _waiters(self) -> int:
        count, node = 0, self._head
        while node is not None:
            count, node = count + 1, node._next
        return count


def cancelled_at(token: _Signal) -> float | None:
    """When ``token`` was cancelled (monotonic), if an event listener was on when it was.

    That is when this process saw the cancel, except for a passed deadline: then the
    deadline itself (the token only notices it at its next check), its own or that of the
    token whose expiry reached it.
    """
    rare = token._rare
    seen = None if rare is None else rare.cancelled_at
    if seen is None:
        return None
    origin = token
    while origin._rare is not None and origin._rare.cancelled_by is not None:
        origin = origin._rare.cancelled_by
    reason = origin._reason
    if reason is not None and reason.kind is CancelKind.DEADLINE:
        return min(seen, origin._deadline)
    return seen
