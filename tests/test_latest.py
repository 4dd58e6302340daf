from __future__ import annotations

import math
from concurrent.futures import Future
from typing import Any

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from cancelkit import (
    CancelKind,
    Claim,
    LatestOnly,
    OperationCancelled,
    SlotBusy,
    current_token,
)
from cancelkit.backends import MemoryBackend
from cancelkit.testing._storms import claim_storm

pytestmark = pytest.mark.anyio


def empty(slot: LatestOnly) -> bool:
    backend = slot.backend
    assert isinstance(backend, MemoryBackend)
    stats = slot.statistics()
    return backend.statistics().keys == 0 and stats.running == stats.waiting == 0


class Bodies:
    """Counts bodies (including their cleanup) running at once, per key."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.started: list[str] = []
        self.completed: list[str] = []
        self.superseded: list[tuple[str, str | None]] = []

    async def run(self, slot: LatestOnly, name: str, hold: anyio.Event, key: str = "k") -> None:
        try:
            async with slot.claim(key):
                self.running += 1
                self.most = max(self.most, self.running)
                self.started.append(name)
                try:
                    await hold.wait()
                    self.completed.append(name)
                finally:
                    with anyio.CancelScope(shield=True):
                        await anyio.lowlevel.checkpoint()  # cleanup that takes a turn
                    self.running -= 1
        except OperationCancelled as exc:
            if exc.reason.kind is not CancelKind.SUPERSEDED:
                raise
            self.superseded.append((name, exc.reason.source))


async def test_newer_claim_supersedes_the_running_one() -> None:
    """replace: the old body gets SUPERSEDED with the newcomer's id as source; slot empties."""
    slot = LatestOnly()
    bodies, hold = Bodies(), anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(bodies.run, slot, "old", hold)
        await anyio.wait_all_tasks_blocked()
        async with slot.claim("k") as claim:
            assert current_token() is claim.token
            await anyio.wait_all_tasks_blocked()
            assert bodies.superseded == [("old", claim.id)]
    assert empty(slot)
    assert slot.statistics().superseded == 1


async def test_different_keys_do_not_interfere() -> None:
    """A claim only supersedes claims on the same key."""
    slot = LatestOnly()
    async with slot.claim("a") as a, slot.claim("b"):
        assert not a.token.cancelled


async def test_generations_fence_stale_work() -> None:
    """Each claim gets a larger generation; only the newest one is current."""
    slot = LatestOnly()
    with pytest.raises(OperationCancelled):  # the first ends superseded, not as a success
        async with slot.claim("k") as first:
            async with slot.claim("k") as second:
                assert second.generation > first.generation
                assert await slot.is_current("k", second.generation)
                assert not await slot.is_current("k", first.generation)
            assert first.token.cancelled
            assert not await slot.is_current("k", first.generation)
    assert not await slot.is_current("k", second.generation)
    async with slot.claim("k") as third:
        assert third.generation > second.generation


async def test_supersede_storm_leaves_only_the_newest() -> None:
    """Hundreds of claims on one key: only the newest body completes, the rest are superseded."""
    slot = LatestOnly()
    bodies, hold = Bodies(), anyio.Event()
    async with anyio.create_task_group() as tg:
        for i in range(300):
            tg.start_soon(bodies.run, slot, str(i), hold)
        await anyio.wait_all_tasks_blocked()
        hold.set()
    assert len(bodies.completed) == 1
    assert len(bodies.superseded) == 299
    assert bodies.completed[0] not in {name for name, _ in bodies.superseded}
    assert slot.statistics().superseded == 299
    assert empty(slot)


async def test_reject_refuses_newcomers_while_held() -> None:
    """reject: a second claim raises SlotBusy naming the key; the first goes on."""
    slot = LatestOnly(policy="reject")
    async with slot.claim("k") as first:
        with pytest.raises(SlotBusy, match="'k'") as info:
            async with slot.claim("k"):
                pass
        assert info.value.key == "k"
        assert not first.token.cancelled
    async with slot.claim("k"):
        pass
    assert slot.statistics().rejected == 1
    assert empty(slot)


