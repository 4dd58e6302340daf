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
    CancellationToken,
    CancelOutcome,
    CancelReason,
    OperationCancelled,
    OperationExists,
    RegistryFull,
    TokenRegistry,
    current_token,
)
from cancelkit.backends import MemoryBackend
from cancelkit.testing._storms import outer_storm, storm

pytestmark = pytest.mark.anyio


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_track_yields_a_random_id_and_a_live_token() -> None:
    """track() without an id makes a 128-bit id, lists the op and scopes the block."""
    registry = TokenRegistry()
    async with registry.track(owner="u") as op:
        assert len(op.id) >= 22
        assert op.owner == "u"
        assert current_token() is op.token
        assert not op.token.cancelled
        assert registry.operations(owner="u") == [op]
        assert registry.operations() == []
        assert registry.statistics().running == 1
    assert registry.operations(owner="u") == []
    assert registry.statistics().running == 0


async def test_cancel_while_running_interrupts_the_body() -> None:
    """cancel() of a running op reports CANCELLED and the body raises OperationCancelled."""
    registry = TokenRegistry()
    reason = CancelReason(CancelKind.REQUESTED, source="stop-button")
    caught: list[OperationCancelled] = []

    async def work() -> None:
        with pytest.raises(OperationCancelled) as info:
            async with registry.track("job-1"):
                await anyio.sleep_forever()
        caught.append(info.value)

    async with anyio.create_task_group() as tg:
        tg.start_soon(work)
        await anyio.wait_all_tasks_blocked()
        assert await registry.cancel("job-1", reason=reason) is CancelOutcome.CANCELLED
    assert caught[0].reason is reason
    assert registry.statistics().cancelled == {CancelKind.REQUESTED: 1}


async def test_cancel_before_register_means_the_body_never_runs() -> None:
    """A cancel that arrives first returns PENDING, and the op starts already cancelled."""
    registry = TokenRegistry()
    assert await registry.cancel("early", owner="u") is CancelOutcome.PENDING
    ran = False
    with pytest.raises(OperationCancelled) as info:
        async with registry.track("early", owner="u"):
            ran = True
    assert not ran
    assert info.value.reason.kind is CancelKind.REQUESTED
    assert registry.statistics().running == 0


async def test_cancel_after_finish_is_not_found() -> None:
    """Cancelling an op that already finished reports NOT_FOUND and writes no tombstone."""
    registry = TokenRegistry()
    async with registry.track("done"):
        pass
    assert await registry.cancel("done") is CancelOutcome.NOT_FOUND
    async with registry.track("done") as op:  # the id can be reused, and is not pre-cancelled
        assert not op.token.cancelled


async def test_cancel_twice_keeps_the_first_reason() -> None:
    """Two cancels of a running op both say CANCELLED; two early ones both say PENDING."""
    registry = TokenRegistry()
    first, second = CancelReason(message="first"), CancelReason(message="second")
    with pytest.raises(OperationCancelled) as stopped:  # the exit reports the first reason
        async with registry.track("a") as op:
            assert await registry.cancel("a", reason=first) is CancelOutcome.CANCELLED
            assert await registry.cancel("a", reason=second) is CancelOutcome.CANCELLED
            assert op.token.reason is first
    assert stopped.value.reason is first
    assert await registry.cancel("b", reason=first) is CancelOutcome.PENDING
    assert await registry.cancel("b", reason=second) is CancelOutcome.PENDING
    with pytest.raises(OperationCancelled) as info:
        async with registry.track("b"):
            pass
    assert info.value.reason is first


async def test_tombstones_expire() -> None:
    """After the tombstone TTL has passed, work with that id runs normally."""
    clock = FakeClock()
    registry = TokenRegistry(backend=MemoryBackend(tombstone_ttl=5, clock=clock))
    await registry.cancel("late")
    clock.now += 5
    async with registry.track("late") as op:
        assert not op.token.cancelled
    assert await registry.cancel("late") is CancelOutcome.NOT_FOUND


