"""Every exception cancelkit raises on purpose, in one place (the model: httpx's).

The hierarchy::

    CancelkitError                  the base: `except CancelkitError` catches all of these
    ├── OperationCancelled          work was stopped by a CancellationToken (the reason says why)
    ├── SlotBusy                    a LatestOnly claim could not start: the key is taken
    ├── OperationExists             an operation with this id runs already for this owner
    ├── RegistryFull                a limit on live operations or tombstones was reached
    └── BackendUnavailable          the shared state (a Redis server...) cannot be reached
        └── RedisUnavailable        (cancelkit.redis) the Redis server, in particular

Each is an :class:`Exception`, never a :class:`BaseException`: cancelkit never raises one in
place of, or confuses one with, a cancellation it did not cause
(:class:`asyncio.CancelledError`, :class:`trio.Cancelled`). Errors of the caller (a bad
argument) are the built-in :exc:`TypeError` and :exc:`ValueError`, as everywhere in Python.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._reason import CancelReason

__all__ = [
    "BackendUnavailable",
    "CancelkitError",
    "OperationCancelled",
    "OperationExists",
    "RedisUnavailable",
    "RegistryFull",
    "SlotBusy",
]


class CancelkitError(Exception):
    """The base of every exception cancelkit raises on purpose (see the module docs).

    .. versionadded:: 0.1
    """


class OperationCancelled(CancelkitError):
    """Raised when work is stopped by a :class:`~cancelkit.CancellationToken`.

    It is an :class:`Exception`, so web frameworks' exception handlers can map it to a
    response; it is never raised in place of, or confused with, a cancellation that cancelkit
    did not cause (:class:`asyncio.CancelledError`, :class:`trio.Cancelled`).

    Args:
        reason: why the work was stopped.

    .. versionadded:: 0.1
    """

    def __init__(self, reason: CancelReason) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return str(self.reason)


class SlotBusy(CancelkitError):
    """A claim could not start because the key is taken.

    Raised by the ``reject`` policy while ``max_concurrency`` claims run on the key, by
    ``enqueue`` when ``max_waiting`` claims already wait, and by any policy when the claim's
    turn did not come within ``handover_timeout``.

    Args:
        key: the key.
        message: what happened.

    .. versionadded:: 0.1
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{message} (key {key!r})")
        self.key = key


class OperationExists(CancelkitError):
    """An operation with this id is already running for this owner; nothing was recorded.

    A client that retries with the same operation id while the first attempt still runs gets
    this (the FastAPI adapters answer ``409``).

    Args:
        id: the operation id.

    .. versionadded:: 0.1
    """

    def __init__(self, id: str) -> None:
        super().__init__(f"operation id {id!r} is already running")
        self.id = id


class RegistryFull(CancelkitError):
    """A limit on live operations or on tombstones was reached; nothing was recorded.

    Args:
        limit: the name of the constructor option that set the limit.
        value: the limit's value.

    .. versionadded:: 0.1
    """

    def __init__(self, limit: str, value: int) -> None:
        super().__init__(f"{limit}={value} reached; nothing was recorded (raise {limit}?)")
        self.limit = limit
        self.value = value


class BackendUnavailable(CancelkitError):
    """The shared state (a Redis server...) cannot be reached.

    Raised by a backend or a status store that cannot do what was asked without the server
    it keeps its state in; the FastAPI adapters answer ``503`` with ``Retry-After``.

    .. versionadded:: 0.1
    """


class RedisUnavailable(BackendUnavailable):
    """Redis cannot be reached (at start, or for an operation that needs it).

    Raised by ``async with RedisBackend(...)`` when the server does not answer, by
    :meth:`TokenRegistry.cancel <cancelkit.TokenRegistry.cancel>` for an operation that is not
    running in this worker while Redis is unreachable, and, with ``fail_open=False``, by new
    registrations and claims while Redis is unreachable. Exported by ``cancelkit.redis``.

    .. versionadded:: 0.1
    """
