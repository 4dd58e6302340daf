"""BackendContract: the rules of :class:`~cancelkit.backends.Backend`, as pytest tests."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from typing import TypeAlias

import anyio
import anyio.lowlevel
import pytest

from .._exceptions import OperationExists
from .._latest import LatestOnly
from .._policy import Policy
from .._reason import CancelKind, CancelReason
from .._registry import TokenRegistry
from .._status import OperationState, OperationStatus, Progress
from ..backends import Acquired, Admission, Backend, CancelOutcome, StatusStore, new_holder_id
from ._storms import claim_storm, outer_storm, storm

__all__ = ["BackendContract", "Delivered", "StatusStoreContract", "Stores", "Workers"]

#: Seconds a test waits for something that must happen (only a hang gets near it).
LIMIT = 10.0

#: What a :class:`BackendContract` subclass's ``workers`` fixture returns: a function that
#: makes an async context manager yielding entered backends that share one state.
Workers: TypeAlias = Callable[[], AbstractAsyncContextManager[Sequence[Backend]]]
Pair: TypeAlias = tuple[Backend, Backend]
_SUPERSEDE = Policy("supersede")
_id = new_holder_id  # fresh, and a valid operation id and key
_NEWER = "from-a-newer-version"  # a policy part this version does not know


class Delivered:
    """A ``deliver`` callback that remembers what it was given and lets a test wait for it."""

    def __init__(self) -> None:
        self.reasons: list[CancelReason] = []
        self._arrived = anyio.Event()

    def __call__(self, reason: CancelReason) -> None:
        self.reasons.append(reason)
        self._arrived.set()

    async def first(self) -> CancelReason:
        """The first reason delivered, waiting (bounded) for it."""
        with anyio.fail_after(LIMIT):
            await self._arrived.wait()
        return self.reasons[0]


def _unknown(policy: Policy, part: str) -> Policy:
    """``policy`` with ``part`` set to a value no version knows (:data:`_NEWER`).

    As a newer client could send: ``Policy`` itself refuses to be made with one.
    """
    unknown = replace(policy)
    object.__setattr__(unknown, part, _NEWER)
    return unknown


def _requested(message: str = "") -> CancelReason:
    return CancelReason(CancelKind.REQUESTED, message)


class _RegistryContract:
    """BackendContract's fixture and its TokenRegistry rules (see BackendContract)."""

    pytestmark = pytest.mark.anyio

    @pytest.fixture
    async def pair(self, workers: Workers) -> AsyncIterator[Pair]:
        """The first worker and the last (the same one for a one-process backend)."""
        async with workers() as backends:
            yield backends[0], backends[-1]

    # -- TokenRegistry: register, cancel, commit, unregister --------------------------------

    async def test_a_cancel_reaches_the_registered_holder(self, pair: Pair) -> None:
        here, there = pair
        id, delivered = _id(), Delivered()
        assert await here.register(id, "alice", new_holder_id(), delivered) is None
        reason = _requested("stop")
        assert await there.cancel(id, "alice", reason) is CancelOutcome.CANCELLED
        got = await delivered.first()
        assert (got.kind, got.message) == (CancelKind.REQUESTED, "stop")

    async def test_a_cancel_before_the_start_refuses_every_start_of_the_id(
        self, pair: Pair
    ) -> None:
        here, there = pair
        id = _id()
        assert await there.cancel(id, None, _requested("first")) is CancelOutcome.PENDING
        assert await there.cancel(id, None, _requested("second")) is CancelOutcome.PENDING
        for _ in range(2):  # a client's retried start is refused too
            reason = await here.register(id, None, new_holder_id(), Delivered())
            assert reason is not None
            assert reason.message == "first"  # the first cancel's reason wins

    async def test_owners_are_separate_namespaces(self, pair: Pair) -> None:
        here, there = pair
        id, delivered = _id(), Delivered()
        await here.register(id, "alice", new_holder_id(), delivered)
        assert await there.cancel(id, "bob", _requested()) is CancelOutcome.NOT_FOUND
        # nothing was written for bob: his own start of that id is not refused
        assert await there.register(id, "bob", new_holder_id(), Delivered()) is None
        assert delivered.reasons == []

    async def test_one_holder_per_id(self, pair: Pair) -> None:
        here, there = pair
        id = _id()
        await here.register(id, None, new_holder_id(), Delivered())
        with pytest.raises(OperationExists):
            await there.register(id, None, new_holder_id(), Delivered())

    async def test_a_finished_operation_is_not_found_and_its_id_usable_again(
        self, pair: Pair
    ) -> None:
        here, there = pair
        id, holder = _id(), new_holder_id()
        await here.register(id, None, holder, Delivered())
        assert await here.unregister(id, None, holder) is None
        assert await there.cancel(id, None, _requested()) is CancelOutcome.NOT_FOUND
        assert await there.register(id, None, new_holder_id(), Delivered()) is None

    async def test_a_finished_holder_is_delivered_nothing(self, pair: Pair) -> None:
        here, there = pair
        id, holder, old, new = _id(), new_holder_id(), Delivered(), Delivered()
        await here.register(id, None, holder, old)
        await here.unregister(id, None, holder)
        assert await there.cancel(id, None, _requested("late")) is CancelOutcome.NOT_FOUND
        await here.register(id, None, new_holder_id(), new)
        assert await there.cancel(id, None, _requested("now")) is CancelOutcome.CANCELLED
        assert (await new.first()).message == "now"  # the late cancel would have come first
        assert old.reasons == []

    async def test_unregister_by_another_holder_leaves_the_registration(self, pair: Pair) -> None:
        here, there = pair
        id, delivered = _id(), Delivered()
        await here.register(id, None, new_holder_id(), delivered)
        assert await there.unregister(id, None, new_holder_id()) is None
        with pytest.raises(OperationExists):
            await there.register(id, None, new_holder_id(), Delivered())
        assert await there.cancel(id, None, _requested()) is CancelOutcome.CANCELLED
        await delivered.first()

    async def test_unregister_reports_the_cancel_that_won(self, pair: Pair) -> None:
        here, there = pair
        id, holder = _id(), new_holder_id()
        await here.register(id, None, holder, Delivered())
        await there.cancel(id, None, _requested("late"))
        reason = await here.unregister(id, None, holder)
        assert reason is not None
        assert reason.message == "late"

    async def test_exactly_one_of_commit_and_cancel_wins(self, pair: Pair) -> None:
        here, there = pair
        committed, holder, delivered = _id(), new_holder_id(), Delivered()
        await here.register(committed, None, holder, delivered)
        assert await here.commit(committed, None, holder) is None
        assert await here.commit(committed, None, holder) is None  # idempotent
        assert await there.cancel(committed, None, _requested()) is CancelOutcome.COMMITTED
        assert await here.unregister(committed, None, holder) is None
        assert delivered.reasons == []
        cancelled, holder = _id(), new_holder_id()
        await here.register(cancelled, None, holder, Delivered())
        await there.cancel(cancelled, None, _requested("first"))
        reason = await here.commit(cancelled, None, holder)
        assert reason is not None
        assert reason.message == "first"

    async def test_a_holder_whose_id_runs_elsewhere_cannot_commit(self, pair: Pair) -> None:
        here, _ = pair
        id, gone, holder = _id(), new_holder_id(), new_holder_id()
        await here.register(id, None, gone, Delivered())
        await here.unregister(id, None, gone)
        await here.register(id, None, holder, Delivered())
        assert await here.commit(id, None, gone) is not None

    async def test_commit_against_a_cancel_at_every_step(self, pair: Pair) -> None:
        here, there = pair
        await storm(TokenRegistry(backend=here), TokenRegistry(backend=there), tag=_id())

    async def test_commit_against_an_outer_cancellation_at_every_step(self, pair: Pair) -> None:
        await outer_storm(TokenRegistry(backend=pair[0]), tag=_id())


