from __future__ import annotations

import logging
import math
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import coredis
import pytest

from cancelkit import (
    CancelKind,
    CancelOutcome,
    CancelReason,
    LatestOnly,
    OperationCancelled,
    RegistryFull,
    SlotBusy,
    TokenRegistry,
)
from cancelkit.redis import RedisBackend, RedisBackendStatistics, RedisUnavailable, _dump
from tests.conftest import RedisServer

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def prefix() -> str:
    return "ck" + secrets.token_hex(4)


@asynccontextmanager
async def workers(
    redis: RedisServer, prefix: str, n: int = 2, **options: Any
) -> AsyncIterator[list[RedisBackend]]:
    """``n`` backends in this process, standing in for ``n`` worker processes."""
    options.setdefault("heartbeat", 0.2)
    options.setdefault("timeout", 0.5)
    options.setdefault("retry_delay", 0.02)
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(RedisBackend(redis.url, prefix=prefix, **options))
            for _ in range(n)
        ]


@asynccontextmanager
async def raw(redis: RedisServer) -> AsyncIterator[coredis.Redis[str]]:
    async with coredis.Redis.from_url(redis.url, decode_responses=True) as client:
        yield client


async def wait_for(predicate: Callable[[], bool], timeout: float = 10) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


async def keys_of(client: coredis.Redis[str], prefix: str) -> dict[str, int]:
    """Every key under the prefix with its PTTL."""
    found: dict[str, int] = {}
    async for key in client.scan_iter(match=f"{prefix}:*"):
        found[key] = await client.pttl(key)
    return found


async def hold(token_scope: Any, started: anyio.Event) -> None:
    started.set()
    await anyio.sleep_forever()


# -- across workers, in one process -------------------------------------------------------


async def test_supersede_reaches_the_other_worker(redis: RedisServer, prefix: str) -> None:
    """A claim on worker B cancels worker A's body with reason superseded, source B's claim."""
    async with workers(redis, prefix) as (a, b):
        slot_a, slot_b = LatestOnly(backend=a), LatestOnly(backend=b)
        started = anyio.Event()
        caught: list[OperationCancelled] = []

        async def first() -> None:
            try:
                async with slot_a.claim("k"):
                    started.set()
                    await anyio.sleep_forever()
            except OperationCancelled as exc:
                caught.append(exc)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(first)
                await started.wait()
                async with slot_b.claim("k") as claim:
                    await wait_for(lambda: bool(caught))
        assert caught[0].reason.kind is CancelKind.SUPERSEDED
        assert caught[0].reason.source == claim.id
        assert slot_a.statistics().superseded == 1


async def test_supersede_within_one_worker_is_direct(redis: RedisServer, prefix: str) -> None:
    """Two claims on the same worker supersede each other without a pub/sub round trip."""
    async with workers(redis, prefix, n=1) as (a,):
        slot = LatestOnly(backend=a)
        async with slot.claim("k") as old, slot.claim("k") as new:
            assert old.token.cancelled
            assert old.token.reason == CancelReason(CancelKind.SUPERSEDED, source=new.id)
            assert not new.token.cancelled
        assert a.statistics().messages_received == 0


async def test_cancel_by_id_reaches_the_other_worker(redis: RedisServer, prefix: str) -> None:
    """registry.cancel(id) on worker B stops the operation tracked on worker A."""
    async with workers(redis, prefix) as (a, b):
        reg_a, reg_b = TokenRegistry(backend=a), TokenRegistry(backend=b)
        started = anyio.Event()
        caught: list[OperationCancelled] = []

        async def run() -> None:
            try:
                async with reg_a.track("op-1", owner="u"):
                    started.set()
                    await anyio.sleep_forever()
            except OperationCancelled as exc:
                caught.append(exc)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                await started.wait()
                reason = CancelReason(CancelKind.REQUESTED, message="stop", source="btn")
                assert await reg_b.cancel("op-1", owner="u", reason=reason) is (
                    CancelOutcome.CANCELLED
                )
        assert caught[0].reason == reason
        assert await reg_b.cancel("op-1", owner="u") is CancelOutcome.NOT_FOUND


