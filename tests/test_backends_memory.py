from __future__ import annotations

import dataclasses

import anyio
import pytest

from cancelkit import CancelKind, CancelOutcome, CancelReason, OperationExists, RegistryFull
from cancelkit._policy import PolicyName
from cancelkit.backends import Acquired, Admission, MemoryBackend, Policy, new_holder_id

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


async def test_a_tombstone_refuses_every_start_until_it_expires() -> None:
    """A cancel before registration refuses that start and every retry until the TTL ends."""
    backend, clock, got = make()
    reason = CancelReason(CancelKind.REQUESTED, message="first")
    assert await backend.cancel("a", "u", reason) is CancelOutcome.PENDING
    assert await backend.cancel("a", "u", CancelReason(message="second")) is CancelOutcome.PENDING
    assert await backend.register("a", "u", "h1", got.append) == reason
    assert await backend.register("a", "u", "h2", got.append) == reason  # a retried start
    assert await backend.cancel("a", "u", reason) is CancelOutcome.PENDING
    assert got == []
    assert backend.statistics().registrations == 0
    clock.now += 10  # the tombstone TTL
    assert await backend.register("a", "u", "h3", got.append) is None  # expired: it runs


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
    with pytest.raises(OperationExists, match="already running"):
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


async def acquire(
    backend: MemoryBackend,
    holder: str,
    got: list[CancelReason],
    policy: PolicyName = "replace",
    limit: int = 1,
    seq: int | None = None,
    max_waiting: int | None = None,
) -> Acquired:
    preset = Policy.named(policy)
    if max_waiting is not None:
        preset = dataclasses.replace(preset, max_waiting=max_waiting)
    return await backend.acquire("k", holder, got.append, policy=preset, limit=limit, seq=seq)


async def test_acquire_supersedes_the_oldest_running_claim() -> None:
    """replace: past the limit, the oldest running claim is told who superseded it."""
    backend, _, got = make()
    first = await acquire(backend, "h1", got, limit=2)
    second = await acquire(backend, "h2", got, limit=2)
    assert got == []
    third = await acquire(backend, "h3", got, limit=2)
    assert first.admission is second.admission is third.admission is Admission.RUNNING
    assert first.generation < second.generation < third.generation
    assert [(r.kind, r.source) for r in got] == [(CancelKind.SUPERSEDED, "h3")]
    assert not await backend.is_current("k", first.generation)
    assert await backend.is_current("k", second.generation)
    assert await backend.is_current("k", third.generation)


async def test_acquire_answers_equal_public_values() -> None:
    """acquire's answers (made without the dataclass __init__ when running) are plain Acquired."""
    backend, _, got = make()
    running = await acquire(backend, "h1", got, "keep_latest")
    assert type(running) is Acquired
    assert running == Acquired(Admission.RUNNING, running.generation)
    assert hash(running) == hash(Acquired(Admission.RUNNING, running.generation))
    assert repr(running) == repr(Acquired(Admission.RUNNING, running.generation))
    with pytest.raises(AttributeError):
        running.generation = 0  # type: ignore[misc]
    waiting = await acquire(backend, "h2", got, "keep_latest")
    assert waiting == Acquired(Admission.WAITING, waiting.generation)


async def test_reject_refuses_past_the_limit() -> None:
    """reject: with the limit reached, a newcomer is BUSY and nothing changes."""
    backend, _, got = make()
    await acquire(backend, "h1", got, "reject")
    assert (await acquire(backend, "h2", got, "reject")).admission is Admission.BUSY
    assert got == []
    await backend.release("k", "h1")
    assert (await acquire(backend, "h2", got, "reject")).admission is Admission.RUNNING


async def test_keep_latest_keeps_only_the_newest_waiter() -> None:
    """keep_latest: a newcomer waits; the waiter it displaces is superseded; release promotes."""
    backend, _, got = make()
    await acquire(backend, "h1", got, "keep_latest")
    assert (await acquire(backend, "h2", got, "keep_latest")).admission is Admission.WAITING
    last = await acquire(backend, "h3", got, "keep_latest")
    assert last.admission is Admission.WAITING
    assert [(r.kind, r.source) for r in got] == [(CancelKind.SUPERSEDED, "h3")]
    assert not await backend.is_current("k", last.generation)
    await backend.release("k", "h2")
    await backend.release("k", "h1")
    assert await backend.is_current("k", last.generation)