async def test_keep_latest_lets_the_current_finish_and_runs_only_the_newest() -> None:
    """keep_latest: the running body finishes, the middle waiters never start, the last runs."""
    slot = LatestOnly(policy="keep_latest")
    bodies = Bodies()
    holds = [anyio.Event() for _ in range(4)]
    async with anyio.create_task_group() as tg:
        for i, hold in enumerate(holds):
            tg.start_soon(bodies.run, slot, str(i), hold)
            await anyio.wait_all_tasks_blocked()
        assert bodies.started == ["0"]
        for hold in holds:
            hold.set()
    assert bodies.started == ["0", "3"]
    assert bodies.completed == ["0", "3"]
    assert sorted(name for name, _ in bodies.superseded) == ["1", "2"]
    assert bodies.most == 1
    assert empty(slot)


async def test_debounced_claim_superseded_while_waiting_never_starts() -> None:
    """debounce: a claim replaced during its wait never runs its body."""
    slot = LatestOnly(debounce=3600)  # longer than any test: no wait may end by time
    bodies, hold = Bodies(), anyio.Event()
    hold.set()
    async with anyio.create_task_group() as tg:
        tg.start_soon(bodies.run, slot, "first", hold)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(bodies.run, slot, "second", hold)
        await anyio.wait_all_tasks_blocked()
        assert [name for name, _ in bodies.superseded] == ["first"]
        assert slot.statistics().waiting == 1  # the second still debounces
        tg.cancel_scope.cancel()
    assert bodies.started == []
    assert empty(slot)


@pytest.mark.parametrize("policy", ["replace", "keep_latest"])
async def test_handover_bodies_never_overlap(policy: Any) -> None:
    """With a handover wait, a newcomer starts only after earlier bodies and cleanup exit."""
    slot = LatestOnly(policy=policy, handover_timeout=math.inf)
    bodies = Bodies()
    holds = [anyio.Event() for _ in range(50)]
    async with anyio.create_task_group() as tg:
        for i, hold in enumerate(holds):
            tg.start_soon(bodies.run, slot, str(i), hold)
            if i % 7 == 0:
                await anyio.wait_all_tasks_blocked()
        await anyio.wait_all_tasks_blocked()
        for hold in holds:
            hold.set()
    assert bodies.most == 1
    assert len(bodies.completed) + len(bodies.superseded) == len(holds)
    if policy == "replace":
        assert len(bodies.completed) == 1
    assert empty(slot)


async def test_without_handover_a_newcomer_may_overlap_the_old_cleanup() -> None:
    """Without handover_timeout, the newcomer starts while the old body is still cleaning up."""
    slot = LatestOnly()
    bodies = Bodies()
    async with anyio.create_task_group() as tg:
        tg.start_soon(bodies.run, slot, "old", anyio.Event())
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(bodies.run, slot, "new", anyio.Event())
        await anyio.wait_all_tasks_blocked()
        assert bodies.most == 2
        tg.cancel_scope.cancel()


async def test_handover_timeout_raises_slot_busy() -> None:
    """If the previous body does not exit within handover_timeout, the newcomer gets SlotBusy."""
    slot = LatestOnly(handover_timeout=0.01)
    in_cleanup, release = anyio.Event(), anyio.Event()

    async def slow_cleanup() -> None:
        async with slot.claim("k"):
            try:
                await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True), anyio.fail_after(30):
                    in_cleanup.set()
                    await release.wait()

    async def stubborn() -> None:
        with pytest.raises(OperationCancelled):
            await slow_cleanup()

    async def newcomer() -> None:
        async with slot.claim("k"):
            pytest.fail("the body must not start while the old one runs")

    async with anyio.create_task_group() as tg:
        tg.start_soon(stubborn)
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(SlotBusy, match="did not come in time"):
            await newcomer()
        assert in_cleanup.is_set()
        release.set()
    assert empty(slot)


async def test_outer_cancellation_propagates_and_releases() -> None:
    """Someone else's cancel scope stops a claim as itself and the key is freed."""
    slot = LatestOnly()
    with anyio.CancelScope() as outer:
        async with slot.claim("k") as claim:
            outer.cancel()
            await anyio.sleep_forever()
    assert outer.cancelled_caught
    assert not claim.token.cancelled
    assert empty(slot)


async def test_outer_cancellation_wins_when_it_coincides_with_a_supersede() -> None:
    """An outer cancel in the same instant as a supersede propagates as the outer one."""
    slot = LatestOnly()
    seen: list[BaseException] = []
    outer = anyio.CancelScope()

    async def old() -> None:
        with outer:
            try:
                async with slot.claim("k"):
                    await anyio.sleep_forever()
            except BaseException as exc:
                seen.append(exc)
                raise

    async with anyio.create_task_group() as tg:
        tg.start_soon(old)
        await anyio.wait_all_tasks_blocked()
        outer.cancel()
        async with slot.claim("k"):
            await anyio.wait_all_tasks_blocked()
    assert outer.cancelled_caught
    assert not isinstance(seen[0], OperationCancelled)
    assert slot.statistics().superseded == 1
    assert empty(slot)