async def test_owners_cannot_see_or_cancel_each_others_work() -> None:
    """Another owner's cancel of a running op is NOT_FOUND, cancels nothing, writes nothing."""
    registry = TokenRegistry()
    async with registry.track("x", owner="alice") as op:
        assert await registry.cancel("x", owner="mallory") is CancelOutcome.NOT_FOUND
        assert await registry.cancel("x") is CancelOutcome.NOT_FOUND
        assert not op.token.cancelled
        assert registry.backend.statistics().tombstones == 0  # type: ignore[attr-defined]
        assert registry.operations(owner="mallory") == []
    async with registry.track("y", owner="alice") as op:  # mallory pre-cancelled "y" for herself
        await registry.cancel("y", owner="mallory")
        assert not op.token.cancelled


async def test_the_same_id_is_refused_while_live_but_fine_for_another_owner() -> None:
    """Tracking a live id again raises ValueError; other owners have their own ids."""
    registry = TokenRegistry()
    async with registry.track("a") as first:
        with pytest.raises(OperationExists, match="already running"):
            async with registry.track("a"):
                pass
        async with registry.track("a", owner="u"):
            pass
        assert registry.operations() == [first]


async def test_a_shared_backend_refuses_an_id_live_in_another_registry() -> None:
    """Two registries on one backend share ids; the refused one leaves no trace."""
    backend = MemoryBackend()
    one, two = TokenRegistry(backend=backend), TokenRegistry(backend=backend)
    with pytest.raises(OperationCancelled):  # cancelled through the other registry
        async with one.track("a"):
            with pytest.raises(OperationExists, match="already running"):
                async with two.track("a"):
                    pass
            assert two.statistics().running == 0
            assert await two.cancel("a") is CancelOutcome.CANCELLED


async def test_live_limit() -> None:
    """More than max_running ops at once raises RegistryFull naming the limit."""
    registry = TokenRegistry(max_running=1)
    async with registry.track():
        with pytest.raises(RegistryFull, match="max_running=1"):
            async with registry.track():
                pass
    async with registry.track():
        pass


async def test_tombstone_limit() -> None:
    """More early cancels than the backend's max_tombstones raise RegistryFull."""
    registry = TokenRegistry(backend=MemoryBackend(max_tombstones=2))
    await registry.cancel("a")
    await registry.cancel("b")
    with pytest.raises(RegistryFull, match="max_tombstones=2"):
        await registry.cancel("c")


async def test_dots_are_ids_but_path_segments_are_not() -> None:
    """ "." and ".." are refused (path segments: a status URL with them points elsewhere);
    other dotted ids are fine."""
    async with TokenRegistry().track("...") as op, TokenRegistry().track(".a"):
        assert op.id == "..."


@pytest.mark.parametrize("bad", ["", "a" * 129, "has space", "semi;colon", "ünï", ".", ".."])
async def test_invalid_ids_are_refused(bad: str) -> None:
    """Ids outside 1..128 chars of [A-Za-z0-9._:-] raise a ValueError naming the rule."""
    registry = TokenRegistry()
    with pytest.raises(ValueError, match="invalid operation id"):
        async with registry.track(bad):
            pass
    with pytest.raises(ValueError, match="invalid operation id"):
        await registry.cancel(bad)


async def test_invalid_arguments_are_refused() -> None:
    """Non-str ids, bad owners, bad reasons and bad limits get clear errors."""
    registry = TokenRegistry()
    with pytest.raises(TypeError, match="must be a str"):
        await registry.cancel(42)  # type: ignore[arg-type]
    for owner in ("", "two words", "x" * 257, "\x00", 7):
        with pytest.raises(ValueError, match="invalid owner"):
            await registry.cancel("a", owner=owner)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="CancelReason"):
        await registry.cancel("a", reason="stop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_running"):
        TokenRegistry(max_running=0)


async def test_entry_is_removed_when_the_body_fails() -> None:
    """An error in the block propagates and the op is unregistered."""
    registry = TokenRegistry()
    with pytest.raises(KeyError):
        async with registry.track("a"):
            raise KeyError("boom")
    assert registry.statistics().running == 0
    assert await registry.cancel("a") is CancelOutcome.NOT_FOUND