async def test_enqueue_is_fifo_and_bounded() -> None:
    """enqueue: newcomers wait in order; past max_waiting they are refused FULL."""
    backend, _, got = make()
    await acquire(backend, "h1", got, "enqueue", max_waiting=2)
    waiting = [await acquire(backend, h, got, "enqueue", max_waiting=2) for h in ("h2", "h3")]
    assert [w.admission for w in waiting] == [Admission.WAITING] * 2
    assert (await acquire(backend, "h4", got, "enqueue", max_waiting=2)).admission is (
        Admission.FULL
    )
    await backend.release("k", "h1")
    assert await backend.is_current("k", waiting[0].generation)
    assert not await backend.is_current("k", waiting[1].generation)
    assert got == []


async def test_a_stale_sequence_number_changes_nothing() -> None:
    """A seq not above the newest is STALE (naming the newest and its holder); nobody is told."""
    backend, _, got = make()
    await acquire(backend, "h1", got, seq=5)
    assert await acquire(backend, "h2", got, seq=3) == Acquired(Admission.STALE, source="h1", seq=5)
    assert (await acquire(backend, "h3", got, seq=5)).admission is Admission.STALE  # equal
    assert got == []
    assert (await acquire(backend, "h4", got)).admission is Admission.RUNNING  # no seq
    newer = await acquire(backend, "h5", got, seq=6)
    assert newer.admission is Admission.RUNNING
    assert [r.source for r in got] == ["h4", "h5"]


async def test_the_newest_seq_outlives_the_key_for_a_while() -> None:
    """After release only the seq is left; it expires after seq_ttl and is bounded in count."""
    clock = FakeClock()
    backend = MemoryBackend(seq_ttl=5, max_seq_keys=2, clock=clock)
    got: list[CancelReason] = []
    await acquire(backend, "h1", got, seq=7)
    await backend.release("k", "h1")
    assert backend.statistics().keys == 0
    assert backend.statistics().sequences == 1
    assert (await acquire(backend, "h2", got, seq=7)).admission is Admission.STALE
    clock.now += 5
    assert backend.statistics().sequences == 0
    assert (await acquire(backend, "h3", got, seq=1)).admission is Admission.RUNNING
    await backend.release("k", "h3")
    for key in ("x", "y"):
        await backend.acquire(key, key, got.append, policy=Policy("supersede"), limit=1, seq=9)
        await backend.release(key, key)
    assert backend.statistics().sequences == 2  # "k" was forgotten first
    assert (await acquire(backend, "h4", got, seq=0)).admission is Admission.RUNNING


async def test_release_is_compare_and_delete_and_leaves_nothing() -> None:
    """Releasing a superseded holder keeps the newest current; the key vanishes with its last."""
    backend, _, got = make()
    await acquire(backend, "h1", got)
    acquired = await acquire(backend, "h2", got)
    await backend.release("k", "h1")
    await backend.release("k", "nobody")
    assert await backend.is_current("k", acquired.generation)
    await backend.release("k", "h2")
    assert not await backend.is_current("k", acquired.generation)
    assert backend.statistics().keys == 0
    await backend.release("k", "h2")


async def test_wait_turn_with_handover_waits_for_earlier_claims() -> None:
    """wait_turn(handover=True) returns once fewer than `limit` earlier claims are unreleased."""
    backend, _, got = make()
    for holder in ("h1", "h2", "h3"):
        await acquire(backend, holder, got, limit=2)
    turns: list[str] = []

    async def wait(holder: str) -> None:
        await backend.wait_turn("k", holder, handover=True)
        turns.append(holder)

    await backend.wait_turn("k", "h3", handover=False)  # running: no handover, no wait
    async with anyio.create_task_group() as tg:
        tg.start_soon(wait, "h3")
        await anyio.wait_all_tasks_blocked()
        assert turns == []
        await backend.release("k", "h2")
    assert turns == ["h3"]
    await backend.wait_turn("k", "gone", handover=True)  # a holder that is not there


def test_options_are_validated() -> None:
    """Out-of-range options raise ValueError naming the option."""
    with pytest.raises(ValueError, match="tombstone_ttl"):
        MemoryBackend(tombstone_ttl=0)
    with pytest.raises(ValueError, match="max_tombstones"):
        MemoryBackend(max_tombstones=0)
    with pytest.raises(ValueError, match="seq_ttl"):
        MemoryBackend(seq_ttl=0)
    with pytest.raises(ValueError, match="max_seq_keys"):
        MemoryBackend(max_seq_keys=0)


def test_repr_and_holder_ids() -> None:
    """repr() shows the state; holder ids never repeat."""
    assert "tombstone_ttl=60.0" in repr(MemoryBackend())
    assert len({new_holder_id() for _ in range(1000)}) == 1000
