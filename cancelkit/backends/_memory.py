"""MemoryBackend: the embedded default, for one process and no setup."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import final

import anyio

from .._reason import CancelKind, CancelReason
from ._protocol import Acquired, CancelOutcome, Deliver, OperationExists, RegistryFull

__all__ = ["MemoryBackend", "MemoryBackendStatistics"]

_Id = tuple[str | None, str]


@final
@dataclass(frozen=True, slots=True)
class MemoryBackendStatistics:
    """A snapshot of a :class:`MemoryBackend`, from :meth:`MemoryBackend.statistics`.

    Attributes:
        registrations: operations registered and running.
        tombstones: unexpired tombstones (cancels that arrived before their operation).
        finished: unexpired finished-markers.
        keys: latest-only keys with at least one claim.

    .. versionadded:: 0.1
    """

    registrations: int
    tombstones: int
    finished: int
    keys: int


@final
class _Slot:
    __slots__ = ("changed", "deliver", "generation", "holders", "owner")

    def __init__(self) -> None:
        self.owner: str | None = None
        self.deliver: Deliver | None = None
        self.generation = 0
        self.holders: dict[str, None] = {}  # claims not yet released, oldest first
        self.changed: anyio.Event | None = None  # set on each release, made only for waiters


@final
class MemoryBackend:
    """Keeps registrations, tombstones and latest-only keys in this process's memory.

    The default backend of :class:`~cancelkit.TokenRegistry` and :class:`~cancelkit.LatestOnly`;
    each of them makes its own unless given one. Share one instance between primitives that
    must see each other's ids or keys. Use it from one event loop.

    Args:
        tombstone_ttl: seconds a tombstone (and a finished-marker) lives.
        max_tombstones: the most unexpired tombstones; a cancel that needs one more raises
            :exc:`~cancelkit.RegistryFull`. Finished-markers share this bound but never cause
            an error: the oldest are dropped first.
        clock: the monotonic clock used for expiry, in seconds (tests pass a fake one).

    Raises:
        ValueError: if an option is out of range.

    .. versionadded:: 0.1
    """

    __slots__ = (
        "_clock",
        "_counter",
        "_finished",
        "_live_ids",
        "_max",
        "_regs",
        "_slots",
        "_tombs",
        "_ttl",
    )

    def __init__(
        self,
        *,
        tombstone_ttl: float = 60.0,
        max_tombstones: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < tombstone_ttl < math.inf:
            raise ValueError(f"tombstone_ttl must be seconds > 0, not {tombstone_ttl!r}")
        if max_tombstones < 1:
            raise ValueError(f"max_tombstones must be an int >= 1, not {max_tombstones!r}")
        self._ttl = float(tombstone_ttl)
        self._max = max_tombstones
        self._clock = clock
        self._regs: dict[_Id, tuple[str, Deliver]] = {}
        self._live_ids: dict[str, int] = {}  # id -> how many owners run an op with that id
        # Both maps are in insertion order, which is expiry order (one TTL, a monotonic clock).
        self._tombs: dict[_Id, tuple[float, CancelReason]] = {}
        self._finished: dict[_Id, float] = {}
        self._slots: dict[str, _Slot] = {}
        self._counter = itertools.count(1)

    # -- expiry ------------------------------------------------------------------------

    def _expire(self) -> float:
        now = self._clock()
        tombs, finished = self._tombs, self._finished
        while tombs and next(iter(tombs.values()))[0] <= now:
            del tombs[next(iter(tombs))]
        while finished and next(iter(finished.values())) <= now:
            del finished[next(iter(finished))]
        return now

    def _mark_finished(self, name: _Id, now: float) -> None:
        finished = self._finished
        finished.pop(name, None)
        if len(self._tombs) + len(finished) >= self._max and finished:
            del finished[next(iter(finished))]  # markers are hints: the oldest makes room
        if len(self._tombs) + len(finished) < self._max:
            finished[name] = now + self._ttl

    # -- TokenRegistry -----------------------------------------------------------------

    async def register(
        self, id: str, owner: str | None, holder: str, deliver: Deliver
    ) -> CancelReason | None:
        """See :meth:`Backend.register <cancelkit.backends.Backend.register>`."""
        name = (owner, id)
        if name in self._regs:
            raise OperationExists(id)
        now = self._expire()
        tomb = self._tombs.pop(name, None)
        if tomb is not None:
            self._mark_finished(name, now)
            return tomb[1]
        self._finished.pop(name, None)
        self._regs[name] = (holder, deliver)
        self._live_ids[id] = self._live_ids.get(id, 0) + 1
        return None

    async def unregister(self, id: str, owner: str | None, holder: str) -> None:
        """See :meth:`Backend.unregister <cancelkit.backends.Backend.unregister>`."""
        name = (owner, id)
        live = self._regs.get(name)
        if live is not None and live[0] == holder:
            del self._regs[name]
            if self._live_ids[id] == 1:
                del self._live_ids[id]
            else:
                self._live_ids[id] -= 1
            self._mark_finished(name, self._expire())

    async def cancel(self, id: str, owner: str | None, reason: CancelReason) -> CancelOutcome:
        """See :meth:`Backend.cancel <cancelkit.backends.Backend.cancel>`."""
        name = (owner, id)
        live = self._regs.get(name)
        if live is not None:
            live[1](reason)
            return CancelOutcome.CANCELLED
        if id in self._live_ids:  # someone else's: it looks absent, and is not pre-cancelled
            return CancelOutcome.NOT_FOUND
        now = self._expire()
        if name in self._finished:
            return CancelOutcome.NOT_FOUND
        if name not in self._tombs:
            if len(self._tombs) >= self._max:
                raise RegistryFull("max_tombstones", self._max)
            if len(self._tombs) + len(self._finished) >= self._max:
                del self._finished[next(iter(self._finished))]
            self._tombs[name] = (now + self._ttl, reason)
        return CancelOutcome.PENDING

    # -- LatestOnly --------------------------------------------------------------------

    async def acquire(
        self, key: str, holder: str, deliver: Deliver, *, replace: bool
    ) -> Acquired | None:
        """See :meth:`Backend.acquire <cancelkit.backends.Backend.acquire>`."""
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
        elif slot.owner is not None and not replace:
            return None
        previous, notify = slot.owner, slot.deliver
        slot.owner, slot.deliver = holder, deliver
        slot.generation = generation = next(self._counter)
        slot.holders[holder] = None
        if notify is not None:
            notify(CancelReason(CancelKind.SUPERSEDED, source=holder))
        return Acquired(generation, previous)

    async def release(self, key: str, holder: str) -> None:
        """See :meth:`Backend.release <cancelkit.backends.Backend.release>`."""
        slot = self._slots.get(key)
        if slot is None or holder not in slot.holders:
            return
        del slot.holders[holder]
        if slot.owner == holder:
            slot.owner = slot.deliver = None
        if not slot.holders:
            del self._slots[key]
        if slot.changed is not None:
            slot.changed.set()
            slot.changed = None

    async def wait_turn(self, key: str, holder: str) -> None:
        """See :meth:`Backend.wait_turn <cancelkit.backends.Backend.wait_turn>`."""
        while (slot := self._slots.get(key)) is not None and holder in slot.holders:
            if next(iter(slot.holders)) == holder:
                return
            if slot.changed is None:
                slot.changed = anyio.Event()
            await slot.changed.wait()

    async def generation(self, key: str) -> int | None:
        """See :meth:`Backend.generation <cancelkit.backends.Backend.generation>`."""
        slot = self._slots.get(key)
        return None if slot is None or slot.owner is None else slot.generation

    # -- introspection -----------------------------------------------------------------

    def statistics(self) -> MemoryBackendStatistics:
        """Return a snapshot (expired tombstones and markers are dropped first)."""
        self._expire()
        return MemoryBackendStatistics(
            registrations=len(self._regs),
            tombstones=len(self._tombs),
            finished=len(self._finished),
            keys=len(self._slots),
        )

    def __repr__(self) -> str:
        return (
            f"<MemoryBackend registrations={len(self._regs)} tombstones={len(self._tombs)} "
            f"keys={len(self._slots)} tombstone_ttl={self._ttl}>"
        )
