from __future__ import annotations

import datetime
import json
import logging
import math
import os
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import pytest
from anyio.abc import TaskGroup

from cancelkit import (
    BackgroundOperations,
    CancelKind,
    CancelOutcome,
    CancelReason,
    MemoryStatusStore,
    OperationCancelled,
    OperationError,
    OperationExists,
    OperationState,
    OperationStatus,
    Progress,
    RegistryFull,
    StatusStore,
    TokenRegistry,
    current_token,
)

pytestmark = pytest.mark.anyio

Make = Callable[..., AbstractAsyncContextManager[BackgroundOperations]]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "redis"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Make]:
    """Running BackgroundOperations on each status store and registry backend.

    The Redis backend and the default store stay up for the whole test, so it can read
    statuses after the operations' lifespan ended.
    """
    async with AsyncExitStack() as stack:
        redis: Any = None
        if request.param == "redis":
            from cancelkit.redis import RedisBackend, RedisStatusStore

            redis = request.getfixturevalue("redis")
            prefix = f"t{secrets.token_hex(6)}"
            backend = await stack.enter_async_context(RedisBackend(redis.url, prefix=prefix))
            shared = await stack.enter_async_context(RedisStatusStore(redis.url, prefix=prefix))

        @asynccontextmanager
        async def make(**options: Any) -> AsyncIterator[BackgroundOperations]:
            options.setdefault("grace", 0)  # tests that leave operations running exit at once
            store_options = {
                name: options.pop(name) for name in ("retention", "max_retained") if name in options
            }
            store: StatusStore
            if redis is None:
                store, registry = MemoryStatusStore(**store_options), TokenRegistry()
            else:
                registry = TokenRegistry(backend=backend)
                store = shared
                if store_options:  # its own store, read within the block
                    store = RedisStatusStore(redis.url, prefix=prefix, **store_options)
            async with BackgroundOperations(registry=registry, store=store, **options) as ops:
                yield ops

        yield make


async def wait_for(event: anyio.Event) -> None:
    await event.wait()


async def forever() -> None:
    await anyio.sleep_forever()


async def test_start_returns_the_id_at_once_and_the_status_follows_the_run(make: Make) -> None:
    """start() returns while the function still runs; status is running, then completed."""
    release = anyio.Event()

    async def export(rows: int) -> dict[str, int]:
        await release.wait()
        return {"rows": rows}

    async with make() as ops:
        id = await ops.start(export, 3, owner="alice")
        assert len(id) >= 22
        status = await ops.status(id, owner="alice")
        assert status is not None
        assert status.state is OperationState.RUNNING
        assert status.ended_at is None
        assert [s.id for s in ops.operations(owner="alice")] == [id]
        release.set()
        final = await ops.wait(id, owner="alice")
    assert final is not None
    assert final.state is OperationState.COMPLETED
    assert final.result == {"rows": 3}
    assert final.ended_at is not None
    assert final.ended_at >= final.started_at
    assert await ops.status(id, owner="alice") == final
    assert ops.statistics().completed == 1


async def test_the_operation_runs_under_its_own_tracked_token(make: Make) -> None:
    """The function sees its operation's token as current_token(), registered in the registry."""
    seen: list[Any] = []

    async def work() -> None:
        seen.append(current_token())
        seen.append([op.token for op in ops.registry.operations()])

    async with make() as ops:
        id = await ops.start(work, id="job-1")
        await ops.wait(id)
    assert seen[1] == [seen[0]]
    assert seen[0] is not None
    assert seen[0].name == "job-1"


async def test_a_result_that_is_not_json_is_dropped_unless_the_app_decides(make: Make) -> None:
    """The default keeps JSON-able results only; result= decides what is kept."""

    async def make_object() -> object:
        return object()

    async with make() as ops:
        id = await ops.start(make_object)
        status = await ops.wait(id)
        assert status is not None
        assert status.state is OperationState.COMPLETED
        assert status.result is None
    async with make(result=lambda value: type(value).__name__) as ops:
        id = await ops.start(make_object)
        status = await ops.wait(id)
        assert status is not None
        assert status.result == "object"


