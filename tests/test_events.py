"""The event seam: one report per cancellation (the innermost unit's), refusal and commit."""

from __future__ import annotations

import logging
import secrets
import time
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

import cancelkit
from cancelkit import (
    BackgroundOperations,
    CancelEvent,
    CancellationToken,
    CancelOnDisconnect,
    LatestOnly,
    OperationCancelled,
    OperationExists,
    SlotBusy,
    TokenRegistry,
    _events,
    request_token,
)
from cancelkit._token import shorten_deadline
from cancelkit.redis import RedisBackend
from tests.conftest import RedisServer
from tests.test_asgi import DISCONNECT, FakeServer, body, http_scope

pytestmark = pytest.mark.anyio


async def _superseded_pair(slot: LatestOnly) -> None:
    """Claim "k", and supersede it with a second claim that completes."""
    first_in = anyio.Event()

    async def first() -> None:
        with pytest.raises(OperationCancelled):
            async with slot.claim("k"):
                first_in.set()
                await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await first_in.wait()
        async with slot.claim("k"):
            pass


async def leave_while_running(app: Any, running: anyio.Event) -> None:
    """Serve one request of ``app`` under CancelOnDisconnect; its client leaves once it runs."""
    server = FakeServer(body())
    async with anyio.create_task_group() as tg:
        tg.start_soon(CancelOnDisconnect(app), http_scope("/work"), server.receive, server.send)
        await running.wait()
        await anyio.wait_all_tasks_blocked()
        server.client(DISCONNECT)


async def test_nothing_is_reported_without_a_cancellation(events: list[CancelEvent]) -> None:
    async with LatestOnly().claim("k"), TokenRegistry().track("op"):
        pass
    assert events == []


async def test_a_supersede_is_reported_once_by_the_claim_it_stopped(
    events: list[CancelEvent],
) -> None:
    slot = LatestOnly()
    await _superseded_pair(slot)
    assert len(events) == 1, events
    event = events[0]
    assert (event.what, event.kind, event.where, event.name) == (
        "cancelled",
        "superseded",
        "claim",
        "k",
    )
    assert event.reason is not None
    assert event.source == event.reason.source is not None
    assert event.cancel_to_exit is not None
    assert event.cancel_to_exit >= 0
    assert event.ran_for is not None
    assert event.ran_for >= event.cancel_to_exit


async def test_cancel_by_id_is_reported_with_the_owner(events: list[CancelEvent]) -> None:
    registry = TokenRegistry()
    running = anyio.Event()

    async def work() -> None:
        with pytest.raises(OperationCancelled):
            async with registry.track("op", owner="alice"):
                running.set()
                await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(work)
        await running.wait()
        await registry.cancel("op", owner="alice")
    assert [(e.what, e.kind, e.where, e.name, e.owner) for e in events] == [
        ("cancelled", "requested", "operation", "op", "alice")
    ]


async def test_refusals_are_reported(events: list[CancelEvent]) -> None:
    registry, reject = TokenRegistry(), LatestOnly(policy="reject")
    async with registry.track("op"), reject.claim("k"):
        with pytest.raises(OperationExists):
            async with registry.track("op"):
                pass  # pragma: no cover
        with pytest.raises(SlotBusy):
            async with reject.claim("k"):
                pass  # pragma: no cover
    slot = LatestOnly()
    async with slot.claim("s", seq=5):
        pass
    with pytest.raises(OperationCancelled):
        async with slot.claim("s", seq=4):
            pass  # pragma: no cover
    assert [(e.what, e.kind, e.where, e.name) for e in events] == [
        ("refused", "exists", "operation", "op"),
        ("refused", "busy", "claim", "k"),
        ("refused", "stale", "claim", "s"),
    ]


async def test_a_commit_is_reported_and_a_later_cancel_is_not(
    events: list[CancelEvent],
) -> None:
    registry = TokenRegistry()
    async with registry.track("op") as op:
        await op.commit()
        assert await registry.cancel("op") is cancelkit.CancelOutcome.COMMITTED
    assert [(e.what, e.kind, e.where) for e in events] == [("committed", "committed", "operation")]