async def test_supersede_during_cleanup_lets_the_cleanup_finish() -> None:
    """A supersede arriving during the body's shielded cleanup does not cut it short."""
    slot = LatestOnly()
    in_cleanup, proceed = anyio.Event(), anyio.Event()
    done: list[str] = []

    async def old() -> None:
        with pytest.raises(OperationCancelled):  # superseded before it ended: not a success
            async with slot.claim("k"):
                try:
                    pass
                finally:
                    with anyio.CancelScope(shield=True), anyio.fail_after(30):
                        in_cleanup.set()
                        await proceed.wait()
                        done.append("cleanup")

    async with anyio.create_task_group() as tg:
        tg.start_soon(old)
        await in_cleanup.wait()
        async with slot.claim("k"):
            proceed.set()
    assert done == ["cleanup"]
    assert empty(slot)


async def test_cancel_from_another_thread() -> None:
    """token.cancel() from a worker thread interrupts the claim's body."""
    slot = LatestOnly()

    async def body() -> None:
        async with slot.claim("k") as claim:
            await anyio.to_thread.run_sync(claim.token.cancel)
            await anyio.sleep_forever()

    with pytest.raises(OperationCancelled) as info:
        await body()
    assert info.value.reason.kind is CancelKind.REQUESTED
    assert empty(slot)


@pytest.mark.parametrize(
    ("key", "error", "match"),
    [
        ("", ValueError, "1 to 256"),
        ("k" * 257, ValueError, "1 to 256"),
        (3, TypeError, "str"),
        ("file-\udcff.csv", ValueError, "lone surrogate"),  # os.listdir's undecodable bytes
    ],
)
async def test_bad_keys_are_refused(key: Any, error: type[Exception], match: str) -> None:
    """Keys must be non-empty strings of at most 256 characters that UTF-8 can encode."""
    with pytest.raises(error, match=match):
        async with LatestOnly().claim(key):
            pass


def test_bad_options_are_refused() -> None:
    """Unknown policies and negative times raise ValueError naming the option."""
    with pytest.raises(ValueError, match="unknown policy 'newest'"):
        LatestOnly(policy="newest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="debounce"):
        LatestOnly(debounce=-1)
    with pytest.raises(ValueError, match="handover_timeout"):
        LatestOnly(handover_timeout=math.nan)


async def test_repr_and_statistics() -> None:
    """repr() shows policy and activity; statistics() counts claims."""
    slot = LatestOnly(policy="keep_latest", max_concurrency=2)
    assert "policy='keep_latest' max_concurrency=2" in repr(slot)
    async with slot.claim("k", seq=4) as claim:
        assert "running=1 waiting=0" in repr(slot)
        assert "seq=4" in repr(claim)
        assert "running" in repr(claim)
        assert claim.started
        assert isinstance(claim, Claim)
    stats = slot.statistics()
    assert (stats.running, stats.waiting, stats.claimed) == (0, 0, 1)
    assert (stats.superseded, stats.stale, stats.rejected) == (0, 0, 0)


# -- stateful: the slot against a plain model ------------------------------------------

KEYS = st.sampled_from(["a", "b"])


class SlotMachine(RuleBasedStateMachine):
    backend_name = "asyncio"
    policy: Any = "replace"

    def __init__(self) -> None:
        super().__init__()
        self.portal_cm = start_blocking_portal(self.backend_name)
        self.portal: BlockingPortal = self.portal_cm.__enter__()
        self.slot = LatestOnly(policy=self.policy)
        self.holders: dict[str, tuple[anyio.Event, Future[Any], Claim]] = {}
        self.old: list[tuple[str, int]] = []

    def teardown(self) -> None:
        for event, _, _ in self.holders.values():
            self.portal.call(event.set)
        self.portal_cm.__exit__(None, None, None)

    async def _work(self, key: str, event: anyio.Event, *, task_status: Any) -> None:
        async with self.slot.claim(key) as claim:
            task_status.started(claim)
            await event.wait()

    @rule(key=KEYS)
    def claim(self, key: str) -> None:
        event = self.portal.call(anyio.Event)
        if key in self.holders and self.policy == "reject":
            with pytest.raises(SlotBusy):
                self.portal.start_task(self._work, key, event)
            return
        future, claim = self.portal.start_task(self._work, key, event)
        if key in self.holders:
            _, old_future, old_claim = self.holders[key]
            with pytest.raises(OperationCancelled) as info:
                old_future.result()
            assert info.value.reason.source == claim.id
            self.old.append((key, old_claim.generation))
        self.holders[key] = (event, future, claim)

    @precondition(lambda self: bool(self.holders))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.holders)))
        event, future, claim = self.holders.pop(key)
        self.portal.call(event.set)
        future.result()
        self.old.append((key, claim.generation))

    @invariant()
    def only_holders_are_current(self) -> None:
        for key, (_, _, claim) in self.holders.items():
            assert self.portal.call(self.slot.is_current, key, claim.generation)
        for key, generation in self.old[-5:]:
            assert not self.portal.call(self.slot.is_current, key, generation)
        backend = self.slot.backend
        assert isinstance(backend, MemoryBackend)
        assert backend.statistics().keys == len(self.holders)


