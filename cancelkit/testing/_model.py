"""LatestOnly on a backend against a plain model: policy x max_concurrency x seq x handover.

A hypothesis state machine drives real claims (tasks behind a blocking portal) on one key and
checks every outcome against a reference model written as plainly as possible: who runs, who
waits, who is superseded (and by whom), who is stale or refused, which generations are
current, and how many bodies overlap. Claims alternate between the workers the factory
yields. Nothing waits on time: the machine waits for events the claims set, each bounded by
a generous limit that only a hang reaches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from .._exceptions import OperationCancelled, SlotBusy
from .._latest import LatestOnly
from .._policy import Policy
from .._reason import CancelKind
from ..backends import Acquired, Admission, Backend, CancelOutcome, Deliver
from ._contract import Workers

__all__ = ["check_latest_only_model"]

LIMIT = 10.0  # seconds; only a hang gets near it
KEY = "k"


class Recorder:
    """A backend that passes everything through and records each acquire's answer."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.answers: list[tuple[str, Acquired]] = []
        self.changed: anyio.Event | None = None

    async def register(
        self, id: str, owner: str | None, holder: str, deliver: Deliver
    ) -> Any:  # pragma: no cover - not used here
        return await self.inner.register(id, owner, holder, deliver)

    async def unregister(self, id: str, owner: str | None, holder: str) -> Any:  # pragma: no cover
        return await self.inner.unregister(id, owner, holder)

    async def commit(self, id: str, owner: str | None, holder: str) -> Any:  # pragma: no cover
        return await self.inner.commit(id, owner, holder)

    async def commit_claim(self, key: str, holder: str) -> Any:  # pragma: no cover
        return await self.inner.commit_claim(key, holder)

    async def cancel(
        self, id: str, owner: str | None, reason: Any
    ) -> CancelOutcome:  # pragma: no cover
        return await self.inner.cancel(id, owner, reason)

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
        acquired = await self.inner.acquire(
            key, holder, deliver, policy=policy, limit=limit, seq=seq
        )
        self.answers.append((holder, acquired))
        if self.changed is not None:
            self.changed.set()
        return acquired

    async def release(self, key: str, holder: str) -> Any:
        return await self.inner.release(key, holder)

    async def wait_turn(self, key: str, holder: str, *, handover: bool) -> None:
        await self.inner.wait_turn(key, holder, handover=handover)

    async def is_current(self, key: str, generation: int) -> bool:
        return await self.inner.is_current(key, generation)


@dataclass
class Probe:
    """One claim's task, as the test sees it."""

    seq: int | None
    stubborn: bool  # its cleanup after a cancellation waits until the test lets it go
    started: anyio.Event
    cleaning: anyio.Event
    settled: anyio.Event  # ended, or in its stubborn cleanup
    ended: anyio.Event
    finish: anyio.Event
    let_go: anyio.Event
    outcome: object = None
    holder: str = ""
    generation: int = 0


@dataclass
class Entry:
    """The model of one accepted, unreleased claim."""

    probe: Probe
    state: str  # "running" | "waiting" | "superseded"
    superseded_by: str = ""
    started: bool = False  # known to have started (the test waited for it)
    cleaning: bool = False  # known to be in its stubborn cleanup


@dataclass
class Bodies:
    now: int = 0
    most: int = 0
    log: list[str] = field(default_factory=list)