async def test_a_disconnect_is_reported_once_by_the_innermost_unit(
    events: list[CancelEvent],
) -> None:
    """The client leaves while the request holds an operation: one event, the operation's
    (the request, whose token's cancellation reached the operation's, stays silent)."""
    registry = TokenRegistry()
    running = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        async with registry.track("op", parent=request_token(scope)):
            running.set()
            await anyio.sleep_forever()

    await leave_while_running(app, running)
    assert [(e.kind, e.where, e.name) for e in events] == [
        ("client_disconnected", "operation", "op")
    ]


async def test_a_request_alone_reports_its_disconnect(events: list[CancelEvent]) -> None:
    running = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        running.set()
        await anyio.sleep_forever()

    await leave_while_running(app, running)
    assert [(e.kind, e.where) for e in events] == [("client_disconnected", "request")]
    assert events[0].cancel_to_exit is not None


async def test_a_failing_listener_is_logged_and_the_work_goes_on(
    events: list[CancelEvent], caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: CancelEvent) -> None:
        raise RuntimeError("listener bug")

    remove = cancelkit.add_listener(broken)
    try:
        await _superseded_pair(LatestOnly())
    finally:
        remove()
    assert len(events) == 1  # the other listener still heard it
    assert any("listener failed" in r.getMessage() for r in caplog.records)
    assert any(r.levelno == logging.ERROR for r in caplog.records)


def test_a_listener_must_be_callable() -> None:
    with pytest.raises(TypeError, match="callable"):
        cancelkit.add_listener("print")  # type: ignore[arg-type]


async def test_log_events_writes_one_line_per_event_with_its_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="cancelkit.events")
    stop = cancelkit.log_events()
    try:
        await _superseded_pair(LatestOnly())
    finally:
        stop()
    await _superseded_pair(LatestOnly())  # stopped: nothing more
    records = [r for r in caplog.records if r.name == "cancelkit.events"]
    assert len(records) == 1
    record = records[0]
    assert (record.cancel_what, record.cancel_kind, record.cancel_where) == (  # type: ignore[attr-defined]
        "cancelled",
        "superseded",
        "claim",
    )
    assert record.cancel_name == "k"  # type: ignore[attr-defined]
    assert record.cancel_to_exit >= 0  # type: ignore[attr-defined]
    assert record.getMessage().startswith("claim k cancelled: superseded by ")


async def test_a_cancel_from_another_worker_is_reported_by_the_worker_that_stopped(
    events: list[CancelEvent], redis: RedisServer
) -> None:
    prefix = "ev" + secrets.token_hex(4)
    async with (
        RedisBackend(redis.url, prefix=prefix) as a,
        RedisBackend(redis.url, prefix=prefix) as b,
    ):
        running = anyio.Event()

        async def work() -> None:
            with pytest.raises(OperationCancelled):
                async with TokenRegistry(backend=a).track("op"):
                    running.set()
                    await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            tg.start_soon(work)
            await running.wait()
            await TokenRegistry(backend=b).cancel("op")
    assert [(e.what, e.kind, e.where, e.name) for e in events] == [
        ("cancelled", "requested", "operation", "op")
    ]


async def test_a_shutdown_reports_each_operation_it_stopped(events: list[CancelEvent]) -> None:
    """One shutdown reason, one event per operation it stopped (side by side: none inside
    another), with the time each had run."""
    async with BackgroundOperations(registry=TokenRegistry(), grace=0) as ops:
        for n in range(3):
            await ops.start(anyio.sleep_forever, id=f"op{n}")
    assert sorted((e.what, e.kind, e.where, e.name) for e in events) == [
        ("cancelled", "shutdown", "operation", f"op{n}") for n in range(3)
    ]
    assert all(e.ran_for is not None and e.ran_for >= 0 for e in events)


