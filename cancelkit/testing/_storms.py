"""Commit points under fire: commit() against a cancel (and an outer cancellation) at every step.

The storms are rules of :class:`~cancelkit.testing.BackendContract` (every backend runs them);
:func:`sweep_commit` drives the cancellens package (asyncio only), which cancels the committing
operation at every point where it suspends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from .._exceptions import OperationCancelled, OperationExists
from .._latest import LatestOnly
from .._reason import CancelKind
from .._registry import TokenRegistry
from ..backends import CancelOutcome

if TYPE_CHECKING:
    from cancellens import Case, Completion

#: How many scheduling steps the canceller waits, 0 to STEPS - 1: past the whole commit()
#: round trip on every backend (a Redis call is a handful of steps).
STEPS = 24


async def _steps(n: int) -> None:
    for _ in range(n):
        await anyio.lowlevel.cancel_shielded_checkpoint()


async def storm(runner: TokenRegistry, canceller: TokenRegistry, *, tag: str) -> None:
    """For each step count: an operation commits while another party cancels it then.

    The answers must agree with what happened, every time: CANCELLED means the irreversible
    step never ran and the operation ended cancelled; COMMITTED means it ran and the operation
    succeeded; NOT_FOUND means it had already ended (successfully). Afterwards nothing is left
    registered and the id can be used again.
    """
    for steps in range(STEPS):
        id = f"{tag}-{steps}"
        started = anyio.Event()
        charged = False
        ended = ""
        outcome: CancelOutcome | None = None

        async def work() -> None:
            nonlocal charged, ended
            try:
                async with runner.track(id) as op:  # noqa: B023 - awaited in this iteration
                    started.set()  # noqa: B023
                    await op.commit()
                    charged = True  # the irreversible step
                    await anyio.lowlevel.checkpoint()
                ended = "completed"
            except OperationCancelled:
                ended = "cancelled"

        async def cancel() -> None:
            nonlocal outcome
            await started.wait()  # noqa: B023
            await _steps(steps)  # noqa: B023
            outcome = await canceller.cancel(id)  # noqa: B023

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(work)
                tg.start_soon(cancel)
        assert ended == ("completed" if charged else "cancelled"), (steps, ended, charged)
        if outcome is CancelOutcome.CANCELLED:
            assert not charged, steps
        elif outcome is CancelOutcome.COMMITTED:
            assert charged, steps
        else:
            assert outcome is CancelOutcome.NOT_FOUND, (steps, outcome)
            assert charged, steps
        async with runner.track(id) as again:  # the id is usable again
            await again.commit()
    assert runner.statistics().running == 0


async def claim_storm(runner: LatestOnly, newcomer: LatestOnly, *, tag: str) -> None:
    """For each step count: a claim commits while a newer claim arrives then.

    Exactly one wins: either the commit returned, the body did its irreversible step and
    ended as a success (the newer claim ran beside it), or the commit was refused (or never
    reached) and the body ended superseded without the step. The key is free afterwards.
    """
    for steps in range(STEPS):
        key = f"{tag}-{steps}"
        started = anyio.Event()
        charged = False
        ended = ""

        async def work() -> None:
            nonlocal charged, ended
            try:
                async with runner.claim(key) as claim:  # noqa: B023
                    started.set()  # noqa: B023
                    await claim.commit()
                    charged = True
                    await anyio.lowlevel.checkpoint()
                ended = "completed"
            except OperationCancelled as exc:
                assert exc.reason.kind is CancelKind.SUPERSEDED  # noqa: PT017
                ended = "superseded"

        async def newer() -> None:
            await started.wait()  # noqa: B023
            await _steps(steps)  # noqa: B023
            async with newcomer.claim(key):  # noqa: B023
                pass

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(work)
                tg.start_soon(newer)
        assert ended == ("completed" if charged else "superseded"), (steps, ended, charged)
        async with runner.claim(key) as again:  # the key is free
            await again.commit()


async def outer_storm(registry: TokenRegistry, *, tag: str) -> None:
    """For each step count: the operation's own task is cancelled from outside.

    That is while it registers and commits. The outer cancellation propagates as itself; a
    cancel afterwards never answers CANCELLED for an operation whose commit returned; the id
    can be used again (at once, or once the cleanup of a script cut short ran: see
    :func:`reusable`).
    """
    for steps in range(STEPS):
        id = f"{tag}-{steps}"
        committed = False
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:

                async def work() -> None:
                    nonlocal committed
                    async with registry.track(id) as op:  # noqa: B023
                        await op.commit()
                        committed = True
                        await anyio.sleep_forever()

                tg.start_soon(work)
                await _steps(steps)
                tg.cancel_scope.cancel()
        assert registry.statistics().running == 0
        outcome = await registry.cancel(id)
        assert outcome is not CancelOutcome.CANCELLED or not committed, (steps, outcome)
        if outcome is not CancelOutcome.PENDING:  # (a tombstone now refuses it, rightly)
            await reusable(registry, id)


async def reusable(registry: TokenRegistry, id: str) -> None:
    """Track ``id`` again and commit.

    Retried while a registration left by a script whose caller was cancelled is still being
    cleaned up (in the background, within a lease).
    """
    with anyio.fail_after(15):
        while True:
            try:
                async with registry.track(id) as op:
                    await op.commit()
            except (OperationExists, OperationCancelled):
                await anyio.sleep(0.01)
            else:
                return


@dataclass
class _Attempt:
    registry: TokenRegistry
    id: str
    charged: list[bool] = field(default_factory=list)


def commit_case(registry: TokenRegistry) -> Case[_Attempt]:
    """A cancellens case: a tracked operation that commits, cancelled at each step it takes."""
    from cancellens import Case, require

    counter = iter(range(1_000_000))

    async def factory() -> _Attempt:
        return _Attempt(registry, f"sweep-{next(counter)}")

    async def operation(state: _Attempt) -> None:
        async with state.registry.track(state.id) as op:
            await op.commit()
            state.charged.append(True)

    async def oracle(state: _Attempt, completion: Completion) -> None:
        require(completion.state in ("returned", "cancelled"), "the operation ends")
        require(state.registry.statistics().running == 0, "nothing is left registered")
        outcome = await state.registry.cancel(state.id)
        require(
            outcome is not CancelOutcome.CANCELLED or not state.charged,
            "CANCELLED never for an operation that passed its commit point",
        )
        if completion.state == "returned":  # not cut short: committed, ended, unregistered
            require(bool(state.charged), "a returned operation committed")
            require(outcome is CancelOutcome.NOT_FOUND, "an ended operation is not found")
        if outcome is not CancelOutcome.PENDING:
            await reusable(state.registry, state.id)

    async def teardown(state: _Attempt) -> None:
        return None

    return Case(factory, operation, oracle, teardown)


async def sweep_commit(registry: TokenRegistry) -> None:
    """Cancel a committing operation of ``registry`` at every point it suspends.

    Asyncio only (cancellens drives asyncio tasks; install ``cancellens``). Checks that the
    operation ends, leaves nothing registered, that a cancel afterwards never answers
    ``CANCELLED`` for an operation that passed its commit point, and that the id is usable
    again. A backend that never suspends there (one in memory) has no point to cancel at.

    Over a real server the trace of suspension points is not the same from run to run (a
    socket read suspends or not, as the answer arrives): cancellens then withholds that
    schedule's cancellation and calls the attempt unresolved, not failed. So: any violation
    fails at once; a sweep that is only unresolved is run again (three times at most), and
    the last one must still have cancelled the operation at every single point it has.
    """
    from cancellens import Limits, Outcome, sweep

    report: Any = None
    for _ in range(3):
        report = await sweep(commit_case(registry), limits=Limits(max_depth=2, total_timeout=60))
        if report.outcome is not Outcome.UNRESOLVED:
            report.assert_passed()  # PASS returns; FAIL and ERROR raise with their details
            return
    coverage = report.coverage
    if coverage.baseline_points == 0:  # it never suspends (a backend in memory): no point
        return
    assert coverage.single_planned > 0, report.to_json()
    assert coverage.single_valid == coverage.single_planned, report.to_json()
    unresolved = [a for a in report.attempts if a.outcome is not Outcome.PASS]
    assert all(
        reason.startswith(("trace diverged", "requested cancellation schedule"))
        for attempt in unresolved
        for reason in attempt.reasons
    ), report.to_json()