async def test_outer_cancellation_propagates_and_unregisters() -> None:
    """Someone else's cancel scope stops the block as itself, not as OperationCancelled."""
    registry = TokenRegistry()
    with anyio.CancelScope() as outer:
        async with registry.track("a") as op:
            outer.cancel()
            await anyio.sleep_forever()
    assert outer.cancelled_caught
    assert not op.token.cancelled
    assert registry.statistics().running == 0
    assert await registry.cancel("a") is CancelOutcome.NOT_FOUND


async def test_outer_cancellation_wins_when_it_coincides_with_a_cancel() -> None:
    """An outer cancel in the same instant as a registry cancel still propagates as itself."""
    registry = TokenRegistry()
    seen: list[BaseException] = []

    async def work(outer: anyio.CancelScope) -> None:
        with outer:
            try:
                async with registry.track("a"):
                    await anyio.sleep_forever()
            except BaseException as exc:
                seen.append(exc)
                raise

    outer = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(work, outer)
        await anyio.wait_all_tasks_blocked()
        outer.cancel()
        assert await registry.cancel("a") is CancelOutcome.CANCELLED
    assert outer.cancelled_caught
    assert not isinstance(seen[0], OperationCancelled)
    assert registry.statistics().running == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_native_task_cancel_with_a_registry_cancel_propagates_as_cancelled_error() -> None:
    """Task.cancel() in the same loop iteration as cancel(id) ends the task cancelled (12.1)."""
    import asyncio

    registry = TokenRegistry()
    entered = asyncio.Event()
    seen: list[str] = []

    async def body() -> None:
        try:
            async with registry.track("a"):
                entered.set()
                await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("CancelledError")
            raise
        except OperationCancelled:  # pragma: no cover - must not happen
            seen.append("OperationCancelled")

    task = asyncio.ensure_future(body())
    await entered.wait()
    assert await registry.cancel("a") is CancelOutcome.CANCELLED
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["CancelledError"]
    assert registry.statistics().running == 0


async def test_cancel_during_cleanup_lets_the_cleanup_finish() -> None:
    """A cancel arriving while the body's shielded cleanup runs waits for it, then unregisters."""
    registry = TokenRegistry()
    in_cleanup, proceed = anyio.Event(), anyio.Event()
    finished: list[str] = []

    async def work() -> None:
        with pytest.raises(OperationCancelled):  # cancelled before it ended: not a success
            async with registry.track("a"):
                try:
                    pass
                finally:
                    with anyio.CancelScope(shield=True), anyio.fail_after(30):
                        in_cleanup.set()
                        await proceed.wait()
                        finished.append("cleanup")

    async with anyio.create_task_group() as tg:
        tg.start_soon(work)
        await in_cleanup.wait()
        assert await registry.cancel("a") is CancelOutcome.CANCELLED
        proceed.set()
    assert finished == ["cleanup"]
    assert registry.statistics().running == 0


async def test_parent_token_cancels_the_op_and_is_unlinked_on_exit() -> None:
    """A parent's cancel reaches the op (reason PARENT) and the link is gone after exit."""
    registry = TokenRegistry()
    shutdown = CancellationToken()
    async with registry.track("a", parent=shutdown) as op:
        assert shutdown.statistics().callbacks == 1
    assert shutdown.statistics().callbacks == 0
    assert op.token.statistics().parents == 0

    async def shut_down_while_running() -> None:
        async with registry.track("b", parent=shutdown):
            shutdown.cancel(CancelReason(CancelKind.SHUTDOWN))
            await anyio.sleep_forever()

    with pytest.raises(OperationCancelled) as info:
        await shut_down_while_running()
    assert info.value.reason.kind is CancelKind.PARENT
    assert info.value.reason.root.kind is CancelKind.SHUTDOWN


async def test_cancel_from_another_thread() -> None:
    """token.cancel() from a worker thread interrupts the tracked block."""
    registry = TokenRegistry()

    async def cancelled_by_a_thread() -> None:
        async with registry.track("a") as op:
            await anyio.to_thread.run_sync(op.token.cancel)
            await anyio.sleep_forever()

    with pytest.raises(OperationCancelled):
        await cancelled_by_a_thread()
    assert registry.statistics().cancelled == {CancelKind.REQUESTED: 1}