async def test_a_result_kept_by_result_that_is_not_json_ends_failed(make: Make) -> None:
    """result= keeping a datetime, NaN or a lone surrogate: the operation ends failed with
    a ResultNotJSON error (never a status stuck at running, never a 500 when it is read)."""

    async def export(value: object) -> object:
        return value

    when = datetime.datetime(2026, 11, 30)
    async with make(result=lambda value: value, max_running_per_owner=1) as ops:
        for value in ({"url": "/dl/1", "when": when}, math.nan, "caf\udce9"):
            id = await ops.start(export, value, owner="alice")  # the last one's place is free
            with anyio.fail_after(10):
                status = await ops.wait(id, owner="alice")
            assert status is not None
            assert status.state is OperationState.FAILED
            assert status.error is not None
            assert status.error.type_name == "ResultNotJSON"
            assert "not JSON" in status.error.message
            assert await ops.cancel(id, owner="alice") is CancelOutcome.NOT_FOUND
        assert ops.statistics().failed == 3


async def test_an_error_message_with_a_lone_surrogate_is_kept_escaped(make: Make) -> None:
    """A message with a surrogate-escaped file name is stored as \\udcxx, readable as JSON."""

    name = os.fsdecode(b"caf\xe9.csv")  # a Latin-1 file name on a UTF-8 system

    async def parse() -> None:
        raise ValueError(f"cannot parse {name}")

    async def progress() -> None:
        await ops.report(1, message=os.fsdecode(b"caf\xe9"))
        raise KeyError("x")

    async with make() as ops:
        id = await ops.start(parse)
        second = await ops.start(progress)
        status = await ops.wait(id)
        other = await ops.wait(second)
    assert status is not None
    assert status.error == OperationError("ValueError", "cannot parse caf\\udce9.csv")
    assert other is not None
    assert other.progress == Progress(1, None, "caf\\udce9")
    json.dumps(status.to_json(), ensure_ascii=False).encode()


async def test_progress_that_is_not_a_finite_number_is_refused(make: Make) -> None:
    """report(inf) / report(nan) / report(1, total=inf) raise ValueError in the operation."""
    errors: list[str] = []

    async def export() -> None:
        for done, total in ((math.inf, None), (math.nan, None), (1, math.inf), ("1", None)):
            try:
                await ops.report(done, total)  # type: ignore[arg-type]
            except ValueError as exc:
                errors.append(str(exc))
        await ops.report(2, 4)

    async with make() as ops:
        id = await ops.start(export)
        status = await ops.wait(id)
    assert len(errors) == 4
    assert all("finite number" in error for error in errors)
    assert status is not None
    assert status.progress == Progress(2, 4, None)


