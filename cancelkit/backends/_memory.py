"""MemoryBackend: the embedded default, for one process and no setup."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import final

import anyio

from .._exceptions import OperationExists, RegistryFull
from .._policy import Policy
from .._reason import CancelKind, CancelReason, _fast_reason
from ._protocol import (
    Acquired,
    Admission,
    CancelOutcome,
    Deliver,
    _running,
)

__all__ = ["MemoryBackend", "MemoryBackendStatistics"]

_Id = tuple[str | None, str]


@final
class _Reg:
    """A registration: its holder, how to stop it, and what was decided (cancel or commit)."""

    __slots__ = ("deliver", "holder", "owner", "state")

    def __init__(self, owner: str | None, holder: str, deliver: Deliver) -> None:
        self.owner = owner
        self.holder = holder
        self.deliver = deliver
        #: None while undecided, the first cancel's reason, or True once committed.
        self.state: CancelReason | bool | None = None


def _find(entry: _Reg | dict[str | None, _Reg] | None, owner: str | None) -> _Reg | None:
    """The registration of ``owner`` in one id's entry of ``MemoryBackend._regs``, if any."""
    if entry is None:
        return None
    if isinstance(entry, _Reg):
        return entry if entry.owner == owner else None
    return entry.get(owner)


def _forget_tomb(backend: MemoryBackend, name: _Id) -> tuple[float, CancelReason] | None:
    """Drop a tombstone of ``backend`` and its count in its owner's budget."""
    tomb = backend._tombs.pop(name, None)
    if tomb is not None:
        owners = backend._owner_tombs
        left = owners[name[0]] - 1
        if left:
            owners[name[0]] = left
        else:
            del owners[name[0]]
    return tomb


def _count(regs: dict[str, _Reg | dict[str | None, _Reg]]) -> int:
    return sum(1 if isinstance(e, _Reg) else len(e) for e in regs.values())


@final
@dataclass(frozen=True, slots=True)
class MemoryBackendStatistics:
    """A snapshot of a :class:`MemoryBackend`, from :meth:`MemoryBackend.statistics`.

    Attributes:
        registrations: operations registered and running.
        tombstones: unexpired tombstones (cancels that arrived before their operation).
        finished: unexpired finished-markers.
        keys: latest-only keys with at least one claim.
        sequences: released latest-only keys whose newest sequence number is remembered.

    .. versionadded:: 0.1
    """

    registrations: int
    tombstones: int
    finished: int
    keys: int
    sequences: int


_RUNNING, _WAITING, _SUPERSEDED = 0, 1, 2


@final
class _Entry:
    __slots__ = ("by", "deliver", "generation", "state")

    def __init__(self, deliver: Deliver, generation: int, state: int) -> None:
        self.deliver = deliver
        self.generation = generation
        self.state = state
        #: None, the newcomer that superseded it, or "" once it committed (then nobody can).
        self.by: str | None = None