class Machine(RuleBasedStateMachine):
    """Random claim, finish and cleanup sequences on one key, checked against the model."""

    anyio_backend = "asyncio"
    workers: Workers

    def __init__(self) -> None:
        super().__init__()
        self.stack = ExitStack()
        self.portal: BlockingPortal = self.stack.enter_context(
            start_blocking_portal(self.anyio_backend)
        )
        self.entries: list[Entry] = []
        self.probes: list[Probe] = []
        self.newest: tuple[int, str] | None = None  # (seq, holder)
        self.bodies = Bodies()
        self.slots: list[LatestOnly] = []
        self.recorders: list[Recorder] = []

    # -- set-up ------------------------------------------------------------------------

    @initialize(
        # the presets, and every other combination of the parts
        policy=st.builds(
            Policy,
            when_busy=st.sampled_from(["supersede", "wait", "refuse"]),
            when_full=st.sampled_from(["supersede", "refuse"]),
            max_waiting=st.integers(1, 3),
        ),
        limit=st.integers(1, 3),
        debounce=st.booleans(),
        handover=st.booleans(),
    )
    def setup(self, policy: Policy, limit: int, debounce: bool, handover: bool) -> None:
        self.policy, self.limit = policy, limit
        self.debounce, self.handover = debounce, handover
        # entered and left in one task of the portal's loop (a backend's task groups need it)
        inners = list(
            self.stack.enter_context(self.portal.wrap_async_context_manager(self.workers()))
        )
        for inner in inners:
            recorder = Recorder(inner)
            self.recorders.append(recorder)
            self.slots.append(
                LatestOnly(
                    policy=policy,
                    max_concurrency=limit,
                    debounce=0.002 if debounce else 0.0,
                    handover_timeout=math.inf if handover else None,
                    backend=recorder,
                )
            )

    def teardown(self) -> None:
        try:
            for probe in self.probes:
                self.portal.call(probe.finish.set)
                self.portal.call(probe.let_go.set)
            for probe in self.probes:
                self.wait(probe.ended)
            for slot in self.slots:
                stats = slot.statistics()
                assert stats.running == stats.waiting == 0
        finally:
            self.stack.close()

    # -- helpers -----------------------------------------------------------------------

    def wait(self, event: anyio.Event) -> None:
        async def waiting() -> None:
            with anyio.fail_after(LIMIT):
                await event.wait()

        self.portal.call(waiting)

    async def _run(self, slot: LatestOnly, probe: Probe) -> None:
        bodies = self.bodies
        try:
            async with slot.claim(KEY, seq=probe.seq) as claim:
                probe.holder, probe.generation = claim.id, claim.generation
                bodies.now += 1
                bodies.most = max(bodies.most, bodies.now)
                probe.started.set()
                try:
                    await probe.finish.wait()
                finally:
                    if probe.stubborn and claim.token.cancelled:
                        with anyio.CancelScope(shield=True), anyio.fail_after(30):
                            probe.cleaning.set()
                            probe.settled.set()
                            await probe.let_go.wait()
                    bodies.now -= 1
            probe.outcome = "completed"
        except OperationCancelled as exc:
            probe.outcome = exc.reason
        except SlotBusy:
            probe.outcome = "busy"
        finally:
            probe.settled.set()
            probe.ended.set()

    def _probe(self, seq: int | None, stubborn: bool) -> Probe:
        def make() -> Probe:
            e = anyio.Event
            return Probe(seq, stubborn, e(), e(), e(), e(), e(), e())

        return self.portal.call(make)

    def running_count(self) -> int:
        return sum(entry.state == "running" for entry in self.entries)

    def may_start_now(self, entry: Entry) -> bool:
        """The model's turn rule.

        Running, and (with handover) fewer than `limit` earlier claims left not waiting.
        """
        if entry.state != "running":
            return False
        if not self.handover:
            return True
        index = self.entries.index(entry)
        ahead = sum(other.state != "waiting" for other in self.entries[:index])
        return ahead < self.limit

    def settle(self, *, newest_too: bool) -> None:
        """Wait until every claim the model lets start has started."""
        for entry in self.entries:
            if entry is self.entries[-1] and self.debounce and not newest_too:
                continue  # it may still be in its debounce: left unknown on purpose
            if self.may_start_now(entry):
                self.wait(entry.probe.started)
                entry.started = True

    def release(self, entry: Entry) -> None:
        """The model of a release: forget it; the oldest waiting claim runs if there is room."""
        self.entries.remove(entry)
        if entry.state == "running":
            for other in self.entries:
                if other.state == "waiting":
                    other.state = "running"
                    break

    # -- rules -------------------------------------------------------------------------

    @rule(seq=st.one_of(st.none(), st.integers(0, 6)), stubborn=st.booleans())
    def claim(self, seq: int | None, stubborn: bool) -> None:
        which = len(self.probes) % len(self.slots)
        slot, recorder = self.slots[which], self.recorders[which]
        probe = self._probe(seq, stubborn)
        self.probes.append(probe)
        before = len(recorder.answers)
        recorder.changed = self.portal.call(anyio.Event)
        self.portal.start_task_soon(self._run, slot, probe)
        self.wait(recorder.changed)
        assert len(recorder.answers) == before + 1
        holder, acquired = recorder.answers[-1]
        probe.holder = holder

        # the model's decision
        running = [e for e in self.entries if e.state == "running"]
        waiting = [e for e in self.entries if e.state == "waiting"]
        if seq is not None and self.newest is not None and seq <= self.newest[0]:
            assert acquired == Acquired(Admission.STALE, source=self.newest[1], seq=self.newest[0])
            self.wait(probe.ended)
            reason = probe.outcome
            assert getattr(reason, "kind", None) is CancelKind.SUPERSEDED
            assert getattr(reason, "source", None) == self.newest[1]
            assert str(getattr(reason, "message", "")).startswith("stale:")
            assert not probe.started.is_set()
            return
        state, victim = "running", None
        if len(running) >= self.limit:
            policy = self.policy
            if policy.when_busy == "supersede":
                victim = running[0]
            elif policy.when_busy == "refuse":
                state = "busy"
            elif len(waiting) < policy.max_waiting:
                state = "waiting"
            elif policy.when_full == "supersede":
                state, victim = "waiting", waiting[0]
            else:
                state = "full"
        if state in ("busy", "full"):
            assert acquired.admission is Admission(state)
            self.wait(probe.ended)
            assert probe.outcome == "busy"
            assert not probe.started.is_set()
            return
        assert acquired.admission is Admission(state)
        if self.entries:
            assert acquired.generation > max(e.probe.generation for e in self.entries)
        probe.generation = acquired.generation
        if seq is not None:
            self.newest = (seq, holder)
        self.entries.append(Entry(probe, state))
        if victim is not None:
            could_start = self.may_start_now(victim)
            victim.state = "superseded"
            victim.superseded_by = holder
            self.wait(victim.probe.settled)
            if victim.started and victim.probe.stubborn:
                assert victim.probe.cleaning.is_set()
                victim.cleaning = True
            else:  # not started, or not known to have started: let it end either way
                if victim.probe.cleaning.is_set():
                    self.portal.call(victim.probe.let_go.set)
                self.wait(victim.probe.ended)
                if not could_start:  # superseded while it waited: its body never ran
                    assert not victim.probe.started.is_set()
                self.check_superseded(victim)
                self.release(victim)
        self.settle(newest_too=False)

    def check_superseded(self, entry: Entry) -> None:
        reason = entry.probe.outcome
        assert getattr(reason, "kind", None) is CancelKind.SUPERSEDED, reason
        assert getattr(reason, "source", None) == entry.superseded_by

    @precondition(lambda self: any(self.finishable()))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        entry = data.draw(st.sampled_from(list(self.finishable())))
        self.portal.call(entry.probe.finish.set)
        self.wait(entry.probe.ended)
        assert entry.probe.outcome == "completed"
        self.release(entry)
        self.settle(newest_too=False)

    def finishable(self) -> Iterator[Entry]:
        return (e for e in self.entries if e.state == "running" and e.started)

    @precondition(lambda self: any(e.cleaning for e in self.entries))
    @rule(data=st.data())
    def end_cleanup(self, data: st.DataObject) -> None:
        cleaning = [e for e in self.entries if e.cleaning]
        entry = data.draw(st.sampled_from(cleaning))
        self.portal.call(entry.probe.let_go.set)
        self.wait(entry.probe.ended)
        self.check_superseded(entry)
        self.release(entry)
        self.settle(newest_too=False)

    @precondition(lambda self: self.debounce)
    @rule()
    def let_debounce_pass(self) -> None:
        self.settle(newest_too=True)

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def only_running_claims_are_current(self) -> None:
        for entry in self.entries:
            current = self.portal.call(self.slots[0].is_current, KEY, entry.probe.generation)
            assert current is (entry.state == "running"), (entry.state, self.policy)

    @invariant()
    def bodies_overlap_only_as_allowed(self) -> None:
        if self.handover or self.policy.when_busy != "supersede":
            assert self.bodies.most <= self.limit
        for entry in self.entries:
            if entry.state == "waiting":
                assert not entry.probe.started.is_set()


def check_latest_only_model(
    workers: Workers, *, anyio_backend: str = "asyncio", examples: int = 50, shrink: bool = True
) -> None:
    """Check LatestOnly on the backends ``workers()`` yields against the plain model.

    Runs ``examples`` random sequences of claims (every policy, ``max_concurrency`` 1 to 3,
    sequence numbers, debounce, handover waits), their bodies finishing and their cleanups
    ending, alternating the claims between the workers; fails with hypothesis's smallest
    sequence that contradicts the model. Call it from a plain (not async) test.

    Args:
        workers: makes an async context manager that yields entered backends sharing one
            state (see :class:`BackendContract`); entered once per example.
        anyio_backend: ``"asyncio"`` or ``"trio"``.
        examples: how many random sequences.
        shrink: look for the smallest failing sequence (else report the first one found).
    """
    machine = type(
        "MachineOn", (Machine,), {"anyio_backend": anyio_backend, "workers": staticmethod(workers)}
    )
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=14,
            deadline=None,
            phases=tuple(Phase) if shrink else tuple(p for p in Phase if p is not Phase.shrink),
        ),
    )