async def test_a_failure_keeps_type_and_message_never_a_traceback(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    """A raising operation ends failed with the error's type and message; the log has more."""

    async def broken() -> None:
        raise KeyError("no such column")

    async with make() as ops:
        id = await ops.start(broken, owner="alice")
        status = await ops.wait(id, owner="alice")
    assert status is not None
    assert status.state is OperationState.FAILED
    assert status.error == OperationError("KeyError", "'no such column'")
    assert "Traceback" not in repr(status.to_json())
    assert any(r.exc_info and r.levelno == logging.ERROR for r in caplog.records)
    assert ops.statistics().failed == 1


async def test_cancel_by_id_stops_the_running_operation_with_its_reason(make: Make) -> None:
    """cancel() answers CANCELLED, the function is interrupted, the status says why."""
    cleaned = anyio.Event()

    async def work() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            cleaned.set()

    async with make() as ops:
        id = await ops.start(work, owner="alice")
        reason = CancelReason(CancelKind.REQUESTED, source="stop-button")
        assert await ops.cancel(id, owner="alice", reason=reason) is CancelOutcome.CANCELLED
        status = await ops.wait(id, owner="alice")
        assert cleaned.is_set()
        assert status is not None
        assert status.state is OperationState.CANCELLED
        assert status.reason is not None
        assert status.reason.kind is CancelKind.REQUESTED
        assert status.reason.source == "stop-button"
        # a second cancel finds nothing to stop and writes no tombstone
        assert await ops.cancel(id, owner="alice") is CancelOutcome.NOT_FOUND
    assert ops.statistics().cancelled == {CancelKind.REQUESTED: 1}


async def test_cancel_before_the_operation_registered_means_it_never_runs(make: Make) -> None:
    """A cancel that arrives first answers PENDING; the start returns, the function never runs."""
    ran: list[str] = []

    async def work() -> None:
        ran.append("ran")

    async with make() as ops:
        assert await ops.cancel("op-7", owner="alice") is CancelOutcome.PENDING
        assert await ops.start(work, id="op-7", owner="alice") == "op-7"
        status = await ops.status("op-7", owner="alice")
        assert status is not None
        assert status.state is OperationState.CANCELLED
        assert status.reason is not None
        assert status.reason.kind is CancelKind.REQUESTED
        assert ops.statistics().running == 0
    assert ran == []


async def test_owners_cannot_see_or_cancel_each_others_operations(make: Make) -> None:
    """Another owner's operation looks absent: no status, cancel NOT_FOUND, and it runs on."""
    async with make() as ops:
        await ops.start(forever, id="report", owner="alice")
        assert await ops.status("report", owner="bob") is None
        assert await ops.status("report") is None
        assert await ops.cancel("report", owner="bob") is CancelOutcome.NOT_FOUND
        status = await ops.status("report", owner="alice")
        assert status is not None
        assert status.state is OperationState.RUNNING
        assert ops.operations(owner="bob") == []
        # bob may use the same id in his own namespace
        await ops.start(forever, id="report", owner="bob")
        assert await ops.cancel("report", owner="alice") is CancelOutcome.CANCELLED
        bob = await ops.status("report", owner="bob")
        assert bob is not None
        assert bob.state is OperationState.RUNNING


async def test_a_running_id_cannot_be_started_twice(make: Make) -> None:
    """Starting an id that runs for the owner raises OperationExists; a finished one may rerun."""

    async def quick() -> int:
        return 1

    async with make() as ops:
        await ops.start(forever, id="x", owner="alice")
        with pytest.raises(OperationExists):
            await ops.start(forever, id="x", owner="alice")
        await ops.cancel("x", owner="alice")
        await ops.wait("x", owner="alice")
        await ops.start(quick, id="x", owner="alice")
        status = await ops.wait("x", owner="alice")
        assert status is not None
        assert status.state is OperationState.COMPLETED


async def test_limits_refuse_clearly_and_per_owner_limits_spare_other_owners(make: Make) -> None:
    """max_running_per_owner and max_running raise RegistryFull naming the option."""
    async with make(max_running=3, max_running_per_owner=2) as ops:
        await ops.start(forever, id="a1", owner="alice")
        await ops.start(forever, id="a2", owner="alice")
        with pytest.raises(RegistryFull) as info:
            await ops.start(forever, id="a3", owner="alice")
        assert (info.value.limit, info.value.value) == ("max_running_per_owner", 2)
        assert await ops.status("a3", owner="alice") is None  # nothing was recorded
        await ops.start(forever, id="b1", owner="bob")  # bob is not affected
        with pytest.raises(RegistryFull) as info:
            await ops.start(forever, id="c1", owner="carol")
        assert (info.value.limit, info.value.value) == ("max_running", 3)
        await ops.cancel("a1", owner="alice")
        await ops.wait("a1", owner="alice")
        await ops.start(forever, id="a3", owner="alice")  # room again
        assert ops.statistics().refused == 2
        assert ops.statistics().running == 3


async def test_retention_is_bounded_in_the_shared_tests_too(make: Make) -> None:
    """Through the factory: max_retained=1 keeps only the newest ended status."""

    async def quick() -> None:
        pass

    async with make(max_retained=1) as ops:
        await ops.wait(await ops.start(quick, id="first"))
        await ops.wait(await ops.start(quick, id="second"))
        assert await ops.status("first") is None
        assert await ops.status("second") is not None


async def test_progress_reports_show_in_the_status(make: Make) -> None:
    """report() from the operation updates its status; the last report stays after the end."""
    step = anyio.Event()
    go_on = anyio.Event()

    async def export() -> None:
        await ops.report(1, 3, "first table")
        step.set()
        await go_on.wait()
        await ops.report(3, 3)

    async with make() as ops:
        id = await ops.start(export)
        await step.wait()
        status = await ops.status(id)
        assert status is not None
        assert status.progress == Progress(1, 3, "first table")
        go_on.set()
        final = await ops.wait(id)
    assert final is not None
    assert final.progress == Progress(3, 3, None)
    with pytest.raises(RuntimeError, match="running background operation"):
        await ops.report(1)


async def test_shutdown_lets_operations_finish_within_the_grace_period(make: Make) -> None:
    """On exit, running operations get the grace period; new starts are refused meanwhile."""
    finish = anyio.Event()
    refused: list[OperationCancelled] = []

    async def export() -> str:
        await finish.wait()
        return "done"

    async def during_shutdown(ops: BackgroundOperations) -> None:
        await anyio.wait_all_tasks_blocked()  # the lifespan is now in its grace wait
        with pytest.raises(OperationCancelled) as info:
            await ops.start(export)
        refused.append(info.value)
        finish.set()

    async with anyio.create_task_group() as tg, make(grace=3600) as ops:
        id = await ops.start(export)
        tg.start_soon(during_shutdown, ops)
    status = await ops.status(id)
    assert status is not None
    assert status.state is OperationState.COMPLETED
    assert status.result == "done"
    assert refused[0].reason.kind is CancelKind.SHUTDOWN


async def test_shutdown_cancels_after_the_grace_period_and_waits_for_cleanup(make: Make) -> None:
    """After the grace period, operations are cancelled with 'shutdown'; exit awaits cleanup."""
    cleanup: list[str] = []

    async def export() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.lowlevel.checkpoint()  # cleanup that awaits
                cleanup.append("closed the file")

    async with make(grace=0) as ops:
        id = await ops.start(export, owner="alice")
    assert cleanup == ["closed the file"]
    status = await ops.status(id, owner="alice")
    assert status is not None
    assert status.state is OperationState.CANCELLED
    assert status.reason is not None
    assert status.reason.kind is CancelKind.SHUTDOWN
    assert ops.statistics().cancelled == {CancelKind.SHUTDOWN: 1}


async def test_shutdown_stops_waiting_after_cleanup_timeout_and_says_so(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    """A cleanup slower than cleanup_timeout: exit logs it, cancels the task group, goes on."""
    proceed = anyio.Event()
    cleanup: list[str] = []

    async def slow_cleanup() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            # bounded by the app; here: by the test
            with anyio.CancelScope(shield=True), anyio.fail_after(30):
                await proceed.wait()
                cleanup.append("flushed")

    async def later() -> None:
        await anyio.wait_all_tasks_blocked()  # the shutdown gave up waiting by now
        proceed.set()

    async with anyio.create_task_group() as tg, make(grace=0, cleanup_timeout=0) as ops:
        id = await ops.start(slow_cleanup)
        tg.start_soon(later)
    assert "still running 0.0 s after the shutdown cancellation" in caplog.text
    assert cleanup == ["flushed"]
    status = await ops.status(id)
    assert status is not None
    assert status.state is OperationState.CANCELLED
    assert status.reason is not None
    assert status.reason.kind is CancelKind.SHUTDOWN


async def test_the_callers_cancellation_does_not_stop_the_operation(make: Make) -> None:
    """The operation runs in the lifespan's task group: the starting request may go away."""
    release = anyio.Event()

    async def export() -> str:
        await release.wait()
        return "finished"

    async with make() as ops:
        with anyio.CancelScope() as request_scope:
            id = await ops.start(export)
            request_scope.cancel()
            await anyio.lowlevel.checkpoint()
        release.set()
        status = await ops.wait(id)
    assert status is not None
    assert status.result == "finished"


async def cancel_after(scope: anyio.CancelScope, checkpoints: int) -> None:
    for _ in range(checkpoints):
        await anyio.lowlevel.checkpoint()
    scope.cancel()


def cancel_soon(group: TaskGroup, scope: anyio.CancelScope, checkpoints: int) -> None:
    """Cancel ``scope`` once ``checkpoints`` rounds of the scheduler passed (0: now)."""
    if checkpoints:
        group.start_soon(cancel_after, scope, checkpoints)
    else:
        scope.cancel()


async def test_a_caller_cancelled_at_any_point_of_start_leaves_a_running_operation(
    make: Make,
) -> None:
    """The caller of start() is cancelled after its k-th checkpoint, for every k until start()
    returns: start() raises the caller's cancellation, the operation still runs to its end
    (never a lingering running status, never a cancellation with reason shutdown)."""

    async def export(k: int) -> int:
        await anyio.lowlevel.checkpoint()
        return k

    interrupted = returned_in_a_row = 0
    async with make() as ops:
        for k in range(2000):
            id = f"op-{k}"
            returned = None
            async with anyio.create_task_group() as group:
                with anyio.CancelScope() as request_scope:
                    cancel_soon(group, request_scope, k)
                    returned = await ops.start(export, k, id=id, owner="alice")
            with anyio.fail_after(10):
                status = await ops.wait(id, owner="alice")
            assert status is not None, k
            assert (status.state, status.result, status.reason) == (
                OperationState.COMPLETED,
                k,
                None,
            ), k
            if returned is None:
                assert request_scope.cancelled_caught  # the caller's cancellation propagated
                interrupted += 1
                returned_in_a_row = 0
            else:
                assert returned == id
                returned_in_a_row += 1
                if returned_in_a_row == 5:
                    break  # start() no longer suspends this long: every point was tried
        else:
            pytest.fail("start() never returned")
        assert interrupted >= 1
        assert ops.statistics().started == k + 1
        assert ops.statistics().running == 0


async def test_a_refused_start_of_a_cancelled_caller_leaves_nothing(make: Make) -> None:
    """A start refused (its id runs already) while the caller was cancelled ends quietly."""
    async with make() as ops:
        await ops.start(forever, id="dup", owner="alice")
        with anyio.CancelScope() as request_scope:
            request_scope.cancel()
            with pytest.raises(OperationExists):
                await ops.start(forever, id="dup", owner="alice")  # refused before it waits
        assert ops.statistics().running == 1
        assert await ops.cancel("dup", owner="alice") is CancelOutcome.CANCELLED


async def test_wait_is_bounded_by_the_callers_scope(make: Make) -> None:
    """wait() under move_on_after returns nothing early; status() still says running."""
    async with make() as ops:
        id = await ops.start(forever)
        with anyio.move_on_after(0):
            await ops.wait(id)
        status = await ops.status(id)
        assert status is not None
        assert status.state is OperationState.RUNNING
        assert await ops.wait("nobody-started-this") is None


async def test_misuse_is_refused_with_clear_errors() -> None:
    """Not entered, bad ids and owners, bad options: clear errors, nothing recorded."""
    ops = BackgroundOperations()
    with pytest.raises(RuntimeError, match="enter it first"):
        await ops.start(forever)
    async with ops:
        with pytest.raises(ValueError, match="invalid operation id"):
            await ops.start(forever, id="no spaces")
        with pytest.raises(ValueError, match="invalid owner"):
            await ops.start(forever, owner="")
        with pytest.raises(RuntimeError, match="already running"):
            await ops.__aenter__()
        assert "up running=0" in repr(ops)
    assert "stopped" in repr(ops)
    bad: list[dict[str, Any]] = [{"max_running": 0}, {"max_running_per_owner": 0}, {"grace": -1}]
    for options in bad:
        with pytest.raises(ValueError, match=next(iter(options))):
            BackgroundOperations(**options)


async def test_a_shared_registry_sees_operations_and_requests_alike() -> None:
    """Operations are tracked in the registry given: its cancel() stops them too."""
    registry = TokenRegistry()
    async with BackgroundOperations(registry=registry, grace=0) as ops:
        id = await ops.start(forever, owner="alice")
        assert [op.id for op in registry.operations(owner="alice")] == [id]
        assert await registry.cancel(id, owner="alice") is CancelOutcome.CANCELLED
        status = await ops.wait(id, owner="alice")
    assert status is not None
    assert status.state is OperationState.CANCELLED


async def test_many_racing_starts_and_cancels_all_end_consistently(make: Make) -> None:
    """60 operations; cancels before, during and after their start race them: every one
    ends cancelled or completed as its cancel's outcome says, and nothing stays running."""
    release = anyio.Event()

    async def work(n: int) -> int:
        await release.wait()
        return n

    outcomes: dict[str, CancelOutcome] = {}
    async with make(max_running=100) as ops:

        async def start(n: int) -> None:
            await ops.start(work, n, id=f"op-{n}", owner=f"u{n % 3}")

        async def cancel(n: int) -> None:
            outcomes[f"op-{n}"] = await ops.cancel(f"op-{n}", owner=f"u{n % 3}")

        async with anyio.create_task_group() as tg:
            for n in range(60):
                if n % 3 == 0:  # cancel first, then start
                    await cancel(n)
                    tg.start_soon(start, n)
                elif n % 3 == 1:  # start and cancel race
                    tg.start_soon(start, n)
                    tg.start_soon(cancel, n)
                else:  # started, never cancelled
                    tg.start_soon(start, n)
        release.set()
        for n in range(60):
            status = await ops.wait(f"op-{n}", owner=f"u{n % 3}")
            assert status is not None
            outcome = outcomes.get(f"op-{n}")
            if outcome in (CancelOutcome.PENDING, CancelOutcome.CANCELLED):
                assert status.state is OperationState.CANCELLED, (n, outcome)
            else:
                assert status.state is OperationState.COMPLETED, (n, outcome)
                assert status.result == n
        assert ops.statistics().running == 0
        assert all(ops.registry.operations(owner=f"u{k}") == [] for k in range(3))


class SlowStore:
    """A StatusStore whose running-status writes wait for the test (an app's own store)."""

    def __init__(self) -> None:
        self.inner = MemoryStatusStore()
        self.gate = anyio.Event()
        self.writes: list[OperationStatus] = []
        self.waiting = anyio.Event()

    @property
    def worker(self) -> str | None:
        return None

    async def __aenter__(self) -> SlowStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    async def put(self, status: OperationStatus) -> None:
        if status.progress is not None and not status.state.ended:
            self.waiting.set()
            await self.gate.wait()
        self.writes.append(status)
        await self.inner.put(status)

    async def get(self, id: str, owner: str | None) -> OperationStatus | None:
        return await self.inner.get(id, owner)


async def test_progress_reports_coalesce_while_a_write_is_in_flight() -> None:
    """Five reports during one slow write make two writes: the first and the newest."""
    store = SlowStore()
    reported = anyio.Event()

    async def export() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ops.report, 1)  # its write waits at the gate
            await store.waiting.wait()
            for done in range(2, 6):
                await ops.report(done)  # return at once: the write in flight takes them
            reported.set()
        # the first report's task wrote the newest progress before it returned

    async with BackgroundOperations(store=store) as ops:
        id = await ops.start(export)
        await reported.wait()
        store.gate.set()
        status = await ops.wait(id)
    assert status is not None
    assert status.state is OperationState.COMPLETED
    progress = [s.progress.done for s in store.writes if s.progress and not s.state.ended]
    assert progress == [1, 5]
    assert status.progress == Progress(5)


async def test_a_committed_operation_completes_whatever_cancel_comes(make: Make) -> None:
    """After operations.commit(), cancel() answers COMMITTED and the operation completes."""
    committed, go = anyio.Event(), anyio.Event()

    async def send_export(operations: BackgroundOperations) -> str:
        await operations.commit()
        committed.set()
        await go.wait()  # sending: must not be cut
        return "sent"

    async with make() as ops:
        id = await ops.start(send_export, ops, owner="alice")
        await committed.wait()
        assert await ops.cancel(id, owner="alice") is CancelOutcome.COMMITTED
        go.set()
        status = await ops.wait(id, owner="alice")
        assert status is not None
        assert status.state is OperationState.COMPLETED
        assert status.result == "sent"


async def test_an_operation_cancelled_before_its_commit_point_ends_cancelled(make: Make) -> None:
    """A cancel before operations.commit(): commit() raises, the status says cancelled and
    keeps no result, even though the function would have returned one."""
    cancelled, reached = anyio.Event(), []

    async def send_export(operations: BackgroundOperations) -> str:
        with anyio.CancelScope(shield=True):  # preparing, not interruptible
            await cancelled.wait()  # the cancel lands meanwhile
        await operations.commit()  # refused: the cancel came first
        reached.append("sent")  # pragma: no cover
        return "sent"  # pragma: no cover

    async with make() as ops:
        id = await ops.start(send_export, ops, owner="alice")
        assert await ops.cancel(id, owner="alice") is CancelOutcome.CANCELLED
        cancelled.set()
        status = await ops.wait(id, owner="alice")
        assert status is not None
        assert status.state is OperationState.CANCELLED
        assert status.result is None
    assert reached == []


async def test_commit_outside_an_operation_is_refused(make: Make) -> None:
    """operations.commit() outside one of its operations is a RuntimeError naming it."""
    async with make() as ops:
        with pytest.raises(RuntimeError, match=r"commit\(\) must be called"):
            await ops.commit()
