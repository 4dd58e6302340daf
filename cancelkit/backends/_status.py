"""Where the statuses of background operations live: the interface and the in-memory store.

.. versionadded:: 0.1
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from types import TracebackType
from typing import Protocol, final

from .._status import OperationStatus

__all__ = ["MemoryStatusStore", "StatusStore"]


class StatusStore(Protocol):
    """Where the statuses of background operations are kept.

    :class:`MemoryStatusStore` (the default) serves one process; ``cancelkit.redis``'s
    ``RedisStatusStore`` makes every status readable from every worker. Statuses live in
    per-owner namespaces, like registrations in a :class:`~cancelkit.TokenRegistry`.

    Rules: a running status stays while the process that wrote it runs (a shared store
    refreshes it with a heartbeat and reports :attr:`~cancelkit.OperationState.LOST` once
    that process stops answering); an ended status is kept for a bounded time and count, then
    dropped; a running status never replaces the ended status of the same run (same
    ``started_at`` and ``worker``); calls are bounded in time and never block the event loop.
    :class:`~cancelkit.BackgroundOperations` enters the store when it is entered.

    .. versionadded:: 0.1
    """

    @property
    def worker(self) -> str | None:
        """The id this process has in the store while it runs (``None`` if not shared)."""
        ...

    async def __aenter__(self) -> object:
        """Start (connect, heartbeat); called by ``async with BackgroundOperations(...)``."""
        ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        """Stop; running statuses written by this process are left to be reported lost."""
        ...

    async def put(self, status: OperationStatus) -> None:
        """Write ``status`` for ``(status.owner, status.id)``, replacing what was there."""
        ...

    async def get(self, id: str, owner: str | None) -> OperationStatus | None:
        """Return the status of ``(owner, id)``; ``None`` if unknown, expired or another's."""
        ...


@final
class MemoryStatusStore:
    """Keeps statuses in this process's memory: the default :class:`StatusStore`.

    Args:
        retention: seconds an ended status is kept.
        max_retained: the most ended statuses kept; the oldest are dropped first.
        clock: the monotonic clock used for expiry, in seconds (tests pass a fake one).

    Raises:
        ValueError: if an option is out of range.

    .. versionadded:: 0.1
    """

    __slots__ = ("_clock", "_ended", "_max", "_retention", "_running")

    def __init__(
        self,
        *,
        retention: float = 3600.0,
        max_retained: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < retention < math.inf:
            raise ValueError(f"retention must be seconds > 0, not {retention!r}")
        if max_retained < 1:
            raise ValueError(f"max_retained must be >= 1, not {max_retained!r}")
        self._retention = float(retention)
        self._max = max_retained
        self._clock = clock
        self._running: dict[tuple[str | None, str], OperationStatus] = {}
        # ended statuses in the order they ended (dicts keep insertion order), with expiry
        self._ended: dict[tuple[str | None, str], tuple[OperationStatus, float]] = {}

    @property
    def worker(self) -> None:
        """Always ``None``: a memory store is not shared between processes."""
        return None

    async def __aenter__(self) -> MemoryStatusStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def put(self, status: OperationStatus) -> None:
        """See :meth:`StatusStore.put`."""
        name = (status.owner, status.id)
        self._prune()
        if not status.state.ended:
            old = self._ended.get(name)
            if old is not None and _same_run(old[0], status):
                return  # a late progress write never revives an ended run
            self._ended.pop(name, None)
            self._running[name] = status
            return
        self._running.pop(name, None)
        self._ended.pop(name, None)  # re-insert at the end: the newest
        self._ended[name] = (status, self._clock() + self._retention)
        while len(self._ended) > self._max:
            del self._ended[next(iter(self._ended))]

    async def get(self, id: str, owner: str | None) -> OperationStatus | None:
        """See :meth:`StatusStore.get`."""
        name = (owner, id)
        running = self._running.get(name)
        if running is not None:
            return running
        self._prune()
        ended = self._ended.get(name)
        return None if ended is None else ended[0]

    def _prune(self) -> None:
        now = self._clock()
        ended = self._ended
        while ended:
            name = next(iter(ended))
            if ended[name][1] > now:
                break
            del ended[name]

    def __len__(self) -> int:
        """The number of statuses kept (running and ended, expired ones not yet dropped)."""
        return len(self._running) + len(self._ended)

    def __repr__(self) -> str:
        return (
            f"<MemoryStatusStore running={len(self._running)} ended={len(self._ended)} "
            f"retention={self._retention} max_retained={self._max}>"
        )


def _same_run(a: OperationStatus, b: OperationStatus) -> bool:
    return a.started_at == b.started_at and a.worker == b.worker