@pytest.mark.parametrize("backend_name", ["asyncio", "trio"])
@pytest.mark.parametrize("policy", ["replace", "reject"])
def test_slot_matches_a_model(backend_name: str, policy: str) -> None:
    """Random claim/finish sequences: one holder per key, only holders current, no key leaks."""
    run_state_machine_as_test(
        type("SlotMachineOn", (SlotMachine,), {"backend_name": backend_name, "policy": policy}),
        settings=settings(max_examples=30, stateful_step_count=25, deadline=None),
    )


async def test_hold_only_signals_the_body() -> None:
    """hold(): a superseded body keeps running, its token says 'superseded'."""
    slot = LatestOnly()
    go_on = anyio.Event()
    seen: list[str] = []

    async def old() -> None:
        with pytest.raises(OperationCancelled):  # it ended; the answer is the supersede's
            async with slot.hold("k") as claim:
                await go_on.wait()  # not interrupted
                assert claim.token.reason is not None
                seen.append(claim.token.reason.kind.value)

    async with anyio.create_task_group() as tg:
        tg.start_soon(old)
        await anyio.wait_all_tasks_blocked()
        async with slot.claim("k"):
            go_on.set()
    assert seen == ["superseded"]
    assert empty(slot)


async def test_hold_still_never_starts_a_debounced_loser() -> None:
    """hold() leaves the debounce interruptible: a replaced claim never starts."""
    slot = LatestOnly(debounce=3600)  # longer than any test: no wait may end by time
    started: list[str] = []
    outcomes: list[str] = []

    async def claim(name: str) -> None:
        try:
            async with slot.hold("k"):
                started.append(name)  # pragma: no cover - must not run
        except OperationCancelled as exc:
            outcomes.append(f"{name} {exc.reason.kind.value}")

    async with anyio.create_task_group() as tg:
        tg.start_soon(claim, "first")
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(claim, "second")
        await anyio.wait_all_tasks_blocked()
        assert outcomes == ["first superseded"]
        tg.cancel_scope.cancel()
    assert started == []
    assert empty(slot)


# -- commit points ---------------------------------------------------------------------------


async def test_a_committed_claim_is_superseded_but_not_interrupted() -> None:
    """After claim.commit(), a newer claim takes the key; the committed body runs to its end."""
    slot = LatestOnly()
    events: list[str] = []
    committed, newer_done = anyio.Event(), anyio.Event()

    async def old() -> None:
        async with slot.claim("k") as claim:
            await claim.commit()
            committed.set()
            await newer_done.wait()  # not interrupted by the newer claim
            assert not await slot.is_current("k", claim.generation)
            events.append("old finished")

    async with anyio.create_task_group() as tg:
        tg.start_soon(old)
        await committed.wait()
        async with slot.claim("k"):
            events.append("new ran")
        newer_done.set()
    assert events == ["new ran", "old finished"]
    assert empty(slot)


async def test_a_superseded_claim_cannot_commit() -> None:
    """A claim superseded before its commit point raises SUPERSEDED from commit()."""
    slot = LatestOnly()
    with pytest.raises(OperationCancelled) as info:
        async with slot.hold("k") as claim:
            async with slot.claim("k") as newer:
                pass
            await claim.commit()
    assert info.value.reason.kind is CancelKind.SUPERSEDED
    assert info.value.reason.source == newer.id


async def test_commit_against_a_newer_claim_at_every_step() -> None:
    """A newer claim at each step of commit(): exactly one of them wins, every time."""
    slot = LatestOnly()
    await claim_storm(slot, slot, tag="claims")