async def test_cancel_before_register_across_workers(redis: RedisServer, prefix: str) -> None:
    """A cancel on B before A registers makes A's operation start cancelled; its body never runs."""
    async with workers(redis, prefix) as (a, b):
        reg_a, reg_b = TokenRegistry(backend=a), TokenRegistry(backend=b)
        reason = CancelReason(CancelKind.REQUESTED, message="early")
        assert await reg_b.cancel("op-2", reason=reason) is CancelOutcome.PENDING
        assert await reg_b.cancel("op-2", reason=CancelReason()) is CancelOutcome.PENDING
        ran = False
        with pytest.raises(OperationCancelled) as info:
            async with reg_a.track("op-2"):
                ran = True
        assert not ran
        assert info.value.reason == reason
        assert await reg_b.cancel("op-2") is CancelOutcome.NOT_FOUND


async def test_owner_scoping_across_workers(redis: RedisServer, prefix: str) -> None:
    """An id tracked for one owner is neither cancelled nor pre-cancelled by another owner."""
    async with workers(redis, prefix) as (a, b):
        reg_a, reg_b = TokenRegistry(backend=a), TokenRegistry(backend=b)
        with pytest.raises(OperationCancelled) as info:
            async with reg_a.track("c", owner="a:b") as op:
                assert await reg_b.cancel("c", owner="x") is CancelOutcome.PENDING
                assert await reg_b.cancel("b:c", owner="a") is CancelOutcome.PENDING
                assert await reg_b.cancel("c") is CancelOutcome.PENDING
                await anyio.sleep(0.05)
                assert not op.token.cancelled
                async with reg_a.track("c", owner="y") as other:
                    assert not other.token.cancelled
                assert await reg_b.cancel("c", owner="a:b") is CancelOutcome.CANCELLED
                await anyio.sleep_forever()
        assert info.value.reason.kind is CancelKind.REQUESTED


async def test_same_id_on_two_workers_is_refused(redis: RedisServer, prefix: str) -> None:
    """Tracking an id that another worker tracks for the same owner raises ValueError."""
    async with workers(redis, prefix) as (a, b):
        reg_a, reg_b = TokenRegistry(backend=a), TokenRegistry(backend=b)
        async with reg_a.track("dup"):
            with pytest.raises(ValueError, match="another worker"):
                async with reg_b.track("dup"):
                    pass  # pragma: no cover
            assert b.statistics().registrations == 0
        async with reg_b.track("dup"):
            pass


async def test_reject_policy_across_workers(redis: RedisServer, prefix: str) -> None:
    """With policy reject, a claim on B is refused while A holds the key, and allowed after."""
    async with workers(redis, prefix) as (a, b):
        slot_a = LatestOnly(policy="reject", backend=a)
        slot_b = LatestOnly(policy="reject", backend=b)
        async with slot_a.claim("k"):
            with pytest.raises(SlotBusy):
                async with slot_b.claim("k"):
                    pass  # pragma: no cover
        async with slot_b.claim("k") as claim:
            assert not claim.token.cancelled
        assert b.statistics().claims == 0


async def test_handover_waits_for_the_other_workers_cleanup(
    redis: RedisServer, prefix: str
) -> None:
    """With handover, B's body starts only after A's superseded body finished its cleanup."""
    async with workers(redis, prefix) as (a, b):
        slot_a = LatestOnly(handover_timeout=math.inf, backend=a)
        slot_b = LatestOnly(handover_timeout=math.inf, backend=b)
        events: list[str] = []
        started, release = anyio.Event(), anyio.Event()

        async def first() -> None:
            with pytest.raises(OperationCancelled):
                async with slot_a.claim("k"):
                    started.set()
                    try:
                        await anyio.sleep_forever()
                    finally:
                        with anyio.CancelScope(shield=True):
                            await release.wait()
                            events.append("a cleaned up")

        async def second() -> None:
            async with slot_b.claim("k"):
                events.append("b body")

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(first)
                await started.wait()
                tg.start_soon(second)
                await wait_for(lambda: a.statistics().deliveries == 1)
                await anyio.sleep(0.05)
                assert events == []
                release.set()
        assert events == ["a cleaned up", "b body"]


