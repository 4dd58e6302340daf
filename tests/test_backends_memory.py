from __future__ import annotations

import anyio
import pytest

from cancelkit import CancelKind, CancelOutcome, CancelReason, RegistryFull
from cancelkit.backends import Acquired, MemoryBackend, new_holder_id

pytestmark = pytest.mark.anyio


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[MemoryBackend, FakeClock, list[CancelReason]]:
    clock = FakeClock()
    return MemoryBackend(tombstone_ttl=10, max_tombstones=3, clock=clock), clock, []


async def test_cancel_delivers_to_the_registered_holder() -> None:
    """A cancel of a registered id calls that holder's deliver and reports CANCELLED."""
    backend, _, got = make()
    assert await backend.register("a", None, "h1", got.append) is None
    reason = CancelReason(CancelKind.REQUESTED, source="x")
    assert await backend.cancel("a", None, reason) is CancelOutcome.CANCELLED
    assert got == [reason]


async def test_tombstone_is_consumed_by_the_next_registration() -> None:
    """A cancel before registration is returned by register() once, then counts as finished."""
    backend, _, got = make()
    reason = CancelReason(CancelKind.REQUESTED, message="first")
    assert await backend.cancel("a", "u", reason) is CancelOutcome.PENDING
    assert await backend.cancel("a", "u", CancelReason(message="second")) is CancelOutcome.PENDING
    assert await backend.register("a", "u", "h1", got.append) == reason
    assert await backend.cancel("a", "u", reason) is CancelOutcome.NOT_FOUND
    assert got == []
    assert backend.statistics().registrations == 0


async def test_tombstones_and_finished_markers_expire() -> None:
    """Tombstones and finished-markers are gone once the TTL has passed on the clock."""
    backend, clock, got = make()
    await backend.cancel("a", None, CancelReason())
    await backend.register("b", None, "h1", got.append)
    await backend.unregister("b", None, "h1")
    assert backend.statistics().tombstones == backend.statistics().finished == 1
    clock.now += 9.9
    assert await backend.cancel("b", None, CancelReason()) is CancelOutcome.NOT_FOUND
    clock.now += 0.1
    stats = backend.statistics()
    assert (stats.tombstones, stats.finished) == (0, 0)
    assert await backend.register("a", None, "h2", got.append) is None
    assert await backend.cancel("b", None, CancelReason()) is CancelOutcome.PENDING


async def test_owners_are_separate_namespaces() -> None:
    """Registrations and tombstones of one owner are invisible to another."""
    backend, _, got = make()
    await backend.register("a", "alice", "h1", got.append)
    assert await backend.cancel("a", "bob", CancelReason()) is CancelOutcome.NOT_FOUND
    assert got == []
    assert backend.statistics().tombstones == 0
    assert await backend.register("a", None, "h2", got.append) is None  # same id, own space
    assert await backend.cancel("b", "bob", CancelReason()) is CancelOutcome.PENDING
    assert await backend.register("b", "alice", "h3", got.append) is None  # not bob's tombstone
    assert await backend.register("b", "bob", "h4", got.append) is not None


async def test_duplicate_registration_is_refused() -> None:
    """Registering a live (owner, id) again raises ValueError and keeps the first holder."""
    backend, _, got = make()
    await backend.register("a", None, "h1", got.append)
    with pytest.raises(ValueError, match="already running"):
        await backend.register("a", None, "h2", got.append)
    await backend.unregister("a", None, "h2")
    assert await backend.cancel("a", None, CancelReason()) is CancelOutcome.CANCELLED


async def test_tombstone_limit_raises_and_markers_make_room() -> None:
    """Only tombstones count against max_tombstones; old finished-markers are dropped."""
    backend, _, got = make()
    for name in ("m1", "m2", "m3"):
        await backend.register(name, None, name, got.append)
        await backend.unregister(name, None, name)
    assert backend.statistics().finished == 3
    for name in ("t1", "t2", "t3"):
        assert await backend.cancel(name, None, CancelReason()) is CancelOutcome.PENDING
    assert backend.statistics().finished == 0
    with pytest.raises(RegistryFull, match="max_tombstones=3") as info:
        await backend.cancel("t4", None, CancelReason())
    assert (info.value.limit, info.value.value) == ("max_tombstones", 3)
    await backend.register("m4", None, "m4", got.append)
    await backend.unregister("m4", None, "m4")
    assert backend.statistics().finished == 0  # no room: the marker made room for nothing