async def test_one_parent_cancel_reports_each_operation_it_stopped(
    events: list[CancelEvent],
) -> None:
    registry, parent = TokenRegistry(), CancellationToken()
    running = 0

    async def work(n: int) -> None:
        nonlocal running
        with pytest.raises(OperationCancelled):
            async with registry.track(f"op{n}", parent=parent):
                running += 1
                await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        for n in range(3):
            tg.start_soon(work, n)
        await anyio.wait_all_tasks_blocked()
        assert running == 3
        parent.cancel()
    assert sorted((e.kind, e.where, e.name) for e in events) == [
        ("requested", "operation", f"op{n}") for n in range(3)
    ]


async def test_a_deadline_counts_from_the_deadline_not_from_its_notice(
    events: list[CancelEvent],
) -> None:
    """The body runs on past its deadline (no check in between): cancel -> exit counts from
    the deadline, at least the time the test saw the body run past it."""
    with pytest.raises(OperationCancelled):
        async with TokenRegistry().track("op") as op:
            shorten_deadline(op.token, time.monotonic() - 1.0)  # passed a second ago
            past = time.monotonic() - op.token.deadline  # the body still runs: >= 1 s
            op.token.raise_if_cancelled()  # the token notices only now
    (event,) = events
    assert event.kind == "deadline"
    assert event.cancel_to_exit is not None
    assert event.cancel_to_exit >= past


async def test_a_deadline_relayed_to_a_child_counts_from_the_deadline(
    events: list[CancelEvent],
) -> None:
    parent = CancellationToken()
    with pytest.raises(OperationCancelled):
        async with TokenRegistry().track("op", parent=parent) as op:
            shorten_deadline(parent, time.monotonic() - 1.0)
            past = time.monotonic() - parent.deadline
            parent.raise_if_cancelled()  # noticed by the parent, relayed to the operation
    (event,) = events
    assert (event.kind, event.where) == ("deadline", "operation")
    assert event.cancel_to_exit is not None
    assert event.cancel_to_exit >= past
    assert op.token.cancelled_by is parent


async def test_a_token_reported_twice_gives_one_event(events: list[CancelEvent]) -> None:
    token = CancellationToken()
    token.cancel()
    _events.report("operation", token, "op")
    _events.report("operation", token, "op")
    assert len(events) == 1


async def test_units_cancelled_with_one_reason_object_each_report(
    events: list[CancelEvent],
) -> None:
    """Two requests cancelled with the same shutdown reason, the first around an operation:
    the operation and the second request report; the first request, whose token's
    cancellation reached the operation, stays silent."""
    shutdown = cancelkit.CancelReason(cancelkit.CancelKind.SHUTDOWN)
    first, second = CancellationToken(), CancellationToken()
    inner = CancellationToken.any_of(first)
    first.cancel(shutdown)
    second.cancel(shutdown)
    _events.report("operation", inner, "op")
    _events.report("request", first, "/a")
    _events.report("request", second, "/b")
    assert [(e.kind, e.where, e.name) for e in events] == [
        ("shutdown", "operation", "op"),
        ("shutdown", "request", "/b"),
    ]


# -- units side by side in one request carry its route (review 7b) ----------------------------


async def test_side_by_side_operations_of_one_request_all_carry_its_route(
    events: list[CancelEvent],
) -> None:
    """Two operations side by side in one request, both stopped by the client leaving: two
    events (one each), and both name the request's route."""
    registry = TokenRegistry()
    running = anyio.Event()
    server = FakeServer(body())

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scope["route"] = SimpleNamespace(path="/work/{id}")
        token = request_token(scope)
        entered = 0

        async def op(name: str) -> None:
            nonlocal entered
            async with registry.track(name, parent=token):
                entered += 1
                if entered == 2:
                    running.set()
                await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            tg.start_soon(op, "a")
            tg.start_soon(op, "b")

    async with anyio.create_task_group() as tg:
        tg.start_soon(CancelOnDisconnect(app), http_scope("/work/1"), server.receive, server.send)
        await running.wait()
        await anyio.wait_all_tasks_blocked()
        server.client(DISCONNECT)
    assert sorted((e.where, e.name, e.route) for e in events) == [
        ("operation", "a", "/work/{id}"),
        ("operation", "b", "/work/{id}"),
    ]
    assert _events.requests == {}