async def test_generation_fences_across_workers(redis: RedisServer, prefix: str) -> None:
    """Generations grow across workers; is_current is true only for the newest claim."""
    async with workers(redis, prefix) as (a, b):
        slot_a, slot_b = LatestOnly(backend=a), LatestOnly(backend=b)
        with pytest.raises(OperationCancelled):
            async with slot_a.claim("k") as first:
                assert await slot_b.is_current("k", first.generation)
                async with slot_b.claim("k") as second:
                    assert second.generation > first.generation
                    assert not await slot_a.is_current("k", first.generation)
                    assert await slot_a.is_current("k", second.generation)
        assert await a.generation("k") is None


async def test_tombstone_limit_and_expiry(redis: RedisServer, prefix: str) -> None:
    """Tombstones are bounded fleet-wide (RegistryFull) and expire after tombstone_ttl."""
    async with workers(redis, prefix, max_tombstones=2, tombstone_ttl=0.3) as (a, b):
        reg_a, reg_b = TokenRegistry(backend=a), TokenRegistry(backend=b)
        assert await reg_a.cancel("t1") is CancelOutcome.PENDING
        assert await reg_b.cancel("t2") is CancelOutcome.PENDING
        assert await reg_b.cancel("t1") is CancelOutcome.PENDING
        with pytest.raises(RegistryFull):
            await reg_a.cancel("t3")
        async with raw(redis) as client:
            with anyio.fail_after(5):
                while await client.exists([f"{prefix}:t:-:t1", f"{prefix}:t:-:t2"]):
                    await anyio.sleep(0.02)
        assert await reg_a.cancel("t3") is CancelOutcome.PENDING
        async with reg_b.track("t1") as op:
            assert not op.token.cancelled


async def test_released_state_leaves_only_expiring_keys(redis: RedisServer, prefix: str) -> None:
    """After a mixed workload every key under the prefix has a TTL; claims leave nothing."""
    async with workers(redis, prefix) as (a, b), raw(redis) as client:
        reg_a, reg_b = TokenRegistry(backend=a), TokenRegistry(backend=b)
        slot_a, slot_b = LatestOnly(backend=a), LatestOnly(backend=b)
        await reg_b.cancel("early")
        with pytest.raises(OperationCancelled):
            async with reg_a.track("op"), slot_a.claim("k"):
                async with slot_b.claim("k"):
                    live = await keys_of(client, prefix)
                assert {key.split(":")[1] for key in live} == {"r", "k", "q", "t", "tz", "a", "gen"}
                assert all(ttl > 0 for ttl in live.values()), live
                await anyio.sleep_forever()
        with pytest.raises(OperationCancelled):
            async with reg_a.track("early"):
                pass  # pragma: no cover
        left = await keys_of(client, prefix)
        assert all(ttl > 0 for ttl in left.values()), left
        kinds = {key.split(":")[1] for key in left}
        assert kinds <= {"f", "a", "gen"}, left


# -- resilience ---------------------------------------------------------------------------


async def test_resync_delivers_a_lost_cancel(redis: RedisServer, prefix: str) -> None:
    """A cancel recorded in Redis whose message was lost is delivered by the next heartbeat."""
    async with workers(redis, prefix, n=1) as (a,), raw(redis) as client:
        registry = TokenRegistry(backend=a)
        reason = CancelReason(CancelKind.SHUTDOWN, source="ops")
        with pytest.raises(OperationCancelled) as info:
            async with registry.track("op"):
                await client.hset(f"{prefix}:r:-:op", {"c": _dump(reason)})  # no message sent
                await anyio.sleep_forever()
        assert info.value.reason == reason
        assert a.statistics().messages_received == 0


async def test_resync_delivers_a_lost_supersede(redis: RedisServer, prefix: str) -> None:
    """A key taken over in Redis without a message reaches the old holder at the next heartbeat."""
    async with workers(redis, prefix, n=1) as (a,), raw(redis) as client:
        slot = LatestOnly(backend=a)
        with pytest.raises(OperationCancelled) as info:
            async with slot.claim("k"):
                await client.set(f"{prefix}:k:k", "w2 h2 999")
                await anyio.sleep_forever()
        assert info.value.reason == CancelReason(CancelKind.SUPERSEDED, source="h2")
        assert a.statistics().resyncs >= 2
