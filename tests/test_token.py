from __future__ import annotations

import asyncio
import gc
import logging
import math
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator

import anyio
import anyio.lowlevel
import pytest
from anyio import wait_all_tasks_blocked
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cancelkit import (
    CallbackHandle,
    CancelKind,
    CancellationToken,
    CancelReason,
    OperationCancelled,
    TokenStatistics,
    current_token,
)

# -- state, cancel, reasons ------------------------------------------------------------------


def test_new_token_is_live() -> None:
    """A fresh token is not cancelled and has no reason."""
    token = CancellationToken()
    assert not token.cancelled
    assert token.reason is None
    assert token.cancelled_by is None
    token.raise_if_cancelled()


def test_cancel_is_idempotent_and_first_reason_wins() -> None:
    """Only the first cancel() returns True, and its reason is the one kept."""
    token = CancellationToken()
    first = CancelReason(CancelKind.SUPERSEDED, source="req-2")
    assert token.cancel(first) is True
    assert token.cancel(CancelReason(CancelKind.SHUTDOWN)) is False
    assert token.cancel() is False
    assert token.cancelled
    assert token.reason is first


def test_cancel_without_reason_means_requested() -> None:
    """cancel() with no reason records kind 'requested'."""
    token = CancellationToken()
    token.cancel()
    assert token.reason is not None
    assert token.reason.kind is CancelKind.REQUESTED


def test_cancel_with_a_bad_reason_is_rejected_and_changes_nothing() -> None:
    """A reason that is not a CancelReason is a TypeError and leaves the token live."""
    token = CancellationToken()
    with pytest.raises(TypeError, match="reason must be a CancelReason or None, not str"):
        token.cancel("stop")  # type: ignore[arg-type]
    assert not token.cancelled


