"""The loop bridge: which event loop runs here, and its cancel scope without anyio's detection.

anyio finds the running backend on every ``anyio.CancelScope()`` (sniffio and a lookup);
:class:`~cancelkit.TokenScope` entry and the disconnect guard's fast path run once per scope
or request, so they ask here instead: :func:`this_loop` (asyncio loop or trio token),
:func:`asyncio_loop` (asyncio only, not trio's guest mode), :func:`asyncio_scope_class`
(anyio's ``CancelScope`` class for asyncio, found once), :func:`new_scope` (a cancel scope
made with it) and :func:`call_soon` (run a function in a given loop from any thread).
"""

from __future__ import annotations

import asyncio
import math
import sys

# asyncio._get_running_loop is in asyncio.events.__all__: the documented low-level API for
# loop implementers. The public get_running_loop() raises outside a loop instead of returning
# None, and a try/except around it costs every scope entry and callback registration on trio
# (where it raises each time); this one is a C call that answers None.
from asyncio import _get_running_loop, current_task
from collections.abc import Callable
from types import TracebackType
from typing import Protocol, cast

import anyio

__all__ = [
    "Scope",
    "asyncio_loop",
    "asyncio_scope",
    "asyncio_scope_class",
    "call_soon",
    "new_scope",
    "running_loop",
    "running_task",
    "this_loop",
]

#: ``running_loop()``: the running asyncio loop, or None (a C function: no Python frame).
running_loop = _get_running_loop


class Scope(Protocol):
    """The part of a cancel scope (anyio's, or trio's own) that cancelkit uses."""

    @property
    def cancelled_caught(self) -> bool: ...

    @property
    def cancel_called(self) -> bool: ...

    @property
    def deadline(self) -> float: ...

    @deadline.setter
    def deadline(self, value: float) -> None: ...

    def __enter__(self) -> object: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...

    def cancel(self) -> None: ...


#: anyio's ``CancelScope`` class for asyncio, once :func:`asyncio_scope_class` found it
#: (:func:`new_scope` reads it: no lookup once it is known).
asyncio_scope: Callable[..., Scope] | None = None


def new_scope(on_asyncio: bool, deadline: float = math.inf) -> Scope:
    """Return ``anyio.CancelScope(deadline=deadline)``, on asyncio without detecting the loop.

    Args:
        on_asyncio: the caller knows an asyncio loop runs here: anyio's asyncio class (found
            once) is called directly. Else anyio detects the backend as usual.
        deadline: as ``anyio.CancelScope``'s.
    """
    if on_asyncio:
        return (asyncio_scope or asyncio_scope_class())(deadline=deadline)
    return cast(Scope, anyio.CancelScope(deadline=deadline))


def asyncio_scope_class() -> Callable[..., Scope]:
    """Return anyio's ``CancelScope`` class for asyncio (call it in a running asyncio loop).

    ``cls(deadline=...)`` is ``anyio.CancelScope(deadline=...)`` without detecting the event
    loop again (anyio does on every ``CancelScope()``).
    """
    global asyncio_scope
    cls = asyncio_scope = cast(Callable[..., Scope], type(anyio.CancelScope()))
    return cls


def running_task() -> object | None:
    """Return the running task (asyncio's, or trio's), or None outside an event loop."""
    if _get_running_loop() is not None:
        return current_task()
    trio = sys.modules.get("trio")
    if trio is None:
        return None
    try:
        task: object = trio.lowlevel.current_task()
    except RuntimeError:
        return None
    return task


def this_loop() -> object | None:
    """Return the running event loop's native handle (an asyncio loop, a trio token), or None.

    The same handle as ``anyio.lowlevel.current_token().native_token``, got without anyio's
    backend detection: this runs on every callback registration and scope entry.
    """
    loop: object = _get_running_loop()
    if loop is not None:
        return loop
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            loop = trio.lowlevel.current_trio_token()
        except RuntimeError:
            return None
        return loop
    return None


def asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """Return the running asyncio loop, or None (trio, including trio in guest mode)."""
    loop = _get_running_loop()
    if loop is not None:
        trio = sys.modules.get("trio")
        if trio is not None and trio.lowlevel.in_trio_run():  # pragma: no cover (guest mode)
            return None
    return loop


def call_soon(native: object, func: Callable[..., object], *args: object) -> None:
    """Schedule ``func(*args)`` in the event loop ``native`` (thread-safe).

    Raises:
        RuntimeError: if that loop has finished (asyncio: closed; trio: RunFinishedError).
    """
    if isinstance(native, asyncio.AbstractEventLoop):
        native.call_soon_threadsafe(func, *args)
    else:
        native.run_sync_soon(func, *args)  # type: ignore[attr-defined]  # a trio TrioToken