def test_repr_shows_state() -> None:
    """repr() names the running count, the limit and the backend."""
    text = repr(TokenRegistry(max_running=5))
    assert "running=0" in text
    assert "max_running=5" in text
    assert "MemoryBackend" in text
    assert isinstance(TokenRegistry().backend, MemoryBackend)


# -- stateful: the registry against a plain model ------------------------------------------

IDS = st.sampled_from(["a", "b", "c"])
OWNERS = st.sampled_from([None, "u1", "u2"])
TTL = 10.0
RUNNING_PER_OWNER = 2
TOMBS_PER_OWNER = 2


class RegistryMachine(RuleBasedStateMachine):
    backend_name = "asyncio"

    def __init__(self) -> None:
        super().__init__()
        self.portal_cm = start_blocking_portal(self.backend_name)
        self.portal: BlockingPortal = self.portal_cm.__enter__()
        self.clock = FakeClock()
        self.registry = TokenRegistry(
            backend=MemoryBackend(
                tombstone_ttl=TTL,
                max_tombstones=1000,
                max_tombstones_per_owner=TOMBS_PER_OWNER,
                clock=self.clock,
            ),
            max_running_per_owner=RUNNING_PER_OWNER,
        )
        self.running: dict[tuple[str | None, str], tuple[anyio.Event, Future[Any]]] = {}
        self.tombstones: dict[tuple[str | None, str], float] = {}
        self.finished: dict[tuple[str | None, str], float] = {}

    def teardown(self) -> None:
        for event, _ in self.running.values():
            self.portal.call(event.set)
        self.portal_cm.__exit__(None, None, None)

    def _expire(self) -> None:
        for table in (self.tombstones, self.finished):
            for name in [n for n, t in table.items() if t <= self.clock.now]:
                del table[name]

    async def _work(
        self, id: str, owner: str | None, event: anyio.Event, *, task_status: Any
    ) -> None:
        async with self.registry.track(id, owner=owner):
            task_status.started()
            await event.wait()

    def _end(self, name: tuple[str | None, str]) -> Future[Any]:
        _, future = self.running.pop(name)
        self.finished[name] = self.clock.now + TTL
        return future

    @rule(id=IDS, owner=OWNERS)
    def track(self, id: str, owner: str | None) -> None:
        self._expire()
        name = (owner, id)
        event = self.portal.call(anyio.Event)
        if name in self.running:
            with pytest.raises(OperationExists, match="already running"):
                self.portal.start_task(self._work, id, owner, event)
        elif sum(o == owner for o, _ in self.running) >= RUNNING_PER_OWNER:
            with pytest.raises(RegistryFull, match="max_running_per_owner"):
                self.portal.start_task(self._work, id, owner, event)
        elif name in self.tombstones:
            with pytest.raises(OperationCancelled):  # (the tombstone stays until it expires)
                self.portal.start_task(self._work, id, owner, event)
        else:
            future, _ = self.portal.start_task(self._work, id, owner, event)
            self.running[name] = (event, future)
            self.finished.pop(name, None)

    @precondition(lambda self: bool(self.running))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.running, key=str)))
        event, _ = self.running[name]
        self.portal.call(event.set)
        self._end(name).result()

    @rule(id=IDS, owner=OWNERS)
    def cancel(self, id: str, owner: str | None) -> None:
        self._expire()
        name = (owner, id)
        full = (
            name not in self.running
            and not any(running_id == id for _, running_id in self.running)
            and name not in self.finished
            and name not in self.tombstones
            and sum(o == owner for o, _ in self.tombstones) >= TOMBS_PER_OWNER
        )
        if full:  # this owner's budget is used up; the others' stays untouched
            with pytest.raises(RegistryFull, match="max_tombstones_per_owner"):
                self.portal.call(lambda: self.registry.cancel(id, owner=owner))
            return
        outcome = self.portal.call(lambda: self.registry.cancel(id, owner=owner))
        if name in self.running:
            assert outcome is CancelOutcome.CANCELLED
            with pytest.raises(OperationCancelled):
                self._end(name).result()
        elif any(running_id == id for _, running_id in self.running):
            assert outcome is CancelOutcome.NOT_FOUND  # another owner's: untouched, unseen
        elif name in self.finished:
            assert outcome is CancelOutcome.NOT_FOUND
        elif name in self.tombstones:
            assert outcome is CancelOutcome.PENDING
        else:
            assert outcome is CancelOutcome.PENDING
            self.tombstones[name] = self.clock.now + TTL

    @rule(seconds=st.sampled_from([1.0, 5.0, TTL]))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    @invariant()
    def listing_matches(self) -> None:
        for owner in (None, "u1", "u2"):
            ids = {op.id for op in self.registry.operations(owner=owner)}
            assert ids == {i for o, i in self.running if o == owner}
        assert self.registry.statistics().running == len(self.running)