async def test_finished_markers_are_bounded_oldest_first() -> None:
    """Past max_tombstones finished-markers, the oldest is forgotten (its id looks unknown)."""
    backend, _, got = make()
    for name in ("m1", "m2", "m3", "m4"):
        await backend.register(name, None, name, got.append)
        await backend.unregister(name, None, name)
    assert backend.statistics().finished == 3
    assert await backend.cancel("m4", None, CancelReason()) is CancelOutcome.NOT_FOUND
    assert await backend.cancel("m1", None, CancelReason()) is CancelOutcome.PENDING


async def test_acquire_supersedes_the_previous_owner() -> None:
    """acquire() swaps the owner, tells the old one who replaced it, and raises generations."""
    backend, _, got = make()
    first = await backend.acquire("k", "h1", got.append, replace=True)
    second = await backend.acquire("k", "h2", got.append, replace=True)
    assert first is not None
    assert second is not None
    assert first == Acquired(first.generation, None)
    assert second.previous == "h1"
    assert second.generation > first.generation
    assert [(r.kind, r.source) for r in got] == [(CancelKind.SUPERSEDED, "h2")]
    assert await backend.generation("k") == second.generation


async def test_acquire_without_replace_refuses_a_held_key() -> None:
    """acquire(replace=False) changes nothing while the key has an owner."""
    backend, _, got = make()
    await backend.acquire("k", "h1", got.append, replace=False)
    assert await backend.acquire("k", "h2", got.append, replace=False) is None
    assert got == []
    await backend.release("k", "h1")
    assert await backend.acquire("k", "h2", got.append, replace=False) is not None


async def test_release_is_compare_and_delete_and_leaves_nothing() -> None:
    """Releasing a superseded holder keeps the owner; the key vanishes with its last claim."""
    backend, _, got = make()
    await backend.acquire("k", "h1", got.append, replace=True)
    acquired = await backend.acquire("k", "h2", got.append, replace=True)
    assert acquired is not None
    await backend.release("k", "h1")
    await backend.release("k", "nobody")
    assert await backend.generation("k") == acquired.generation
    await backend.release("k", "h2")
    assert await backend.generation("k") is None
    assert backend.statistics().keys == 0
    await backend.release("k", "h2")


async def test_wait_turn_waits_for_earlier_claims() -> None:
    """wait_turn() returns only after every earlier claim on the key was released."""
    backend, _, got = make()
    for holder in ("h1", "h2", "h3"):
        await backend.acquire("k", holder, got.append, replace=True)
    turns: list[str] = []

    async def wait(holder: str) -> None:
        await backend.wait_turn("k", holder)
        turns.append(holder)

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait, "h3")
        await anyio.wait_all_tasks_blocked()
        await backend.release("k", "h2")
        await anyio.wait_all_tasks_blocked()
        assert turns == []
        await backend.release("k", "h1")
    assert turns == ["h3"]
    await backend.wait_turn("k", "gone")  # a holder that is not there does not wait


def test_options_are_validated() -> None:
    """Out-of-range options raise ValueError naming the option."""
    with pytest.raises(ValueError, match="tombstone_ttl"):
        MemoryBackend(tombstone_ttl=0)
    with pytest.raises(ValueError, match="max_tombstones"):
        MemoryBackend(max_tombstones=0)


def test_repr_and_holder_ids() -> None:
    """repr() shows the state; holder ids never repeat."""
    assert "tombstone_ttl=60.0" in repr(MemoryBackend())
    assert len({new_holder_id() for _ in range(1000)}) == 1000