def test_raise_if_cancelled_raises_with_the_reason() -> None:
    """raise_if_cancelled() raises OperationCancelled carrying the token's reason."""
    token = CancellationToken()
    reason = CancelReason(CancelKind.SHUTDOWN)
    token.cancel(reason)
    with pytest.raises(OperationCancelled) as info:
        token.raise_if_cancelled()
    assert info.value.reason is reason


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"timeout": -1}, ValueError, "timeout must be a number of seconds >= 0, not -1"),
        ({"timeout": float("nan")}, ValueError, "timeout must be a number of seconds >= 0"),
        ({"timeout": "5"}, TypeError, "timeout must be a number of seconds, not str"),
        ({"timeout": True}, TypeError, "timeout must be a number of seconds, not bool"),
        ({"name": 5}, TypeError, "name must be a str or None, not int"),
    ],
)
def test_bad_constructor_arguments_name_the_problem(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    """Invalid timeout or name values are rejected with a message naming the argument."""
    with pytest.raises(error, match=match):
        CancellationToken(**kwargs)  # type: ignore[arg-type]


def _race_cancel(token: CancellationToken, threads: int) -> list[tuple[bool, CancelReason]]:
    barrier = threading.Barrier(threads)
    results: list[tuple[bool, CancelReason]] = []

    def cancel(index: int) -> None:
        reason = CancelReason(source=str(index))
        barrier.wait()
        results.append((token.cancel(reason), reason))

    workers = [threading.Thread(target=cancel, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return results


def test_concurrent_cancels_from_many_threads_have_one_winner() -> None:
    """Of many threads cancelling at once, exactly one gets True and its reason is kept."""
    for _ in range(50):
        token = CancellationToken()
        results = _race_cancel(token, 8)
        winners = [reason for won, reason in results if won]
        assert len(winners) == 1
        assert token.reason is winners[0]


# -- callbacks -------------------------------------------------------------------------------


def test_on_cancel_runs_callbacks_in_order_with_the_reason() -> None:
    """Callbacks run once, in registration order, and receive the reason."""
    token = CancellationToken()
    seen: list[tuple[int, CancelReason]] = []
    token.on_cancel(lambda r: seen.append((1, r)))
    token.on_cancel(lambda r: seen.append((2, r)))
    reason = CancelReason(CancelKind.SHUTDOWN)
    token.cancel(reason)
    token.cancel()
    assert seen == [(1, reason), (2, reason)]


def test_on_cancel_after_cancel_runs_at_once() -> None:
    """Registering on a cancelled token calls the callback immediately."""
    token = CancellationToken()
    token.cancel()
    seen: list[CancelReason] = []
    handle = token.on_cancel(seen.append)
    assert seen == [token.reason]
    assert not handle.registered
    assert handle.unregister() is False


def test_unregister_prevents_the_callback() -> None:
    """An unregistered callback never runs; unregister() reports True only the first time."""
    token = CancellationToken()
    seen: list[CancelReason] = []
    handle = token.on_cancel(seen.append)
    assert handle.registered
    assert handle.unregister() is True
    assert handle.unregister() is False
    token.cancel()
    assert seen == []
    assert token.statistics().callbacks == 0


def test_unregister_after_the_callback_ran_reports_false() -> None:
    """unregister() after cancellation says the callback already ran."""
    token = CancellationToken()
    seen: list[CancelReason] = []
    handle = token.on_cancel(seen.append)
    token.cancel()
    assert handle.unregister() is False
    assert len(seen) == 1


def _unregister_the_later_callback() -> list[object]:
    token = CancellationToken()
    calls: list[object] = []
    handles: dict[str, CallbackHandle] = {}
    token.on_cancel(lambda reason: calls.append(("a", handles["b"].unregister())))
    handles["b"] = token.on_cancel(lambda reason: calls.append("b"))
    token.cancel()
    return calls


def test_a_callback_that_unregisters_a_later_one_stops_it() -> None:
    """unregister() from inside an earlier callback of the same cancel still prevents the run."""
    assert _unregister_the_later_callback() == [("a", True)]


@pytest.mark.anyio
async def test_a_callback_that_unregisters_a_later_one_stops_it_in_a_loop() -> None:
    """The same with callbacks registered in the event loop that cancels."""
    assert _unregister_the_later_callback() == [("a", True)]


def test_callback_errors_are_collected_logged_and_never_stop_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failing callback neither stops the others nor escapes cancel(); it is kept and logged."""
    token = CancellationToken(name="job")
    seen: list[str] = []

    def boom(reason: CancelReason) -> None:
        raise RuntimeError("boom")

    def bang(reason: CancelReason) -> None:
        raise KeyError("bang")

    token.on_cancel(boom)
    token.on_cancel(lambda r: seen.append("after boom"))
    token.on_cancel(bang)
    with caplog.at_level(logging.ERROR, logger="cancelkit"):
        assert token.cancel() is True
    assert seen == ["after boom"]
    errors = token.callback_errors
    assert [type(e) for e in errors] == [RuntimeError, KeyError]
    assert token.statistics().callback_errors == 2
    assert len(caplog.records) == 2
    assert all(record.exc_info for record in caplog.records)
    assert "'job'" in caplog.records[0].getMessage()


def test_error_of_a_callback_run_at_registration_is_collected() -> None:
    """A callback that fails when run at once on a cancelled token is kept, not raised."""
    token = CancellationToken()
    token.cancel()

    def boom(reason: CancelReason) -> None:
        raise RuntimeError("late boom")

    token.on_cancel(boom)
    assert [str(e) for e in token.callback_errors] == ["late boom"]


def test_on_cancel_rejects_non_callables() -> None:
    """A callback that cannot be called is a TypeError at registration."""
    with pytest.raises(TypeError, match="callback must be callable, not int"):
        CancellationToken().on_cancel(42)  # type: ignore[arg-type]


def test_callback_may_cancel_its_own_token_again() -> None:
    """Re-entrant cancel() from a callback is harmless and returns False."""
    token = CancellationToken()
    results: list[bool] = []
    token.on_cancel(lambda r: results.append(token.cancel()))
    token.cancel()
    assert results == [False]


def test_callback_registered_in_a_thread_runs_in_the_cancelling_thread() -> None:
    """Outside an event loop, a callback runs synchronously in the thread that cancels."""
    token = CancellationToken()
    ran_in: list[int] = []
    token.on_cancel(lambda r: ran_in.append(threading.get_ident()))
    thread = threading.Thread(target=token.cancel)
    thread.start()
    thread.join()
    assert ran_in == [thread.ident]


# -- waiting ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_wait_returns_the_reason_when_cancelled_by_another_task() -> None:
    """await wait() blocks until another task cancels, then returns the reason."""
    token = CancellationToken()
    got: list[CancelReason] = []

    async def waiter() -> None:
        got.append(await token.wait())

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await wait_all_tasks_blocked()
        assert got == []
        reason = CancelReason(CancelKind.SHUTDOWN)
        token.cancel(reason)
    assert got == [reason]
    assert token.statistics().callbacks == 0


@pytest.mark.anyio
async def test_wait_on_a_cancelled_token_returns_at_once() -> None:
    """wait() on an already-cancelled token returns its reason without blocking."""
    token = CancellationToken()
    token.cancel()
    with anyio.fail_after(5):
        assert await token.wait() is token.reason


@pytest.mark.anyio
async def test_wait_is_woken_by_a_cancel_from_another_thread() -> None:
    """cancel() from a foreign thread wakes a waiter in the event loop."""
    token = CancellationToken()
    got: list[CancelReason] = []

    async def waiter() -> None:
        got.append(await token.wait())

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await wait_all_tasks_blocked()
            await anyio.to_thread.run_sync(token.cancel)
    assert len(got) == 1
    assert got[0].kind is CancelKind.REQUESTED


@pytest.mark.anyio
async def test_loop_callback_runs_in_the_loop_thread_when_cancelled_from_a_thread() -> None:
    """A callback registered in the event loop runs in the loop thread, not the canceller's."""
    token = CancellationToken()
    loop_thread = threading.get_ident()
    ran_in: list[int] = []
    ran = anyio.Event()

    def callback(reason: CancelReason) -> None:
        ran_in.append(threading.get_ident())
        ran.set()

    token.on_cancel(callback)
    with anyio.fail_after(10):
        await anyio.to_thread.run_sync(token.cancel)
        await ran.wait()
    assert ran_in == [loop_thread]


@pytest.mark.anyio
async def test_callback_unregistered_before_the_loop_runs_it_is_skipped() -> None:
    """A thread's cancel schedules the loop callback; unregistering before it runs wins."""
    token = CancellationToken()
    seen: list[CancelReason] = []
    handle = token.on_cancel(seen.append)
    thread = threading.Thread(target=token.cancel)
    thread.start()
    thread.join()  # the callback is now queued in the loop, not yet run
    assert handle.unregister() is True
    await wait_all_tasks_blocked()
    await anyio.lowlevel.checkpoint()
    assert seen == []


def test_callback_of_a_finished_loop_is_dropped() -> None:
    """Cancelling after the registering event loop ended neither fails nor runs the callback."""
    token = CancellationToken()
    seen: list[CancelReason] = []
    handles: list[CallbackHandle] = []

    async def register() -> None:
        handles.append(token.on_cancel(seen.append))

    anyio.run(register)
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(token.cancel()))
    thread.start()
    thread.join()
    assert result == [True]
    assert seen == []
    assert not handles[0].registered


@pytest.mark.anyio
async def test_failing_callback_run_later_in_the_loop_is_collected() -> None:
    """An error from a callback the loop runs on a thread's behalf is kept, not lost."""
    token = CancellationToken()
    done = anyio.Event()

    def boom(reason: CancelReason) -> None:
        done.set()
        raise RuntimeError("in loop")

    token.on_cancel(boom)
    with anyio.fail_after(10):
        await anyio.to_thread.run_sync(token.cancel)
        await done.wait()
    assert [str(e) for e in token.callback_errors] == ["in loop"]


def test_wait_blocking_in_a_thread_returns_when_cancelled() -> None:
    """A worker thread blocked in wait_blocking() wakes when another thread cancels."""
    token = CancellationToken()
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(token.wait_blocking(30)))
    thread.start()
    while token.statistics().callbacks == 0:
        time.sleep(0.001)
    token.cancel()
    thread.join(30)
    assert result == [True]
    assert token.statistics().callbacks == 0


def test_wait_blocking_times_out_on_a_live_token() -> None:
    """wait_blocking(timeout) returns False when nothing cancelled it in time."""
    token = CancellationToken()
    assert token.wait_blocking(0.01) is False
    assert token.statistics().callbacks == 0


def test_wait_blocking_on_a_cancelled_token_returns_true_at_once() -> None:
    """wait_blocking() on a cancelled token does not wait."""
    token = CancellationToken()
    token.cancel()
    assert token.wait_blocking() is True


def test_wait_blocking_honours_the_deadline() -> None:
    """With no timeout, wait_blocking() still returns at the token's deadline."""
    token = CancellationToken(timeout=0.02)
    assert token.wait_blocking() is True
    assert token.reason is not None
    assert token.reason.kind is CancelKind.DEADLINE


@pytest.mark.anyio
async def test_wait_blocking_refuses_to_block_the_event_loop() -> None:
    """wait_blocking() called in the event loop thread is a RuntimeError, not a hang."""
    with pytest.raises(RuntimeError, match="would block the event loop"):
        CancellationToken().wait_blocking(0)


@pytest.mark.anyio
async def test_sync_code_in_a_worker_thread_sees_the_token_and_stops() -> None:
    """current_token() reaches a worker thread, where raise_if_cancelled() stops the work."""
    token = CancellationToken()
    steps: list[int] = []

    def work() -> None:
        own = current_token()
        assert own is token
        for step in range(10_000):
            own.raise_if_cancelled()
            steps.append(step)
            if step == 3:
                anyio.from_thread.run_sync(token.cancel)

    with token.move_on(), pytest.raises(OperationCancelled):
        await anyio.to_thread.run_sync(work)
    assert steps == [0, 1, 2, 3]


# -- linking ---------------------------------------------------------------------------------


def test_child_is_cancelled_with_its_parent_and_keeps_the_origin() -> None:
    """A child follows its parent; its reason is 'parent' with the parent's reason as origin."""
    parent = CancellationToken()
    child = parent.child()
    grandchild = child.child()
    origin = CancelReason(CancelKind.SHUTDOWN)
    parent.cancel(origin)
    assert child.reason is not None
    assert child.reason.kind is CancelKind.PARENT
    assert child.reason.origin is origin
    assert child.cancelled_by is parent
    assert grandchild.reason is not None
    assert grandchild.reason.root is origin
    assert grandchild.cancelled_by is child


def test_cancelling_a_child_leaves_the_parent_alone() -> None:
    """Cancellation flows down links, never up."""
    parent = CancellationToken()
    child = parent.child()
    child.cancel()
    assert not parent.cancelled


def test_any_of_reports_which_input_fired() -> None:
    """any_of() is cancelled by the first input that is, and names it."""
    a, b, c = CancellationToken(), CancellationToken(), CancellationToken()
    combined = CancellationToken.any_of(a, b, c)
    b.cancel(CancelReason(CancelKind.SUPERSEDED, source="req-9"))
    a.cancel()
    assert combined.cancelled_by is b
    assert combined.reason is not None
    assert combined.reason.root.source == "req-9"
    assert a.statistics().callbacks == 0
    assert c.statistics().callbacks == 0


def test_any_of_an_already_cancelled_input_starts_cancelled() -> None:
    """Linking to a token that is already cancelled gives a cancelled token at once."""
    live, dead = CancellationToken(), CancellationToken()
    dead.cancel(CancelReason(CancelKind.SHUTDOWN))
    combined = CancellationToken.any_of(live, dead)
    assert combined.cancelled_by is dead
    assert live.statistics().callbacks == 0
    assert combined.statistics().parents == 0


def test_any_of_rejects_non_tokens() -> None:
    """any_of() with something that is not a token is a TypeError naming its type."""
    with pytest.raises(TypeError, match="any_of\\(\\) takes CancellationToken objects, not str"):
        CancellationToken.any_of(CancellationToken(), "x")  # type: ignore[arg-type]


def test_any_of_nothing_is_a_plain_token() -> None:
    """any_of() with no inputs is never cancelled by a link."""
    token = CancellationToken.any_of()
    assert not token.cancelled
    assert token.statistics().parents == 0


def test_links_are_released_when_the_child_is_cancelled() -> None:
    """A cancelled child unregisters from every parent, so parents do not keep it."""
    a, b = CancellationToken(), CancellationToken()
    child = CancellationToken.any_of(a, b)
    assert a.statistics().callbacks == 1
    child.cancel()
    assert a.statistics().callbacks == 0
    assert b.statistics().callbacks == 0
    assert child.statistics().parents == 0


def test_links_are_released_when_the_child_is_dropped() -> None:
    """A long-lived parent does not grow with children that were dropped without cancelling."""
    parent = CancellationToken()
    for _ in range(10_000):
        child = parent.child()
        assert not child.cancelled
    del child
    assert parent.statistics().callbacks == 0
    parent.cancel()


def test_a_dropped_child_is_freed_without_the_cycle_collector() -> None:
    """The parent's link to a child is weak and cycle-free: refcounting alone frees the child."""
    parent = CancellationToken()
    child = parent.child()
    ref = weakref.ref(child)
    gc.disable()
    try:
        del child
        assert ref() is None
        assert parent.statistics().callbacks == 0
    finally:
        gc.enable()


def test_any_of_racing_a_cancel_in_another_thread_leaves_no_link_behind() -> None:
    """A child cancelled by another thread while any_of() links it leaks no link (issue 12.3)."""
    shutdown = CancellationToken(name="shutdown")
    for _ in range(40):
        first = CancellationToken()
        go = threading.Event()

        def cancel_first(token: CancellationToken = first, go: threading.Event = go) -> None:
            go.wait()
            token.cancel()

        thread = threading.Thread(target=cancel_first)
        thread.start()
        go.set()  # the cancel lands somewhere among the links below
        CancellationToken.any_of(first, *[shutdown] * 2000)
        thread.join()
    gc.collect()
    assert shutdown.statistics().callbacks == 0


def test_close_releases_the_links_and_the_parents_deadline() -> None:
    """close() unlinks a child from its parents: no callbacks left, no parent deadline."""
    parent = CancellationToken(timeout=1000)
    child = parent.child()
    assert child.deadline == parent.deadline
    child.close()
    child.close()
    assert parent.statistics().callbacks == 0
    assert child.statistics().parents == 0
    assert child.deadline == math.inf
    parent.cancel()
    assert not child.cancelled


def test_a_child_closed_by_an_earlier_callback_of_the_same_cancel_stays_live() -> None:
    """close() from inside the parent's cancel (through a sibling) still unlinks the child."""
    parent = CancellationToken()
    first = parent.child()
    second = parent.child()
    first.on_cancel(lambda reason: second.close())
    parent.cancel()
    assert first.cancelled
    assert not second.cancelled


def test_parent_cancelled_after_child_cancelled_does_not_touch_the_child() -> None:
    """A child cancelled first keeps its own reason when the parent is cancelled later."""
    parent = CancellationToken()
    child = parent.child()
    own = CancelReason(CancelKind.SUPERSEDED)
    child.cancel(own)
    parent.cancel()
    assert child.reason is own
    assert child.cancelled_by is None


def test_a_child_collected_by_the_gc_while_the_parent_is_locked_does_not_hang() -> None:
    """A child freed by the cyclic GC inside the parent's locked section unlinks without a hang."""

    def provoke() -> None:
        for extra in range(12):  # the GC must run at one of the allocations under the lock
            parent = CancellationToken()
            gc.collect()
            child = parent.child()
            cycle: list[object] = [child]
            cycle.append(cycle)  # the child is now only reachable through a cycle
            del child, cycle
            gc.set_threshold(gc.get_count()[0] + extra)
            try:
                parent.statistics()
            finally:
                gc.set_threshold(700)
            gc.collect()
            assert parent.statistics().callbacks == 0

    worker = threading.Thread(target=provoke, daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "deadlocked in the token's lock"


def test_child_made_in_a_finished_loop_follows_a_parent_cancelled_from_a_thread() -> None:
    """Links do not depend on an event loop: the child is cancelled at once, in any thread."""
    parent = CancellationToken()
    made: list[CancellationToken] = []

    async def make_child() -> None:
        made.append(parent.child())

    anyio.run(make_child)  # the loop that made the child is gone
    seen: list[bool] = []
    thread = threading.Thread(target=lambda: seen.append(parent.cancel() and made[0].cancelled))
    thread.start()
    thread.join(10)
    assert seen == [True]


@pytest.mark.anyio
async def test_child_sees_a_parent_cancelled_from_a_worker_thread_at_once() -> None:
    """A worker thread that cancels the parent sees the child cancelled before returning."""
    parent = CancellationToken()
    child = parent.child()

    def cancel_and_look() -> tuple[bool, bool]:
        parent.cancel()
        return child.cancelled, child.wait_blocking(0)

    assert await anyio.to_thread.run_sync(cancel_and_look) == (True, True)


# -- deadlines -------------------------------------------------------------------------------


def _frozen_clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    now = [1000.0]
    monkeypatch.setattr("cancelkit._token.time.monotonic", lambda: now[0])

    def advance(seconds: float) -> None:
        now[0] += seconds

    return advance


def test_cancel_after_a_deadline_nobody_observed_reports_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A deadline that passed before cancel() is the first reason, read or not (issue 12.4)."""
    advance = _frozen_clock(monkeypatch)
    token = CancellationToken(timeout=1)
    advance(2)
    assert token.cancel(CancelReason(CancelKind.REQUESTED)) is False
    assert token.reason is not None
    assert token.reason.kind is CancelKind.DEADLINE


def test_a_parent_cancel_after_the_childs_unobserved_deadline_keeps_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A child whose own deadline passed unobserved reports it, not the parent's later cancel."""
    advance = _frozen_clock(monkeypatch)
    parent = CancellationToken()
    child = parent.child(timeout=1)
    advance(2)
    parent.cancel()
    assert child.reason is not None
    assert child.reason.kind is CancelKind.DEADLINE
    assert child.cancelled_by is None


def _live(token: CancellationToken) -> bool:
    """Read the state through a call, so the type checker does not pin it between reads."""
    return not token.cancelled


def test_deadline_is_reported_as_deadline_when_it_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token whose deadline passed counts as cancelled with kind 'deadline' and runs callbacks."""
    advance = _frozen_clock(monkeypatch)
    token = CancellationToken(timeout=5, name="query")
    seen: list[CancelReason] = []
    token.on_cancel(seen.append)
    assert token.deadline == 1005.0
    advance(4.9)
    assert _live(token)
    advance(0.2)
    assert token.cancelled
    assert token.reason is not None
    assert token.reason.kind is CancelKind.DEADLINE
    assert token.reason.source == "query"
    assert seen == [token.reason]


def test_cancel_before_the_deadline_is_not_a_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token cancelled before its deadline keeps the cancel reason after the deadline passes."""
    advance = _frozen_clock(monkeypatch)
    token = CancellationToken(timeout=1)
    token.cancel()
    advance(10)
    assert token.reason is not None
    assert token.reason.kind is CancelKind.REQUESTED


def test_child_of_a_parent_with_a_deadline_reports_the_parents_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The parent's deadline cancels the parent (deadline) and reaches the child as 'parent'."""
    advance = _frozen_clock(monkeypatch)
    parent = CancellationToken(timeout=1)
    child = parent.child(timeout=10)
    assert child.deadline == parent.deadline
    advance(2)
    assert child.cancelled
    assert parent.reason is not None
    assert parent.reason.kind is CancelKind.DEADLINE
    assert child.reason is not None
    assert child.reason.kind is CancelKind.PARENT
    assert child.reason.origin is parent.reason


def test_childs_own_earlier_deadline_is_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child whose own deadline comes first reports 'deadline' and leaves the parent live."""
    advance = _frozen_clock(monkeypatch)
    parent = CancellationToken(timeout=10)
    child = parent.child(timeout=1)
    advance(20)
    assert child.reason is not None
    assert child.reason.kind is CancelKind.DEADLINE
    assert not parent.cancelled or parent.reason is not None
    assert child.cancelled_by is None


def test_grandparent_deadline_is_found_through_a_live_parent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An expired grandparent deadline reaches a grandchild through the chain of links."""
    advance = _frozen_clock(monkeypatch)
    grandparent = CancellationToken(timeout=1)
    parent = grandparent.child()
    grandchild = parent.child(timeout=30)
    advance(5)
    assert grandchild.reason is not None
    assert grandchild.reason.root.kind is CancelKind.DEADLINE
    assert grandparent.reason is not None
    assert grandparent.reason.kind is CancelKind.DEADLINE


def test_on_cancel_after_the_deadline_runs_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registering on a token whose deadline already passed calls the callback immediately."""
    advance = _frozen_clock(monkeypatch)
    token = CancellationToken(timeout=1)
    advance(2)
    seen: list[CancelReason] = []
    token.on_cancel(seen.append)
    assert [r.kind for r in seen] == [CancelKind.DEADLINE]


def test_zero_timeout_is_cancelled_at_once() -> None:
    """timeout=0 gives a token that is already past its deadline."""
    token = CancellationToken(timeout=0)
    with pytest.raises(OperationCancelled) as info:
        token.raise_if_cancelled()
    assert info.value.reason.kind is CancelKind.DEADLINE


@pytest.mark.anyio
async def test_scope_ends_at_the_deadline_with_reason_deadline() -> None:
    """A scope of a token with a timeout is interrupted on time with kind 'deadline'."""
    token = CancellationToken(timeout=0.02)
    with anyio.fail_after(10), pytest.raises(OperationCancelled) as info, token.scope():
        await anyio.sleep(30)
    assert info.value.reason.kind is CancelKind.DEADLINE
    assert token.reason is info.value.reason


@pytest.mark.anyio
async def test_scope_of_a_child_ends_at_the_parents_deadline() -> None:
    """A child's scope honours the parent's deadline and reports it as the origin."""
    parent = CancellationToken(timeout=0.02)
    child = parent.child()
    with anyio.fail_after(10), pytest.raises(OperationCancelled) as info, child.scope():
        await anyio.sleep(30)
    assert info.value.reason.kind is CancelKind.PARENT
    assert info.value.reason.root.kind is CancelKind.DEADLINE


@pytest.mark.anyio
async def test_wait_returns_at_the_deadline() -> None:
    """wait() on a token with a timeout returns the 'deadline' reason when it passes."""
    token = CancellationToken(timeout=0.02)
    with anyio.fail_after(10):
        reason = await token.wait()
    assert reason.kind is CancelKind.DEADLINE
    assert token.statistics().callbacks == 0


# -- scopes ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_scope_interrupts_the_block_and_raises_operation_cancelled() -> None:
    """Cancelling the token stops the block at its next await, as OperationCancelled."""
    token = CancellationToken()
    reached_end = False

    async def body() -> None:
        nonlocal reached_end
        with token.scope():
            await anyio.sleep_forever()
        reached_end = True  # pragma: no cover - must not run

    async with anyio.create_task_group() as tg:

        async def run() -> None:
            with pytest.raises(OperationCancelled) as info:
                await body()
            assert info.value.reason.kind is CancelKind.SUPERSEDED

        tg.start_soon(run)
        await wait_all_tasks_blocked()
        token.cancel(CancelReason(CancelKind.SUPERSEDED))
    assert not reached_end
    assert token.statistics().callbacks == 0


@pytest.mark.anyio
async def test_scope_of_a_cancelled_token_never_starts_the_block() -> None:
    """Entering a scope whose token is already cancelled raises before the block runs."""
    token = CancellationToken()
    token.cancel(CancelReason(CancelKind.REQUESTED, source="early"))
    started = False
    with pytest.raises(OperationCancelled) as info, token.scope():
        started = True  # pragma: no cover - must not run
    assert not started
    assert info.value.reason.source == "early"
    assert current_token() is None


@pytest.mark.anyio
async def test_scope_that_finishes_before_noticing_keeps_its_result() -> None:
    """A block that completes without reaching an await after the cancel is not discarded."""
    token = CancellationToken()
    with token.scope() as scope:
        token.cancel()
        result = 42
    assert result == 42
    assert not scope.cancelled_caught


@pytest.mark.anyio
async def test_scope_lets_other_exceptions_through_unchanged() -> None:
    """An error raised by the block propagates as itself."""
    token = CancellationToken()
    with pytest.raises(ZeroDivisionError), token.scope():
        await anyio.lowlevel.checkpoint()
        _ = 1 / 0


@pytest.mark.anyio
async def test_scope_sets_and_restores_current_token() -> None:
    """current_token() is the innermost scope's token, and is restored on exit."""
    outer, inner = CancellationToken(), CancellationToken()
    assert current_token() is None
    with outer.scope():
        assert current_token() is outer
        with inner.move_on():
            assert current_token() is inner
        assert current_token() is outer
    assert current_token() is None


@pytest.mark.anyio
async def test_inner_token_cancellation_passes_through_an_outer_scope() -> None:
    """An inner token's OperationCancelled is not re-attributed to an enclosing token scope."""
    outer, inner = CancellationToken(), CancellationToken()
    with pytest.raises(OperationCancelled) as info, outer.scope(), inner.scope():
        inner.cancel(CancelReason(CancelKind.SUPERSEDED))
        await anyio.sleep_forever()
    assert info.value.reason.kind is CancelKind.SUPERSEDED
    assert not outer.cancelled


@pytest.mark.anyio
async def test_scope_can_be_entered_only_once() -> None:
    """Re-entering a used scope object is a RuntimeError."""
    token = CancellationToken()
    scope = token.scope()
    with scope:
        pass
    with pytest.raises(RuntimeError, match="only be entered once"), scope:
        pass  # pragma: no cover


@pytest.mark.anyio
async def test_move_on_swallows_the_tokens_cancellation_and_records_it() -> None:
    """move_on() ends the block quietly and says that it did, and why."""
    token = CancellationToken()
    with token.move_on() as scope:
        token.cancel(CancelReason(CancelKind.CLIENT_DISCONNECTED))
        await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert scope.reason is not None
    assert scope.reason.kind is CancelKind.CLIENT_DISCONNECTED


@pytest.mark.anyio
async def test_move_on_without_cancellation_records_nothing() -> None:
    """move_on() over a block that finishes normally reports no cancellation."""
    token = CancellationToken()
    with token.move_on() as scope:
        await anyio.lowlevel.checkpoint()
    assert not scope.cancelled_caught
    assert scope.reason is None


@pytest.mark.anyio
async def test_move_on_of_a_cancelled_token_stops_at_the_first_await() -> None:
    """move_on() on a cancelled token runs the block only up to its first await."""
    token = CancellationToken()
    token.cancel()
    steps: list[str] = []
    with token.move_on() as scope:
        steps.append("before")
        await anyio.lowlevel.checkpoint()
        steps.append("after")  # pragma: no cover - must not run
    assert steps == ["before"]
    assert scope.cancelled_caught


@pytest.mark.anyio
async def test_scope_is_interrupted_by_a_cancel_from_another_thread() -> None:
    """cancel() from a foreign thread interrupts a scope in the event loop."""
    token = CancellationToken()

    def canceller() -> None:
        anyio.from_thread.run_sync(lambda: None)  # the loop is alive and the scope entered
        token.cancel(CancelReason(CancelKind.SHUTDOWN))

    with anyio.fail_after(10), pytest.raises(OperationCancelled) as info, token.scope():
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, canceller)
            await anyio.sleep_forever()
    assert info.value.reason.kind is CancelKind.SHUTDOWN


@pytest.mark.anyio
async def test_cancellation_during_cleanup_interrupts_unshielded_cleanup() -> None:
    """A cancel that arrives while the block is in its finally clause stops that cleanup too."""
    token = CancellationToken()
    steps: list[str] = []
    with pytest.raises(OperationCancelled), token.scope():
        try:
            steps.append("work")
        finally:
            token.cancel()
            await anyio.lowlevel.checkpoint()
            steps.append("cleanup finished")  # pragma: no cover - must not run
    assert steps == ["work"]


@pytest.mark.anyio
async def test_shielded_cleanup_completes_after_interruption() -> None:
    """Cleanup in a shielded anyio scope finishes, then the cancellation surfaces."""
    token = CancellationToken()
    steps: list[str] = []
    with pytest.raises(OperationCancelled), token.scope():
        try:
            token.cancel()
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.lowlevel.checkpoint()
                token.cancel()  # a second cancel during cleanup changes nothing
                await anyio.lowlevel.checkpoint()
                steps.append("cleanup finished")
    assert steps == ["cleanup finished"]


# -- outer cancellation must never be swallowed or converted -------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("token_first", [True, False])
@pytest.mark.parametrize("swallow", [True, False])
async def test_outer_cancellation_at_the_same_moment_propagates_as_itself(
    token_first: bool, swallow: bool
) -> None:
    """An outer scope cancelled together with the token wins: no OperationCancelled, no swallow."""
    token = CancellationToken()
    after_inner: list[str] = []
    with anyio.CancelScope() as outer:
        with token.move_on() if swallow else token.scope():
            if token_first:
                token.cancel()
                outer.cancel()
            else:
                outer.cancel()
                token.cancel()
            await anyio.sleep_forever()
        after_inner.append("continued")  # pragma: no cover - must not run
    assert outer.cancelled_caught
    assert after_inner == []


@pytest.mark.anyio
async def test_outer_cancellation_alone_is_not_converted() -> None:
    """An outer cancel scope's cancellation passes through a token scope untouched."""
    token = CancellationToken()
    with anyio.CancelScope() as outer, token.scope() as scope:
        outer.cancel()
        await anyio.sleep_forever()
    assert outer.cancelled_caught
    assert not scope.cancelled_caught
    assert not token.cancelled


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("token_too", [True, False])
async def test_native_task_cancel_propagates_as_cancelled_error(token_too: bool) -> None:
    """asyncio Task.cancel() on a task inside a token scope raises CancelledError, never ours."""
    token = CancellationToken()
    entered = asyncio.Event()
    outcome: list[str] = []

    async def body() -> None:
        try:
            with token.scope():
                entered.set()
                await asyncio.sleep(30)
        except asyncio.CancelledError:
            outcome.append("CancelledError")
            raise
        except OperationCancelled:  # pragma: no cover - must not happen
            outcome.append("OperationCancelled")

    task = asyncio.ensure_future(body())
    await entered.wait()
    if token_too:
        token.cancel()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert outcome == ["CancelledError"]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_native_trio_cancel_scope_propagates() -> None:
    """A trio cancel scope cancelled around a token scope gets its trio.Cancelled back."""
    import trio

    token = CancellationToken()
    with trio.CancelScope() as outer, token.scope():
        outer.cancel()
        token.cancel()
        await trio.sleep_forever()
    assert outer.cancelled_caught


# -- introspection ---------------------------------------------------------------------------


def test_statistics_is_a_frozen_snapshot() -> None:
    """statistics() reports callbacks, parents, state and errors as an immutable value."""
    parent = CancellationToken()
    child = parent.child()
    child.on_cancel(lambda r: None)
    stats = child.statistics()
    assert stats == TokenStatistics(cancelled=False, callbacks=1, parents=1, callback_errors=0)
    with pytest.raises(AttributeError):
        stats.cancelled = True  # type: ignore[misc]


def test_repr_shows_the_state() -> None:
    """repr() names the token, its state and, once cancelled, the reason."""
    token = CancellationToken(name="search", timeout=60)
    assert token.name == "search"
    assert repr(token).startswith("<CancellationToken 'search' live callbacks=0 deadline_in=")
    token.cancel(CancelReason(CancelKind.SUPERSEDED, source="r2"))
    assert repr(token) == (
        "<CancellationToken 'search' cancelled "
        "(superseded: superseded by a newer request (source: r2))>"
    )
    assert repr(CancellationToken()) == "<CancellationToken live callbacks=0>"


def test_handle_and_scope_reprs() -> None:
    """Handles and scopes describe themselves."""
    token = CancellationToken()
    handle = token.on_cancel(print)
    assert repr(handle).startswith("<CallbackHandle registered callback=")
    handle.unregister()
    assert repr(handle) == "<CallbackHandle done callback=None>"
    assert repr(token.move_on()).startswith("<TokenScope move_on cancelled_caught=False token=")
    assert repr(token.scope()).startswith("<TokenScope scope ")


# -- a stateful model of cancellation through links -----------------------------------------


class TokenGraphMachine(RuleBasedStateMachine):
    """Tokens linked in a DAG behave like a plain model: cancel flows to every descendant."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens: dict[int, CancellationToken] = {}
        self.parents: dict[int, tuple[int, ...]] = {}
        self.cancelled: dict[int, str] = {}  # id -> source of the root cancel
        self.next_id = 0

    def _descendants(self, ident: int) -> list[int]:
        return [c for c, ps in self.parents.items() if ident in ps]

    def _model_cancel(self, ident: int, source: str) -> None:
        if ident in self.cancelled:
            return
        self.cancelled[ident] = source
        for child in self._descendants(ident):
            self._model_cancel(child, source)

    @rule(data=st.data())
    def new_token(self, data: st.DataObject) -> None:
        parents = tuple(
            data.draw(st.lists(st.sampled_from(sorted(self.tokens)), max_size=3, unique=True))
            if self.tokens
            else ()
        )
        ident = self.next_id
        self.next_id += 1
        self.tokens[ident] = CancellationToken.any_of(*(self.tokens[p] for p in parents))
        self.parents[ident] = parents
        fired = [p for p in parents if p in self.cancelled]
        if fired:
            self.cancelled[ident] = self.cancelled[fired[0]]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        ident = data.draw(st.sampled_from(sorted(self.tokens)))
        expected = ident not in self.cancelled
        assert self.tokens[ident].cancel(CancelReason(source=str(ident))) is expected
        self._model_cancel(ident, str(ident))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        # The test lets go of a token; live descendants still keep it (and its links) alive.
        del self.tokens[data.draw(st.sampled_from(sorted(self.tokens)))]

    def _alive(self) -> set[int]:
        alive = set(self.tokens)
        changed = True
        while changed:
            changed = False
            for child, parents in self.parents.items():
                if child in alive and child not in self.cancelled:
                    for parent in parents:
                        if parent not in alive:
                            alive.add(parent)
                            changed = True
        return alive

    @invariant()
    def states_match_the_model(self) -> None:
        for ident, token in self.tokens.items():
            reason = token.reason
            if ident not in self.cancelled:
                assert reason is None, ident
                continue
            assert reason is not None, ident
            assert reason.root.source == self.cancelled[ident]
            if reason.kind is CancelKind.PARENT:
                assert token.cancelled_by is not None

    @invariant()
    def live_links_are_exactly_the_live_children(self) -> None:
        for ident, token in self.tokens.items():
            if ident in self.cancelled:
                assert token.statistics().callbacks == 0
                continue
            alive = self._alive()
            children = [
                c for c in self._descendants(ident) if c in alive and c not in self.cancelled
            ]
            assert token.statistics().callbacks == len(children), ident


TestTokenGraph = TokenGraphMachine.TestCase
TestTokenGraph.settings = settings(max_examples=150, stateful_step_count=30)


# -- until_cancelled ------------------------------------------------------------------------


def test_until_cancelled_refuses_a_sync_generator_naming_the_fix() -> None:
    """A sync generator is refused when the stream is made, not when it is first read (inside
    the server, with an error that named nothing)."""

    def chunks() -> Iterator[bytes]:
        yield b"x"  # pragma: no cover

    with pytest.raises(TypeError, match=r"async iterable, not generator.*async def"):
        CancellationToken().until_cancelled(chunks())  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_until_cancelled_yields_everything_when_never_cancelled() -> None:
    """A live token passes every item through and ends with the source."""

    async def numbers() -> AsyncIterator[int]:
        for i in range(3):
            await anyio.lowlevel.checkpoint()
            yield i

    token = CancellationToken()
    assert [i async for i in token.until_cancelled(numbers())] == [0, 1, 2]


@pytest.mark.anyio
async def test_until_cancelled_stops_a_pending_wait_and_closes_the_source() -> None:
    """Cancelling interrupts the wait for the next item; the iteration ends without an error."""
    token = CancellationToken()
    closed = anyio.Event()

    async def endless() -> AsyncIterator[int]:
        try:
            yield 1
            await anyio.sleep_forever()
            yield 2  # pragma: no cover
        finally:
            closed.set()

    got: list[int] = []
    async with anyio.create_task_group() as tg:

        async def consume() -> None:
            got.extend([i async for i in token.until_cancelled(endless())])

        tg.start_soon(consume)
        await wait_all_tasks_blocked()
        token.cancel()
    assert got == [1]
    assert closed.is_set()


@pytest.mark.anyio
async def test_until_cancelled_on_a_cancelled_token_yields_nothing() -> None:
    """A token cancelled before iteration starts yields no item at all."""

    async def one() -> AsyncIterator[int]:
        yield 1  # pragma: no cover

    token = CancellationToken()
    token.cancel()
    assert [i async for i in token.until_cancelled(one())] == []