@pytest.mark.parametrize("backend_name", ["asyncio", "trio"])
def test_registry_matches_a_model(backend_name: str) -> None:
    """Random track/finish/cancel/clock sequences behave like a plain dict-based model."""
    run_state_machine_as_test(
        type("RegistryMachineOn", (RegistryMachine,), {"backend_name": backend_name}),
        settings=settings(max_examples=40, stateful_step_count=25, deadline=None),
    )


async def test_tracked_operation_shows_its_id_owner_and_state() -> None:
    """A TrackedOperation's repr names its id, owner and whether it committed."""
    registry = TokenRegistry()
    async with registry.track("a", owner="u") as op:
        assert "'a'" in repr(op)
        assert "owner='u'" in repr(op)
        assert "live" in repr(op)
        assert math.isinf(op.token.deadline)
        await op.commit()
        assert "committed" in repr(op)


async def test_hold_only_signals_the_block() -> None:
    """hold(): a cancelled block keeps running and sees its token cancelled."""
    registry = TokenRegistry()
    go_on = anyio.Event()
    seen: list[CancelOutcome | str] = []

    async def work() -> None:
        with pytest.raises(OperationCancelled):  # it ended; the answer is the cancel's
            async with registry.hold("op") as op:
                await go_on.wait()  # not interrupted
                seen.append("requested" if op.token.cancelled else "live")

    async with anyio.create_task_group() as tg:
        tg.start_soon(work)
        await anyio.wait_all_tasks_blocked()
        seen.append(await registry.cancel("op"))
        go_on.set()
    assert seen == [CancelOutcome.CANCELLED, "requested"]
    assert registry.statistics().running == 0


async def test_hold_still_refuses_a_tombstoned_start() -> None:
    """hold(): an operation cancelled before it registered never runs its block."""
    registry = TokenRegistry()
    assert await registry.cancel("early") is CancelOutcome.PENDING
    with pytest.raises(OperationCancelled):
        async with registry.hold("early"):
            raise AssertionError("must not run")  # pragma: no cover
    assert registry.statistics().running == 0


# -- per-owner budgets -----------------------------------------------------------------------


async def test_one_owner_flooding_cancels_cannot_starve_another_owner() -> None:
    """An owner at its tombstone budget is refused by name; other owners keep every feature."""
    backend = MemoryBackend(max_tombstones=10_000, max_tombstones_per_owner=100)
    registry = TokenRegistry(backend=backend)
    for i in range(100):
        assert await registry.cancel(f"junk-{i}", owner="mallory") is CancelOutcome.PENDING
    for i in range(100, 1_000):  # bounded: ten times the budget
        with pytest.raises(RegistryFull, match="max_tombstones_per_owner=100") as info:
            await registry.cancel(f"junk-{i}", owner="mallory")
        assert (info.value.limit, info.value.value) == ("max_tombstones_per_owner", 100)
    assert backend.statistics().tombstones == 100
    # alice: cancel-before-start, track, and cancel of running work all still work
    assert await registry.cancel("early", owner="alice") is CancelOutcome.PENDING
    with pytest.raises(OperationCancelled):
        async with registry.track("early", owner="alice"):
            pytest.fail("a tombstoned operation must not start")  # pragma: no cover
    with pytest.raises(OperationCancelled):
        async with registry.track("job", owner="alice") as op:
            assert await registry.cancel("job", owner="alice") is CancelOutcome.CANCELLED
            assert op.token.cancelled
            await anyio.lowlevel.cancel_shielded_checkpoint()
    # mallory herself can still track and cancel running work; only new tombstones are refused
    with pytest.raises(OperationCancelled):
        async with registry.hold("mine", owner="mallory") as op:
            assert await registry.cancel("mine", owner="mallory") is CancelOutcome.CANCELLED
            assert op.token.cancelled