class BackendContract(_RegistryContract):
    """The behaviour every backend must show, whatever keeps its state.

    Subclass it in a test module and give it a ``workers`` fixture: an async context manager
    factory that yields entered backends sharing one state, each standing in for a worker
    process (one is enough for a backend of one process; give two for a shared one, and the
    cross-worker rules run across them)::

        class TestMyBackend(BackendContract):
            @pytest.fixture
            def workers(self):
                return lambda: my_backends(count=2)

    Every test is an anyio test (``pytest.mark.anyio``): the ``anyio_backend`` fixture of the
    module picks the event loop. Each test uses fresh ids and keys, so a shared server needs
    no cleaning between them.
    """

    # -- LatestOnly: acquire, release, commit_claim, wait_turn, is_current ------------------

    async def test_a_newer_claim_supersedes_the_older(self, pair: Pair) -> None:
        here, there = pair
        key, old, new, delivered = _id(), new_holder_id(), new_holder_id(), Delivered()
        first = await here.acquire(key, old, delivered, policy=_SUPERSEDE, limit=1, seq=None)
        assert first.admission is Admission.RUNNING
        assert await there.is_current(key, first.generation)
        second = await there.acquire(key, new, Delivered(), policy=_SUPERSEDE, limit=1, seq=None)
        assert second.admission is Admission.RUNNING
        assert second.generation > first.generation
        got = await delivered.first()
        assert (got.kind, got.source) == (CancelKind.SUPERSEDED, new)
        assert not await here.is_current(key, first.generation)
        assert await here.is_current(key, second.generation)
        released = await here.release(key, old)
        assert released is not None
        assert released.source == new
        assert await there.release(key, new) is None
        assert not await here.is_current(key, second.generation)

    async def test_refuse_leaves_nothing_behind(self, pair: Pair) -> None:
        here, there = pair
        key, holder = _id(), new_holder_id()
        refuse = Policy("refuse")
        await here.acquire(key, holder, Delivered(), policy=refuse, limit=1, seq=None)
        busy = await there.acquire(
            key, new_holder_id(), Delivered(), policy=refuse, limit=1, seq=None
        )
        assert busy == Acquired(Admission.BUSY)
        await here.release(key, holder)
        again = await there.acquire(
            key, new_holder_id(), Delivered(), policy=refuse, limit=1, seq=None
        )
        assert again.admission is Admission.RUNNING

    async def test_a_waiting_claim_runs_when_the_running_one_is_released(self, pair: Pair) -> None:
        here, there = pair
        key, first, second = _id(), new_holder_id(), new_holder_id()
        wait = Policy("wait", max_waiting=1)
        await here.acquire(key, first, Delivered(), policy=wait, limit=1, seq=None)
        queued = await there.acquire(key, second, Delivered(), policy=wait, limit=1, seq=None)
        assert queued.admission is Admission.WAITING
        assert not await there.is_current(key, queued.generation)
        full = await there.acquire(
            key, new_holder_id(), Delivered(), policy=wait, limit=1, seq=None
        )
        assert full == Acquired(Admission.FULL)
        async with anyio.create_task_group() as tg:
            turn = anyio.Event()

            async def waits() -> None:
                await there.wait_turn(key, second, handover=False)
                turn.set()

            tg.start_soon(waits)
            await anyio.wait_all_tasks_blocked()
            assert not turn.is_set()
            await here.release(key, first)
            with anyio.fail_after(LIMIT):
                await turn.wait()
        assert await here.is_current(key, queued.generation)
        await there.release(key, second)

    async def test_a_full_queue_can_supersede_its_oldest_waiter(self, pair: Pair) -> None:
        here, there = pair
        key, running, oldest, newest = (_id(), *(new_holder_id() for _ in range(3)))
        policy = Policy("wait", when_full="supersede", max_waiting=1)
        delivered = Delivered()
        await here.acquire(key, running, Delivered(), policy=policy, limit=1, seq=None)
        await here.acquire(key, oldest, delivered, policy=policy, limit=1, seq=None)
        last = await there.acquire(key, newest, Delivered(), policy=policy, limit=1, seq=None)
        assert last.admission is Admission.WAITING
        got = await delivered.first()
        assert (got.kind, got.source) == (CancelKind.SUPERSEDED, newest)
        for backend, holder in ((here, oldest), (here, running), (there, newest)):
            await backend.release(key, holder)

    async def test_a_policy_part_it_does_not_know_is_refused(self, pair: Pair) -> None:
        """An unknown ``when_busy`` or ``when_full`` raises ``ValueError`` naming it.

        At the latest where the backend would branch on it; nothing is recorded: it is not
        taken for a part the backend knows (say, queued).
        """
        here, there = pair
        key, wait = _id(), Policy("wait", max_waiting=1)
        holders = [new_holder_id(), new_holder_id()]  # one runs, then one waits
        for holder, part in zip(holders, ("when_busy", "when_full"), strict=True):
            await here.acquire(key, holder, Delivered(), policy=wait, limit=1, seq=None)
            unknown = _unknown(wait, part)  # the key busy, then its queue full: part decides
            with pytest.raises(ValueError, match=_NEWER):
                await there.acquire(
                    key, new_holder_id(), Delivered(), policy=unknown, limit=1, seq=None
                )
        for holder in holders:
            await here.release(key, holder)
        again = await there.acquire(
            key, new_holder_id(), Delivered(), policy=Policy("refuse"), limit=1, seq=None
        )
        assert again.admission is Admission.RUNNING  # neither refused claim was left queued

    async def test_the_oldest_waiting_claim_runs_next(self, pair: Pair) -> None:
        here, there = pair
        key, running, oldest, newest = (_id(), *(new_holder_id() for _ in range(3)))
        wait = Policy("wait", max_waiting=2)
        await here.acquire(key, running, Delivered(), policy=wait, limit=1, seq=None)
        first = await there.acquire(key, oldest, Delivered(), policy=wait, limit=1, seq=None)
        second = await here.acquire(key, newest, Delivered(), policy=wait, limit=1, seq=None)
        await here.release(key, running)
        assert await there.is_current(key, first.generation)
        assert not await here.is_current(key, second.generation)
        for backend, holder in ((there, oldest), (here, newest)):
            await backend.release(key, holder)

    async def test_the_oldest_running_claim_is_superseded(self, pair: Pair) -> None:
        here, there = pair
        key, oldest, newer, newest = (_id(), *(new_holder_id() for _ in range(3)))
        old, new = Delivered(), Delivered()
        await here.acquire(key, oldest, old, policy=_SUPERSEDE, limit=2, seq=None)
        kept = await there.acquire(key, newer, new, policy=_SUPERSEDE, limit=2, seq=None)
        await there.acquire(key, newest, Delivered(), policy=_SUPERSEDE, limit=2, seq=None)
        assert await here.is_current(key, kept.generation)  # (checked first: no wait)
        got = await old.first()
        assert (got.kind, got.source) == (CancelKind.SUPERSEDED, newest)
        assert new.reasons == []
        for backend, holder in ((here, oldest), (there, newer), (there, newest)):
            await backend.release(key, holder)

    async def test_limit_claims_run_at_once(self, pair: Pair) -> None:
        here, there = pair
        key, holders = _id(), [new_holder_id() for _ in range(3)]
        refuse = Policy("refuse")
        answers = [
            await (here, there)[i % 2].acquire(
                key, holder, Delivered(), policy=refuse, limit=2, seq=None
            )
            for i, holder in enumerate(holders)
        ]
        running, busy = Admission.RUNNING, Admission.BUSY
        assert [a.admission for a in answers] == [running, running, busy]
        for i, holder in enumerate(holders[:2]):
            await (here, there)[i % 2].release(key, holder)

    async def test_an_older_sequence_number_is_stale_and_changes_nothing(self, pair: Pair) -> None:
        here, there = pair
        key, newer, older, delivered = _id(), new_holder_id(), new_holder_id(), Delivered()
        kept = await here.acquire(key, newer, delivered, policy=_SUPERSEDE, limit=1, seq=5)
        stale = await there.acquire(key, older, Delivered(), policy=_SUPERSEDE, limit=1, seq=5)
        assert stale == Acquired(Admission.STALE, source=newer, seq=5)
        assert await here.is_current(key, kept.generation)
        await here.release(key, newer)
        # remembered after the release too: a late older request is still stale
        late = await there.acquire(key, older, Delivered(), policy=_SUPERSEDE, limit=1, seq=4)
        assert late.admission is Admission.STALE
        assert delivered.reasons == []

    async def test_a_committed_claim_is_superseded_but_never_interrupted(self, pair: Pair) -> None:
        here, there = pair
        key, old, new = _id(), new_holder_id(), new_holder_id()
        first = await here.acquire(key, old, Delivered(), policy=_SUPERSEDE, limit=1, seq=None)
        assert await here.commit_claim(key, old) is None
        assert await here.commit_claim(key, old) is None  # idempotent
        second = await there.acquire(key, new, Delivered(), policy=_SUPERSEDE, limit=1, seq=None)
        assert second.admission is Admission.RUNNING  # the slot goes to the newcomer
        assert not await here.is_current(key, first.generation)
        await here.release(key, old)  # (a SUPERSEDED reason here is ignored: it committed)
        late = await there.commit_claim(key, new_holder_id())  # no longer recorded: lost
        assert late is not None
        assert late.kind is CancelKind.SUPERSEDED
        await there.release(key, new)

    async def test_a_committed_body_runs_to_its_end_through_latest_only(self, pair: Pair) -> None:
        here, there = pair
        key, ended = _id(), []
        first, second = LatestOnly(backend=here), LatestOnly(backend=there)
        committed, superseded = anyio.Event(), anyio.Event()

        async def body() -> None:
            async with first.claim(key) as claim:
                await claim.commit()
                committed.set()
                await superseded.wait()
                await anyio.lowlevel.checkpoint()  # a delivery would interrupt here
                ended.append("completed")

        with anyio.fail_after(LIMIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(body)
                await committed.wait()
                async with second.claim(key):
                    superseded.set()
        assert ended == ["completed"]

    async def test_a_claims_commit_against_a_newer_claim_at_every_step(self, pair: Pair) -> None:
        here, there = pair
        await claim_storm(LatestOnly(backend=here), LatestOnly(backend=there), tag=_id())

    async def test_a_superseded_claim_cannot_commit(self, pair: Pair) -> None:
        here, there = pair
        key, old, new = _id(), new_holder_id(), new_holder_id()
        await here.acquire(key, old, Delivered(), policy=_SUPERSEDE, limit=1, seq=None)
        await there.acquire(key, new, Delivered(), policy=_SUPERSEDE, limit=1, seq=None)
        reason = await here.commit_claim(key, old)
        assert reason is not None
        assert (reason.kind, reason.source) == (CancelKind.SUPERSEDED, new)
        await here.release(key, old)
        await there.release(key, new)

    async def test_handover_waits_for_the_older_claim_to_be_released(self, pair: Pair) -> None:
        here, there = pair
        key, old, new = _id(), new_holder_id(), new_holder_id()
        await here.acquire(key, old, Delivered(), policy=_SUPERSEDE, limit=1, seq=None)
        await there.acquire(key, new, Delivered(), policy=_SUPERSEDE, limit=1, seq=None)
        await there.wait_turn(key, new, handover=False)  # it runs: no handover, no wait
        async with anyio.create_task_group() as tg:
            turn = anyio.Event()

            async def waits() -> None:
                await there.wait_turn(key, new, handover=True)
                turn.set()

            tg.start_soon(waits)
            await anyio.wait_all_tasks_blocked()
            assert not turn.is_set()  # the superseded body is still cleaning up
            await here.release(key, old)
            with anyio.fail_after(LIMIT):
                await turn.wait()
        await there.wait_turn(key, new_holder_id(), handover=True)  # unknown: at once
        await there.release(key, new)


#: What a :class:`StatusStoreContract` subclass's ``stores`` fixture returns: a function that
#: makes an async context manager yielding entered status stores that share one state.
Stores: TypeAlias = Callable[[], AbstractAsyncContextManager[Sequence[StatusStore]]]


class StatusStoreContract:
    """The behaviour every :class:`~cancelkit.StatusStore` must show.

    Subclass it with a ``stores`` fixture, as :class:`BackendContract` with ``workers``: the
    stores it yields share one state (two stand in for two workers; statuses are written
    by the first and read by the last).
    """

    pytestmark = pytest.mark.anyio

    @pytest.fixture
    async def two(self, stores: Stores) -> AsyncIterator[tuple[StatusStore, StatusStore]]:
        """The first store and the last (the same one for a store of one process)."""
        async with stores() as entered:
            yield entered[0], entered[-1]

    async def test_a_status_reads_back_in_its_owners_namespace_only(
        self, two: tuple[StatusStore, StatusStore]
    ) -> None:
        writer, reader = two
        id = _id()
        status = _running(writer, id, "al:ice", done=3)
        await writer.put(status)
        assert await reader.get(id, "al:ice") == status
        assert await reader.get(id, None) is None
        assert await reader.get(id, "al") is None
        # names do not run into each other: owner "al", id "ice:<id>" is another operation
        assert await reader.get(f"ice:{id}", "al") is None
        assert await reader.get(_id(), "al:ice") is None

    async def test_the_end_replaces_the_running_status_and_a_late_running_write_does_not(
        self, two: tuple[StatusStore, StatusStore]
    ) -> None:
        writer, reader = two
        id = _id()
        running = _running(writer, id, None, done=1)
        await writer.put(running)
        ended = replace(running, state=OperationState.COMPLETED, ended_at=time.time(), result=7)
        await writer.put(ended)
        assert await reader.get(id, None) == ended
        await writer.put(replace(running, progress=Progress(2.0)))  # late, of the same run
        assert await reader.get(id, None) == ended

    async def test_a_new_run_of_an_ended_id_replaces_its_status(
        self, two: tuple[StatusStore, StatusStore]
    ) -> None:
        writer, reader = two
        id = _id()
        first = _running(writer, id, None, done=1)
        await writer.put(replace(first, state=OperationState.FAILED, ended_at=time.time()))
        again = replace(first, started_at=first.started_at + 1)  # another run
        await writer.put(again)
        read = await reader.get(id, None)
        assert read is not None
        assert (read.state, read.started_at) == (OperationState.RUNNING, again.started_at)


def _running(store: StatusStore, id: str, owner: str | None, *, done: int) -> OperationStatus:
    return OperationStatus(
        id,
        owner,
        OperationState.RUNNING,
        time.time(),
        progress=Progress(done, 10),
        worker=store.worker,
    )