@final
class _Key:
    """One latest-only key: its unreleased claims and its newest sequence number."""

    __slots__ = ("changed", "entries", "limit", "running", "seq", "seq_holder", "waiting")

    def __init__(self, limit: int, seq: int | None, seq_holder: str) -> None:
        self.entries: dict[str, _Entry] = {}  # unreleased claims, oldest first
        self.running: dict[str, None] = {}  # the running ones, oldest first
        self.waiting: dict[str, None] = {}  # the waiting ones, first come first
        self.limit = limit
        self.seq = seq
        self.seq_holder = seq_holder
        self.changed: anyio.Event | None = None  # set on each release, made only for waiters

    def turn(self, holder: str, entry: _Entry, handover: bool) -> bool:
        if entry.state != _RUNNING:
            return False
        if not handover:
            return True
        ahead = 0
        for other, earlier in self.entries.items():
            if other == holder:
                return True
            if earlier.state != _WAITING:
                ahead += 1
                if ahead >= self.limit:
                    return False
        return True  # pragma: no cover - the holder is always among the entries


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
        max_tombstones_per_owner: the most unexpired tombstones of one owner (``None`` counts
            as one owner); past it that owner's cancels of unknown ids raise
            :exc:`~cancelkit.RegistryFull`, while every other owner's track, cancel and
            cancel-before-start keep working. Keep it well below ``max_tombstones``.
        seq_ttl: seconds the newest sequence number of a latest-only key is remembered after
            its last claim was released (a stale claim arriving later still never runs).
        max_seq_keys: the most released keys whose sequence number is remembered; past it,
            the oldest is forgotten first.
        clock: the monotonic clock used for expiry, in seconds (tests pass a fake one).

    Raises:
        ValueError: if an option is out of range.

    .. versionadded:: 0.1
    """

    __slots__ = (
        "_clock",
        "_counter",
        "_finished",
        "_keys",
        "_max",
        "_max_per_owner",
        "_max_seqs",
        "_owner_tombs",
        "_regs",
        "_seq_ttl",
        "_seqs",
        "_tombs",
        "_ttl",
    )

    def __init__(
        self,
        *,
        tombstone_ttl: float = 60.0,
        max_tombstones: int = 10_000,
        max_tombstones_per_owner: int = 1_000,
        seq_ttl: float = 60.0,
        max_seq_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < tombstone_ttl < math.inf:
            raise ValueError(f"tombstone_ttl must be seconds > 0, not {tombstone_ttl!r}")
        if max_tombstones < 1:
            raise ValueError(f"max_tombstones must be an int >= 1, not {max_tombstones!r}")
        if max_tombstones_per_owner < 1:
            raise ValueError(
                f"max_tombstones_per_owner must be an int >= 1, not {max_tombstones_per_owner!r}"
            )
        if not 0 < seq_ttl < math.inf:
            raise ValueError(f"seq_ttl must be seconds > 0, not {seq_ttl!r}")
        if max_seq_keys < 1:
            raise ValueError(f"max_seq_keys must be an int >= 1, not {max_seq_keys!r}")
        self._seq_ttl = float(seq_ttl)
        self._max_seqs = max_seq_keys
        self._ttl = float(tombstone_ttl)
        self._max = max_tombstones
        self._max_per_owner = max_tombstones_per_owner
        self._owner_tombs: dict[str | None, int] = {}  # owner -> its unexpired tombstones
        self._clock = clock
        # id -> (owner, holder, deliver), or owner -> that for an id several owners run: no
        # (owner, id) tuple per registration, and "someone else's" is one lookup
        self._regs: dict[str, _Reg | dict[str | None, _Reg]] = {}
        # Both maps are in insertion order, which is expiry order (one TTL, a monotonic clock).
        self._tombs: dict[_Id, tuple[float, CancelReason]] = {}
        self._finished: dict[_Id, float] = {}
        self._keys: dict[str, _Key] = {}
        # key -> (expiry, seq, holder) of released keys; insertion order is expiry order.
        self._seqs: dict[str, tuple[float, int, str]] = {}
        self._counter = itertools.count(1)

    # -- expiry ------------------------------------------------------------------------

    def _expire(self) -> float:
        now = self._clock()
        tombs, finished = self._tombs, self._finished
        while tombs and next(iter(tombs.values()))[0] <= now:
            _forget_tomb(self, next(iter(tombs)))
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
        entry = self._regs.get(id)
        if _find(entry, owner) is not None:
            raise OperationExists(id)
        name = (owner, id)
        if self._tombs:
            self._expire()
            tomb = self._tombs.get(name)
            if tomb is not None:  # kept until it expires: a retried start is refused too
                return tomb[1]
        self._finished.pop(name, None)
        reg = _Reg(owner, holder, deliver)
        if entry is None:
            self._regs[id] = reg
        elif isinstance(entry, _Reg):
            self._regs[id] = {entry.owner: entry, owner: reg}
        else:
            entry[owner] = reg
        return None

    async def unregister(self, id: str, owner: str | None, holder: str) -> CancelReason | None:
        """See :meth:`Backend.unregister <cancelkit.backends.Backend.unregister>`."""
        entry = self._regs.get(id)
        live = _find(entry, owner)
        if live is None or live.holder != holder:
            return None
        if isinstance(entry, dict):
            del entry[owner]
            if len(entry) == 1:
                self._regs[id] = next(iter(entry.values()))
        else:
            del self._regs[id]
        self._mark_finished((owner, id), self._expire())
        state = live.state
        return state if isinstance(state, CancelReason) else None

    async def commit(self, id: str, owner: str | None, holder: str) -> CancelReason | None:
        """See :meth:`Backend.commit <cancelkit.backends.Backend.commit>`."""
        live = _find(self._regs.get(id), owner)
        if live is None or live.holder != holder:
            return CancelReason(CancelKind.REQUESTED, "the operation is no longer registered")
        state = live.state
        if isinstance(state, CancelReason):
            return state
        live.state = True
        return None

    async def cancel(self, id: str, owner: str | None, reason: CancelReason) -> CancelOutcome:
        """See :meth:`Backend.cancel <cancelkit.backends.Backend.cancel>`."""
        entry = self._regs.get(id)
        live = _find(entry, owner)
        if live is not None:
            state = live.state
            if state is True:
                return CancelOutcome.COMMITTED  # too late: nothing changes
            if state is None:
                live.state = reason
            live.deliver(reason)
            return CancelOutcome.CANCELLED
        if entry is not None:  # someone else's: it looks absent, and is not pre-cancelled
            return CancelOutcome.NOT_FOUND
        name = (owner, id)
        now = self._expire()
        if name in self._finished:
            return CancelOutcome.NOT_FOUND
        if name not in self._tombs:
            mine = self._owner_tombs.get(owner, 0)
            if mine >= self._max_per_owner:
                raise RegistryFull("max_tombstones_per_owner", self._max_per_owner)
            if len(self._tombs) >= self._max:
                raise RegistryFull("max_tombstones", self._max)
            if len(self._tombs) + len(self._finished) >= self._max:
                del self._finished[next(iter(self._finished))]
            self._tombs[name] = (now + self._ttl, reason)
            self._owner_tombs[owner] = mine + 1
        return CancelOutcome.PENDING

    # -- LatestOnly --------------------------------------------------------------------

    async def acquire(
        self,
        key: str,
        holder: str,
        deliver: Deliver,
        *,
        policy: Policy,
        limit: int,
        seq: int | None,
    ) -> Acquired:
        """See :meth:`Backend.acquire <cancelkit.backends.Backend.acquire>`."""
        acquired = _admit(self, key, holder, deliver, policy, limit, seq)
        return _running(acquired) if isinstance(acquired, int) else acquired

    async def release(self, key: str, holder: str) -> CancelReason | None:
        """See :meth:`Backend.release <cancelkit.backends.Backend.release>`."""
        entry = _drop(self, key, holder)
        by = None if entry is None else entry.by
        return _fast_reason(CancelKind.SUPERSEDED, by) if by else None

    async def commit_claim(self, key: str, holder: str) -> CancelReason | None:
        """See :meth:`Backend.commit_claim <cancelkit.backends.Backend.commit_claim>`."""
        slot = self._keys.get(key)
        entry = None if slot is None else slot.entries.get(holder)
        if entry is None:
            return CancelReason(CancelKind.SUPERSEDED, "the claim is no longer recorded")
        if entry.state == _SUPERSEDED and entry.by:
            return _fast_reason(CancelKind.SUPERSEDED, entry.by)
        entry.by = ""
        return None

    def _expire_seqs(self) -> float:
        seqs, now = self._seqs, self._clock()
        while seqs and next(iter(seqs.values()))[0] <= now:
            del seqs[next(iter(seqs))]
        return now

    def _remember(self, key: str, seq: int, holder: str) -> None:
        seqs, now = self._seqs, self._expire_seqs()
        if len(seqs) >= self._max_seqs:
            del seqs[next(iter(seqs))]
        seqs[key] = (now + self._seq_ttl, seq, holder)

    async def wait_turn(self, key: str, holder: str, *, handover: bool) -> None:
        """See :meth:`Backend.wait_turn <cancelkit.backends.Backend.wait_turn>`."""
        while (slot := self._keys.get(key)) is not None and (
            entry := slot.entries.get(holder)
        ) is not None:
            if slot.turn(holder, entry, handover):
                return
            if slot.changed is None:
                slot.changed = anyio.Event()
            await slot.changed.wait()

    async def is_current(self, key: str, generation: int) -> bool:
        """See :meth:`Backend.is_current <cancelkit.backends.Backend.is_current>`."""
        slot = self._keys.get(key)
        if slot is None:
            return False
        entries = slot.entries
        return any(entries[holder].generation == generation for holder in slot.running)

    # -- introspection -----------------------------------------------------------------

    def statistics(self) -> MemoryBackendStatistics:
        """Return a snapshot (expired tombstones, markers and sequences are dropped first)."""
        self._expire()
        self._expire_seqs()
        return MemoryBackendStatistics(
            registrations=_count(self._regs),
            tombstones=len(self._tombs),
            finished=len(self._finished),
            keys=len(self._keys),
            sequences=len(self._seqs),
        )

    def __repr__(self) -> str:
        return (
            f"<MemoryBackend registrations={_count(self._regs)} "
            f"tombstones={len(self._tombs)} "
            f"keys={len(self._keys)} tombstone_ttl={self._ttl}>"
        )


def _admit(
    backend: MemoryBackend,
    key: str,
    holder: str,
    deliver: Deliver,
    policy: Policy,
    limit: int,
    seq: int | None,
) -> Acquired | int:
    """``backend.acquire(...)`` without a coroutine: this backend never waits.

    ``LatestOnly`` calls it directly for its in-memory backend. Returns the generation for a
    claim that runs (the common case, without making an :class:`Acquired`), else the
    :class:`Acquired`.
    """
    slot = backend._keys.get(key)
    if slot is None:
        remembered = backend._seqs.get(key) if backend._seqs else None
        if remembered is not None and remembered[0] > backend._clock():
            slot = _Key(limit, remembered[1], remembered[2])
        else:
            slot = _Key(limit, None, "")
    if seq is not None and slot.seq is not None and seq <= slot.seq:
        return Acquired(Admission.STALE, source=slot.seq_holder, seq=slot.seq)
    running, waiting = slot.running, slot.waiting
    victim: str | None = None
    state = _RUNNING
    if len(running) >= limit:
        busy = policy.when_busy
        if busy == "supersede":
            victim = next(iter(running))
            del running[victim]
        elif busy == "refuse":
            return Acquired(Admission.BUSY)
        elif busy != "wait":
            raise ValueError(f"a policy this backend does not know: {policy!r}")
        elif len(waiting) < policy.max_waiting:
            state = _WAITING
        elif policy.when_full == "supersede":
            state = _WAITING
            victim = next(iter(waiting))
            del waiting[victim]
        elif policy.when_full == "refuse":
            return Acquired(Admission.FULL)
        else:
            raise ValueError(f"a policy this backend does not know: {policy!r}")
    entries = slot.entries
    if not entries:
        backend._keys[key] = slot
        if backend._seqs:
            backend._seqs.pop(key, None)
    generation = next(backend._counter)
    entries[holder] = _Entry(deliver, generation, state)
    if seq is not None:
        slot.seq, slot.seq_holder = seq, holder
    (running if state == _RUNNING else waiting)[holder] = None
    if victim is not None:
        superseded = entries[victim]
        superseded.state = _SUPERSEDED
        if superseded.by is None:  # ("" : it committed, so it runs on, delivered nothing)
            superseded.by = holder
            superseded.deliver(_fast_reason(CancelKind.SUPERSEDED, holder))
    return generation if state == _RUNNING else Acquired(Admission.WAITING, generation)


def _drop(backend: MemoryBackend, key: str, holder: str) -> _Entry | None:
    """``backend.release(key, holder)`` without a coroutine (for ``LatestOnly``, as ``_admit``).

    Returns the claim's entry (``by`` names who superseded it); the in-memory backend
    delivered that supersede already, so ``LatestOnly`` does not need it.
    """
    slot = backend._keys.get(key)
    if slot is None or (entry := slot.entries.pop(holder, None)) is None:
        return None
    if entry.state == _RUNNING:
        del slot.running[holder]
        if slot.waiting:  # the oldest waiting claim takes the freed slot
            promoted = next(iter(slot.waiting))
            del slot.waiting[promoted]
            slot.entries[promoted].state = _RUNNING
            slot.running[promoted] = None
    elif entry.state == _WAITING:
        del slot.waiting[holder]
    if not slot.entries:
        del backend._keys[key]
        if slot.seq is not None:
            backend._remember(key, slot.seq, slot.seq_holder)
    if slot.changed is not None:
        slot.changed.set()
        slot.changed = None
    return entry