async def test_one_owner_at_its_running_budget_leaves_others_running() -> None:
    """max_running_per_owner refuses that owner's next operation; another owner still runs."""
    registry = TokenRegistry(max_running=10, max_running_per_owner=2)
    async with registry.hold("a", owner="mallory"), registry.hold("b", owner="mallory"):
        with pytest.raises(RegistryFull, match="max_running_per_owner=2") as info:
            async with registry.hold("c", owner="mallory"):
                pytest.fail("over the owner's budget")  # pragma: no cover
        assert info.value.limit == "max_running_per_owner"
        with pytest.raises(OperationCancelled):
            async with registry.track("x", owner="alice") as op:
                assert await registry.cancel("x", owner="alice") is CancelOutcome.CANCELLED
                assert op.token.cancelled
                await anyio.lowlevel.cancel_shielded_checkpoint()
        assert registry.statistics().running == 2
    assert registry.statistics().running == 0


def test_per_owner_limits_are_validated() -> None:
    """Per-owner limits below 1 are refused with the option's name."""
    with pytest.raises(ValueError, match="max_running_per_owner"):
        TokenRegistry(max_running_per_owner=0)
    with pytest.raises(ValueError, match="max_tombstones_per_owner"):
        MemoryBackend(max_tombstones_per_owner=0)


# -- commit points ---------------------------------------------------------------------------


async def test_a_committed_operation_is_too_late_to_cancel() -> None:
    """After op.commit(), cancel() answers COMMITTED, stops nothing, and the body succeeds."""
    registry = TokenRegistry()
    async with registry.track("pay") as op:
        await op.commit()
        assert await registry.cancel("pay") is CancelOutcome.COMMITTED
        await anyio.lowlevel.checkpoint()  # not interrupted
        assert not op.token.cancelled
    assert registry.statistics().cancelled == {}


async def test_a_cancel_before_the_commit_wins() -> None:
    """A cancel that came first makes commit() raise its reason; the exit raises it too."""
    registry = TokenRegistry()
    reason = CancelReason(message="user pressed stop")
    reached = []
    with pytest.raises(OperationCancelled) as info:
        async with registry.hold("pay") as op:
            assert await registry.cancel("pay", reason=reason) is CancelOutcome.CANCELLED
            await op.commit()
            reached.append("charged")  # pragma: no cover
    assert info.value.reason is reason
    assert reached == []


async def test_a_body_that_ends_after_its_cancel_reports_the_cancel() -> None:
    """A body that returns after its cancel answered CANCELLED is not a success."""
    registry = TokenRegistry()
    with pytest.raises(OperationCancelled):
        async with registry.hold("export"):
            assert await registry.cancel("export") is CancelOutcome.CANCELLED
            # (no checkpoint: the body ends as if the delivery were late)


async def test_commit_is_idempotent_and_works_in_hold() -> None:
    """Two commits are one; a committed hold() block ends as a success whatever comes."""
    registry = TokenRegistry()
    async with registry.hold("x") as op:
        await op.commit()
        await op.commit()
        assert await registry.cancel("x") is CancelOutcome.COMMITTED
    assert await registry.cancel("x") is CancelOutcome.NOT_FOUND


async def test_commit_lifts_the_deadline_of_a_parent() -> None:
    """A parent's deadline cannot stop an operation that committed before it passed."""
    registry = TokenRegistry()
    parent = CancellationToken(timeout=0.05)
    async with registry.track("x", parent=parent) as op:
        await op.commit()
        await anyio.sleep(0.1)  # past the parent's deadline
    assert parent.cancelled
    assert not op.token.cancelled


async def test_commit_against_a_cancel_at_every_step() -> None:
    """A cancel at each step of commit(): the answer always agrees with what happened."""
    registry = TokenRegistry()
    await storm(registry, registry, tag="mem")
    await outer_storm(registry, tag="outer")
