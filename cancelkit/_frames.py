"""Interrupt frames: the cancelkit scopes around the running code, and pinning them at a commit.

Every place where cancelkit interrupts work with a cancel scope is a *frame*: a
``TokenScope`` (``token.scope()``, ``token.move_on()``, and so ``track()`` and ``claim()``), and
the disconnect guard's request scope (:class:`InterruptFrame`). The innermost frame of the
running code is the context variable :data:`current`, and each frame knows the one it replaced
(``_outer``): the chain of frames around the caller. :func:`current_token` reads the token of
the innermost one.

A commit (``CancellationToken.commit()``, ``op.commit()``, ``claim.commit()``) *pins* every
frame around the caller: once the work passed its commit point nothing cancelkit does may
interrupt it, and that includes the scopes of the tokens around the committed one (a client
disconnect cancels the request's token, whose scope encloses the endpoint that committed). A
pinned frame whose token is cancelled records the interruption instead of cancelling its
scope, and its deadline is lifted; ``_token.uncommit_token`` (a backend refused the commit after
all) unpins, and what was held back happens then.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol, final

import anyio

from ._exceptions import OperationCancelled
from ._loop import running_task, this_loop
from ._reason import CancelKind, _fast_reason

if TYPE_CHECKING:
    from ._loop import Scope
    from ._token import CancellationToken

__all__ = ["Frame", "InterruptFrame", "Pinnable", "commit_here", "current", "interrupt_frame"]

_INF = math.inf

# The bits of a frame's ``_state`` (TokenScope keeps its own two low bits there too): a pinned
# frame holds a count of pins from _PIN up, so commits of nested tokens nest.
_DEFERRED = 4  # its token was cancelled while it was pinned: cancel the scope on unpin
_EXITED = 8  # the scope is done: pins and interruptions do nothing any more
_PIN = 16


class Frame(Protocol):
    """A cancelkit interrupt scope around running code (see the module docs)."""

    token: CancellationToken
    _outer: Frame | None

    def _pinnable(self) -> bool: ...

    def covers(self, task: object) -> bool: ...

    def _pin(self) -> None: ...

    def _unpin(self) -> None: ...


#: The innermost frame of the running code.
current: ContextVar[Frame | None] = ContextVar("cancelkit_frame", default=None)


class Pinnable:
    """The pinning shared by the frames: ``_state``, ``_scope`` and ``token`` are theirs."""

    __slots__ = ("_state",)

    _state: int
    _scope: Scope | None
    _task: object
    token: CancellationToken

    def covers(self, task: object) -> bool:
        """Whether its token's cancellation interrupts ``task`` by this frame's own scope.

        True in the task that entered the frame, while the frame is open and interrupts: the
        task's awaits then end on a cancel without further help (a child task that only
        copied the context is not covered: it is not inside the scope).
        """
        return self._task is task and self._scope is not None and not self._state & _EXITED

    def _pinnable(self) -> bool:
        """Whether a commit may pin this frame: it has not interrupted, and will not."""
        state = self._state
        if state >= _PIN or state & _EXITED or self._scope is None:
            return True
        return not (self._scope.cancel_called or self.token.cancelled)

    def _pin(self) -> None:
        scope = self._scope
        if self._state & _EXITED or scope is None:
            return
        self._state += _PIN
        scope.deadline = _INF

    def _unpin(self) -> None:
        scope = self._scope
        if self._state & _EXITED or scope is None or self._state < _PIN:
            return
        self._state -= _PIN
        if self._state < _PIN:
            deadline = self.token.deadline  # (monotonic; the scope's is the loop's clock)
            if deadline < _INF:
                deadline = anyio.current_time() + deadline - time.monotonic()
            scope.deadline = deadline
            if self._state & _DEFERRED:
                self._state &= ~_DEFERRED
                scope.cancel()

    def _interrupt(self) -> None:
        """Cancel the scope, or, while pinned, remember to."""
        if self._state >= _PIN:
            self._state |= _DEFERRED
        elif self._scope is not None:
            self._scope.cancel()


@final
class InterruptFrame(Pinnable):
    """The frame of a scope that something other than a ``TokenScope`` cancels for ``token``.

    The disconnect guard's request scope: the guard calls :meth:`interrupt` when the request's
    token is cancelled. ``scope`` is ``None`` for a request that is only signalled.
    """

    __slots__ = ("_outer", "_scope", "_task", "token")

    _outer: Frame | None

    def interrupt(self) -> None:
        """Cancel the scope now, or once the frame is unpinned (a commit pinned it)."""
        self._interrupt()

    def exit(self) -> None:
        """The scope is done: later pins and interruptions do nothing."""
        self._state |= _EXITED


def interrupt_frame(token: CancellationToken, scope: Scope | None) -> InterruptFrame:
    """Return a new :class:`InterruptFrame` whose outer frame is the current one."""
    frame: InterruptFrame = object.__new__(InterruptFrame)
    frame.token = token
    frame._scope = scope
    frame._task = None if scope is None else running_task()
    frame._state = 0
    frame._outer = current.get()
    return frame


def commit_here(token: CancellationToken, commit: Callable[[], None]) -> list[Frame]:
    """Run ``commit`` (the token's own, atomic with its cancel) and pin the frames around.

    Returns:
        The frames pinned, for an unpin if a backend refuses the commit after all.

    Raises:
        OperationCancelled: if a frame around the caller was cancelled (it interrupts, or
            will), or ``commit`` raises it (``token`` was cancelled): nothing is committed or
            pinned then.
    """
    frames: list[Frame] = []
    # The frames live in an event loop; a worker thread (a sync endpoint) that commits only
    # commits the token: the thread itself cannot be interrupted, and the loop's scopes are
    # not the thread's to touch.
    frame = current.get() if this_loop() is not None else None
    while frame is not None:
        if not frame._pinnable():
            reason = frame.token.reason
            raise OperationCancelled(
                reason if reason is not None else _fast_reason(CancelKind.REQUESTED)
            )
        frames.append(frame)
        frame = frame._outer
    commit()
    for frame in frames:
        frame._pin()
    return frames
