from __future__ import annotations

import functools
import gc
import logging
import math
import operator
import os
import secrets
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.streams.buffered
import coredis
import pytest

from cancelkit import (
    CancelKind,
    CancelOutcome,
    CancelReason,
    LatestOnly,
    OperationCancelled,
    OperationExists,
    RegistryFull,
    SlotBusy,
    TokenRegistry,
)
from cancelkit.redis import RedisBackend, RedisBackendStatistics, RedisUnavailable
from cancelkit.redis._codec import dump as _dump
from cancelkit.redis._connection import _close_buffers, _Pool
from cancelkit.testing import BackendContract, Workers, sweep_commit
from tests.conftest import RedisServer
from tests.test_docs_blocks import assert_shows

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
    options.setdefault("timeout", 3)  # a loaded CI box can stall a call for a while
    options.setdefault("retry_delay", 0.02)
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(RedisBackend(redis.url, prefix=prefix, **options))
            for _ in range(n)
        ]


class TestRedisBackendContract(BackendContract):
    """cancelkit.testing's contract, across two backends standing in for two workers (and
    on the cluster: test_redis_cluster.py runs this class again with its own ``redis``)."""

    @pytest.fixture
    def workers(self, redis: RedisServer, prefix: str) -> Workers:
        return functools.partial(workers, redis, prefix)


@asynccontextmanager
async def raw(redis: RedisServer) -> AsyncIterator[coredis.Redis[str]]:
    async with coredis.Redis.from_url(redis.url, decode_responses=True) as client:
        yield client


async def wait_for(predicate: Callable[[], bool], limit: float = 10) -> None:
    """Poll a condition that another process or a background task makes true."""
    with anyio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110 - no event exists for what other processes do
            await anyio.sleep(0.005)


async def keys_of(
    client: coredis.Redis[str] | coredis.RedisCluster[str], prefix: str
) -> dict[str, int]:
    """Every key under the prefix (``prefix:…``, or ``{prefix:g}:…`` on a cluster) with its PTTL."""
    found: dict[str, int] = {}
    async for key in client.scan_iter(match=f"*{prefix}*"):
        found[key] = await client.pttl(key)
    return found


def kind_of(key: str) -> str:
    """The kind of a backend key: ``r`` for ``prefix:r:…`` and for ``{prefix:3}:r:…``."""
    return key[key.index("}") + 2 :].split(":")[0] if key.startswith("{") else key.split(":")[1]


def key(backend: RedisBackend, kind: str, name: str, entity: str | None = None) -> str:
    """The name of a backend's key (its layout differs on a cluster): ``kind`` and ``name`` of
    ``entity`` (the operation id of a registration; a latest-only key is its own)."""
    return backend._keys(kind, name, entity)


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
        with pytest.raises(OperationCancelled):  # the old one ends superseded
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
        with pytest.raises(OperationCancelled):  # a retried start, on B this time
            async with reg_b.track("op-2"):
                ran = True
        assert not ran
        assert await reg_b.cancel("op-2") is CancelOutcome.PENDING  # until the tombstone ends


async def test_owner_scoping_across_workers(redis: RedisServer, prefix: str) -> None:
    """An id tracked for one owner is neither cancelled nor pre-cancelled by another owner."""
    async with workers(redis, prefix) as (a, b):
        reg_a, reg_b = TokenRegistry(backend=a), TokenRegistry(backend=b)
        with pytest.raises(OperationCancelled) as info:
            async with reg_a.track("c", owner="a:b") as op:
                # another owner's running id looks absent and cannot be pre-cancelled
                assert await reg_b.cancel("c", owner="x") is CancelOutcome.NOT_FOUND
                assert await reg_b.cancel("c") is CancelOutcome.NOT_FOUND
                assert await reg_b.cancel("b:c", owner="a") is CancelOutcome.PENDING
                await anyio.sleep(0.05)
                assert not op.token.cancelled
                async with reg_a.track("c", owner="y") as other:
                    assert not other.token.cancelled
                assert await reg_b.cancel("c", owner="a:b") is CancelOutcome.CANCELLED
                await anyio.sleep_forever()
        assert info.value.reason.kind is CancelKind.REQUESTED


async def test_same_id_on_two_workers_is_refused(redis: RedisServer, prefix: str) -> None:
    """Tracking an id that another worker tracks for the same owner raises OperationExists."""
    async with workers(redis, prefix) as (a, b):
        reg_a, reg_b = TokenRegistry(backend=a), TokenRegistry(backend=b)
        async with reg_a.track("dup"):
            with pytest.raises(OperationExists, match="already running"):
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
                        with anyio.CancelScope(shield=True), anyio.fail_after(20):
                            await release.wait()  # bounded: a failure must not hang the run
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
        assert not await slot_a.is_current("k", second.generation)


async def test_tombstone_limit_and_expiry(redis: RedisServer, prefix: str) -> None:
    """Tombstones are bounded fleet-wide (RegistryFull) and expire after tombstone_ttl."""
    # one slot group: the limit is exact (a single server has one; see test_redis_cluster)
    async with workers(redis, prefix, max_tombstones=2, tombstone_ttl=0.3, slot_groups=1) as (
        a,
        b,
    ):
        reg_a, reg_b = TokenRegistry(backend=a), TokenRegistry(backend=b)
        assert await reg_a.cancel("t1") is CancelOutcome.PENDING
        assert await reg_b.cancel("t2") is CancelOutcome.PENDING
        assert await reg_b.cancel("t1") is CancelOutcome.PENDING
        with pytest.raises(RegistryFull):
            await reg_a.cancel("t3")
        async with raw(redis) as client:
            with anyio.fail_after(5):
                while await client.exists([key(a, "t", "-:t1", "t1")]) + await client.exists(  # noqa: ASYNC110
                    [key(a, "t", "-:t2", "t2")]
                ):
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
        async with reg_a.track("op"), slot_a.claim("k1"), slot_b.claim("k2"):
            live = await keys_of(client, prefix)
        kinds = {kind_of(name) for name in live}
        assert (
            {"r", "i", "k", "q", "t", "tz", "a", "gen", "co"}
            <= kinds
            <= {*("r", "i", "k", "q", "t", "tz", "a", "gen", "co", "in")}
        )
        assert -1 not in live.values(), live
        with pytest.raises(OperationCancelled):
            async with reg_a.track("early"):
                pass  # pragma: no cover
        left = await keys_of(client, prefix)
        assert -1 not in left.values(), left
        kinds = {kind_of(name) for name in left}
        # t: the tombstone refuses starts until it expires; tz: its (expiring) indexes
        assert kinds <= {"f", "a", "gen", "co", "in", "t", "tz"}, left


# -- resilience ---------------------------------------------------------------------------


async def test_resync_delivers_a_lost_cancel(redis: RedisServer, prefix: str) -> None:
    """A cancel recorded in Redis whose message was lost is delivered by the next heartbeat."""
    async with workers(redis, prefix, n=1) as (a,), raw(redis) as client:
        registry = TokenRegistry(backend=a)
        reason = CancelReason(CancelKind.SHUTDOWN, source="ops")
        with pytest.raises(OperationCancelled) as info:
            async with registry.track("op"):
                await client.hset(key(a, "r", "-:op", "op"), {"c": _dump(reason)})  # no message
                await anyio.sleep_forever()
        assert info.value.reason == reason
        assert a.statistics().messages_received == 0


async def test_cancel_survives_a_lapsed_lease(redis: RedisServer, prefix: str) -> None:
    """A cancel whose message was lost while the registration's lease lapsed still arrives."""
    async with workers(redis, prefix, n=1) as (a,), raw(redis) as client:
        registry = TokenRegistry(backend=a)
        reason = CancelReason(CancelKind.REQUESTED, source="late")
        with pytest.raises(OperationCancelled) as info:
            async with registry.track("op"):
                reg = key(a, "r", "-:op", "op")
                await client.set(f"{reg}#c", _dump(reason), px=10_000)  # what cancel() leaves
                await client.delete([reg])  # the lease lapsed before the heartbeat came
                await anyio.sleep_forever()
        assert info.value.reason == reason
        assert not await client.exists([reg]) + await client.exists([f"{reg}#c"])


async def test_a_registration_taken_over_after_its_lease_lapsed_is_cancelled(
    redis: RedisServer, prefix: str
) -> None:
    """A's lease lapsed (a pause) and B started the id: A's next heartbeat cancels A's copy,
    with reason requested and B's worker as the source; B runs on."""
    async with workers(redis, prefix) as (a, b), raw(redis) as client:
        reg = key(a, "r", "-:op", "op")
        b_started = anyio.Event()
        async with anyio.create_task_group() as group:
            with pytest.raises(OperationCancelled) as info:
                async with TokenRegistry(backend=a).track("op"):
                    await client.delete([reg])  # A's lease lapsed while it was stopped
                    group.start_soon(hold_tracked, TokenRegistry(backend=b), b_started)
                    await b_started.wait()
                    with anyio.fail_after(10):
                        await anyio.sleep_forever()  # A's heartbeat finds B's registration
            assert info.value.reason.kind is CancelKind.REQUESTED
            assert info.value.reason.source == b.worker
            assert b.worker is not None
            assert "started again by another worker" in info.value.reason.message
            assert (await client.hget(reg, "o") or "").startswith(b.worker)  # B's stays
            group.cancel_scope.cancel()


async def hold_tracked(registry: TokenRegistry, started: anyio.Event) -> None:
    """Track "op" and hold it (until the caller's task group is cancelled)."""
    async with registry.track("op"):
        started.set()
        await anyio.sleep_forever()


async def test_a_registration_whose_id_ran_and_ended_elsewhere_is_cancelled(
    redis: RedisServer, prefix: str
) -> None:
    """A's lease lapsed, B ran the id and ended: A's heartbeat does not take the id back (it
    would run a second time), it cancels A's copy."""
    async with workers(redis, prefix) as (a, b), raw(redis) as client:
        reg = key(a, "r", "-:op", "op")
        with pytest.raises(OperationCancelled) as info:
            async with TokenRegistry(backend=a).track("op"):
                await client.delete([reg])  # A's lease lapsed while it was stopped
                async with TokenRegistry(backend=b).track("op"):
                    pass  # B's run: started and ended (a finished-marker stays)
                with anyio.fail_after(10):
                    await anyio.sleep_forever()
        assert info.value.reason.kind is CancelKind.REQUESTED
        assert info.value.reason.source is None
        assert not await client.exists([reg])


async def test_resync_delivers_a_lost_supersede(redis: RedisServer, prefix: str) -> None:
    """A key taken over in Redis without a message reaches the old holder at the next heartbeat."""
    async with workers(redis, prefix, n=1) as (a,), raw(redis) as client:
        slot = LatestOnly(backend=a)
        with pytest.raises(OperationCancelled) as info:
            async with slot.claim("k") as claim:  # superseded in Redis, no message sent
                await client.hset(key(a, "k", "k"), {f"{a.worker} {claim.id}": "s h2"})
                await anyio.sleep_forever()
        assert info.value.reason == CancelReason(CancelKind.SUPERSEDED, source="h2")
        assert a.statistics().resyncs >= 2


async def test_connection_kills_during_a_race_lose_nothing(redis: RedisServer, prefix: str) -> None:
    """Claims and cancels from two workers while pub/sub connections are killed: nothing lost."""
    keys = [f"k{i}" for i in range(8)]
    async with workers(redis, prefix, timeout=5) as backends, raw(redis) as client:
        slots = [LatestOnly(backend=b) for b in backends]
        regs = [TokenRegistry(backend=b) for b in backends]
        alive: dict[str, dict[int, str]] = {key: {} for key in keys}
        newest: dict[str, int] = {}
        ended: list[str] = []
        stop = anyio.Event()

        async def killer() -> None:
            while not stop.is_set():
                await client.client_kill(type_=coredis.PureToken.PUBSUB)
                await anyio.sleep(0.02)

        async def claimer(i: int) -> None:
            key = keys[i % len(keys)]
            try:
                async with slots[i % 2].claim(key) as claim:
                    alive[key][claim.generation] = claim.id
                    newest[key] = max(newest.get(key, 0), claim.generation)
                    try:
                        await anyio.sleep_forever()
                    finally:
                        del alive[key][claim.generation]
            except OperationCancelled:
                pass

        async def operation(i: int) -> None:
            try:
                async with regs[i % 2].track(f"op{i}"):
                    await anyio.sleep_forever()
            except OperationCancelled:
                ended.append(f"op{i}")

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(killer)
                for i in range(200):
                    tg.start_soon(claimer, i)
                    if i % 3 == 0:  # cancel first, track later
                        assert await regs[(i + 1) % 2].cancel(f"op{i}") is CancelOutcome.PENDING
                        tg.start_soon(operation, i)
                    else:
                        tg.start_soon(operation, i)
                        tg.start_soon(regs[(i + 1) % 2].cancel, f"op{i}")
                    if i % 10 == 0:
                        await anyio.sleep(0.01)
                stop.set()
                await wait_for(lambda: len(ended) == 200, limit=25)
                await wait_for(lambda: all(len(alive[key]) == 1 for key in keys), limit=25)
                for key in keys:
                    assert list(alive[key]) == [newest[key]]
                tg.cancel_scope.cancel()
        assert sum(b.statistics().reconnects for b in backends) >= 1


async def test_redis_restart_mid_run(
    redis: RedisServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stopped mid-run: local semantics go on, nothing hangs, one log line, auto recovery."""
    caplog.set_level(logging.INFO, logger="cancelkit.redis")
    async with workers(redis, prefix, timeout=0.5) as (a, b):
        reg_a, reg_b = TokenRegistry(backend=a), TokenRegistry(backend=b)
        slot_a = LatestOnly(backend=a)
        survivor: list[OperationCancelled] = []
        started = anyio.Event()

        def both_up() -> bool:
            return a.statistics().connected and b.statistics().connected

        async def long_running() -> None:
            try:
                async with reg_a.track("survivor"):
                    started.set()
                    await anyio.sleep_forever()
            except OperationCancelled as exc:
                survivor.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_running)
            await started.wait()
            redis.stop()
            with anyio.fail_after(5):
                for _ in range(5):
                    with pytest.raises(OperationCancelled):  # the old one ends superseded
                        async with slot_a.claim("k") as old, slot_a.claim("k") as newer:
                            assert old.token.reason == CancelReason(
                                CancelKind.SUPERSEDED, source=newer.id
                            )
                    with pytest.raises(OperationCancelled):
                        async with reg_a.track("local") as op:
                            assert await reg_a.cancel("local") is CancelOutcome.CANCELLED
                            await anyio.sleep_forever()
                    assert op.token.cancelled
                    with pytest.raises(RedisUnavailable):
                        await reg_b.cancel("survivor")
            assert not a.statistics().connected
            # every call of the loop failed: one line per worker, not per call
            assert _count(caplog, "unreachable") == 2
            assert a.statistics().failures == b.statistics().failures == 1
            redis.start()
            await wait_for(both_up)
            assert await reg_b.cancel("survivor") is CancelOutcome.CANCELLED
            await wait_for(lambda: bool(survivor))
        assert survivor[0].reason.kind is CancelKind.REQUESTED
        # A loaded machine may time out a call just after the restart (timeout=0.5): that
        # is an outage of its own, logged once and ended once like the first.
        await wait_for(both_up)
        episodes = a.statistics().failures + b.statistics().failures
        assert _count(caplog, "unreachable") == episodes
        assert _count(caplog, "reachable again") == episodes


def _count(caplog: pytest.LogCaptureFixture, part: str) -> int:
    return sum(part in message for message in caplog.messages)


async def test_fail_closed_refuses_new_work(redis: RedisServer, prefix: str) -> None:
    """With fail_open=False, new claims, registrations and fencing reads raise RedisUnavailable."""
    async with workers(redis, prefix, n=1, fail_open=False, timeout=0.5) as (a,):
        registry, slot = TokenRegistry(backend=a), LatestOnly(backend=a)
        redis.stop()
        try:
            with anyio.fail_after(5):
                with pytest.raises(RedisUnavailable):
                    async with registry.track("x"):
                        pass  # pragma: no cover
                with pytest.raises(RedisUnavailable):
                    async with slot.claim("k"):
                        pass  # pragma: no cover
                with pytest.raises(RedisUnavailable):
                    await slot.is_current("k", 1)
                assert a.statistics().registrations == a.statistics().claims == 0
        finally:
            redis.start()
        await wait_for(lambda: a.statistics().connected)
        async with registry.track("x"), slot.claim("k") as claim:
            assert await slot.is_current("k", claim.generation)


async def test_handover_falls_back_to_local_order_when_redis_is_down(
    redis: RedisServer, prefix: str
) -> None:
    """Fail open: a handover wait without Redis follows this worker's own claims."""
    async with workers(redis, prefix, n=1, timeout=0.5) as (a,):
        slot = LatestOnly(handover_timeout=math.inf, backend=a)
        redis.stop()
        try:
            with anyio.fail_after(5):
                async with slot.claim("k") as claim:
                    assert await slot.is_current("k", claim.generation)
                assert not await slot.is_current("k", claim.generation)
        finally:
            redis.start()


async def test_unreachable_at_start_is_a_clear_error() -> None:
    """Entering a backend whose server does not answer raises RedisUnavailable, never hangs."""
    with anyio.fail_after(10), pytest.raises(RedisUnavailable, match="cannot reach Redis at"):
        async with RedisBackend("redis://:secret@127.0.0.1:1/0", timeout=0.5):
            pass  # pragma: no cover


async def test_a_connection_cut_short_as_it_connects_is_closed(redis: RedisServer) -> None:
    """A connection attempt cancelled at any step, the step it connects included, leaves no
    socket open (anyio < 4.16 lost the connected socket there: the reason for the floor)."""
    pool = _Pool.from_url(redis.url, decode_responses=True, connect_timeout=5)

    async def attempt(connection: coredis.BaseConnection) -> None:
        with suppress(coredis.exceptions.ConnectionError):  # coredis's word for "cut short"
            await connection.run()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for _ in range(3):
            for steps in range(25):  # past the handshake: every step of the attempt is hit
                connection = await pool._construct_connection()
                with anyio.fail_after(10):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(attempt, connection)
                        for _ in range(steps):
                            await anyio.lowlevel.cancel_shielded_checkpoint()
                        tg.cancel_scope.cancel()
                _close_buffers(connection)
                del connection
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


async def test_use_before_start_is_a_clear_error() -> None:
    """A primitive using a backend that was not entered gets a RuntimeError saying so."""
    backend = RedisBackend()
    with pytest.raises(RuntimeError, match="not running"):
        async with TokenRegistry(backend=backend).track("x"):
            pass  # pragma: no cover
    with pytest.raises(RuntimeError, match="not running"):
        async with LatestOnly(backend=backend).claim("k"):
            pass  # pragma: no cover
    with pytest.raises(RuntimeError, match="not running"):
        await backend.is_current("k", 1)


async def test_lifecycle_statistics_and_repr(redis: RedisServer, prefix: str) -> None:
    """Each start makes a new worker id; statistics and repr show the state; no double entry."""
    backend = RedisBackend(redis.url, prefix=prefix, heartbeat=0.2)
    assert "stopped" in repr(backend)
    assert backend.statistics() == RedisBackendStatistics(None, False, 0, 0, 0, 0, 0, 0, 0, 0)
    async with backend:
        first = backend.worker
        with pytest.raises(RuntimeError, match="already running"):
            await backend.__aenter__()
        async with TokenRegistry(backend=backend).track("x"):
            stats = backend.statistics()
            assert (stats.worker, stats.connected, stats.registrations) == (first, True, 1)
            assert "up" in repr(backend)
            assert "registrations=1" in repr(backend)
    assert backend.statistics().worker is None
    async with backend:
        assert backend.worker not in (None, first)
    await backend.__aexit__(None, None, None)  # a second exit is harmless


def test_options_are_validated() -> None:
    """Out-of-range options raise ValueError naming the option."""
    cases: list[tuple[dict[str, Any], str]] = [
        ({"prefix": ""}, "prefix"),
        ({"prefix": "a b"}, "prefix"),
        ({"timeout": 0}, "timeout"),
        ({"heartbeat": math.inf}, "heartbeat"),
        ({"heartbeat": 1.0, "lease": 1.5}, "lease"),
        ({"max_tombstones": 0}, "max_tombstones"),
        ({"slot_groups": 0}, "slot_groups"),
        ({"slot_groups": 1025}, "slot_groups"),
    ]
    for options, name in cases:
        with pytest.raises(ValueError, match=name):
            RedisBackend(**options)
    assert "***" in repr(RedisBackend("redis://:secret@localhost:6379/0"))


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"slot_groups": 1.5}, "slot_groups"),
        ({"slot_groups": "4"}, "slot_groups"),
        ({"slot_groups": None}, "slot_groups"),
        ({"slot_groups": True}, "slot_groups"),
        ({"max_tombstones": 10.0}, "max_tombstones"),
        ({"max_seq_keys": "100"}, "max_seq_keys"),
        ({"timeout": "5"}, "timeout"),
        ({"heartbeat": None}, "heartbeat"),
        ({"lease": True}, "lease"),
        ({"fail_open": "no"}, "fail_open"),
    ],
)
def test_options_of_the_wrong_type_are_a_type_error_naming_them(
    options: dict[str, Any], name: str
) -> None:
    """A typo in the configuration is a TypeError when the backend is made, not an outage
    at enter (an app that retries on RedisUnavailable would retry it forever)."""
    with pytest.raises(TypeError, match=name):
        RedisBackend(**options)


# -- across real processes -----------------------------------------------------------------


class Worker:
    """A tests/redis_worker.py process driven over its stdin and stdout."""

    def __init__(self, process: anyio.abc.Process) -> None:
        self.process = process
        assert process.stdout is not None
        self.stdout = anyio.streams.buffered.BufferedByteReceiveStream(process.stdout)
        self.lines: list[str] = []  # read and not yet expected, without their times
        self.timed: list[str] = []  # every line read, after its time (for tests/history.py)

    async def send(self, line: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(f"{line}\n".encode())

    async def read(self) -> None:
        """Read the next line into :attr:`lines` and :attr:`timed`."""
        timed = (await self.stdout.receive_until(b"\n", 1 << 16)).decode()
        self.timed.append(timed)
        self.lines.append(timed.partition(" ")[2])

    async def expect(self, start: str, limit: float = 10) -> str:
        with anyio.fail_after(limit):
            while True:
                for line in self.lines:
                    if line.startswith(start):
                        self.lines.remove(line)
                        return line
                await self.read()


@asynccontextmanager
async def worker_process(redis: RedisServer, prefix: str, backend: str) -> AsyncIterator[Worker]:
    command = [sys.executable, "-m", "tests.redis_worker", redis.url, prefix, backend]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    async with await anyio.open_process(command, env=env, stderr=subprocess.DEVNULL) as process:
        worker = Worker(process)
        try:
            await worker.expect("ready", limit=30)  # a loaded box starts Python slowly
            yield worker
        finally:
            if process.returncode is None:
                process.kill()
            with anyio.CancelScope(shield=True):
                await process.wait()


async def test_supersede_and_cancel_across_processes(
    redis: RedisServer, prefix: str, anyio_backend: str
) -> None:
    """A claim here supersedes a claim in another process; cancel by id reaches it, even early."""
    async with (
        worker_process(redis, prefix, anyio_backend) as other,
        workers(redis, prefix, n=1) as (here,),
    ):
        await other.send("claim key A")
        await other.expect("claimed A")
        async with LatestOnly(backend=here).claim("key") as claim:
            line = await other.expect("cancelled A")
        assert line == f"cancelled A superseded {claim.id}"
        registry = TokenRegistry(backend=here)
        await other.send("track op1")
        await other.expect("tracking op1")
        assert await registry.cancel("op1") is CancelOutcome.CANCELLED
        assert (await other.expect("cancelled op1")).split()[2] == "requested"
        assert await registry.cancel("op2") is CancelOutcome.PENDING  # before it registers
        await other.send("track op2")
        assert (await other.expect("cancelled op2")).split()[2] == "requested"
        assert not any(line.startswith("tracking op2") for line in other.lines)
        async with registry.track("op3", owner="alice") as op:  # owners stay apart
            await other.send("cancel op3")
            assert await other.expect("outcome op3") == "outcome op3 not_found"
            assert not op.token.cancelled


async def test_race_across_processes(redis: RedisServer, prefix: str, anyio_backend: str) -> None:
    """Claims on shared keys and cancels from two processes: only the newest claims live on."""
    keys = [f"k{i}" for i in range(4)]
    async with (
        worker_process(redis, prefix, anyio_backend) as other,
        workers(redis, prefix, n=1) as (here,),
    ):
        slot, registry = LatestOnly(backend=here), TokenRegistry(backend=here)
        generations: dict[str, dict[int, str]] = {key: {} for key in keys}
        mine_alive: dict[str, set[int]] = {key: set() for key in keys}

        async def claim_here(key: str) -> None:
            with pytest.raises(OperationCancelled):
                async with slot.claim(key) as claim:
                    generations[key][claim.generation] = "here"
                    mine_alive[key].add(claim.generation)
                    try:
                        await anyio.sleep_forever()
                    finally:
                        mine_alive[key].discard(claim.generation)

        with anyio.fail_after(40):
            async with anyio.create_task_group() as tg:
                for i in range(60):
                    key = keys[i % len(keys)]
                    if i % 2:
                        tg.start_soon(claim_here, key)
                    else:
                        await other.send(f"claim {key} c{i}")
                    await other.send(f"track op{i}")
                    if i % 4 == 0:
                        await other.send(f"cancel op{i}")  # its own op, via Redis
                    else:
                        tg.start_soon(registry.cancel, f"op{i}")
                    await anyio.wait_all_tasks_blocked()
                for i in range(60):
                    await other.expect(f"cancelled op{i} ")
                for i in range(0, 60, 2):
                    _, tag, _, number = (await other.expect(f"claimed c{i} ")).split()
                    generations[keys[i % len(keys)]][int(number)] = tag
                for key in keys:
                    newest = max(generations[key])
                    for generation, who in generations[key].items():
                        if who != "here" and generation != newest:
                            await other.expect(f"cancelled {who} superseded")
                    expected = {newest} if generations[key][newest] == "here" else set()
                    alive = mine_alive[key]
                    await wait_for(functools.partial(operator.eq, alive, expected))
                assert not any(line.startswith("cancelled c") for line in other.lines)
                tg.cancel_scope.cancel()


async def test_crashed_workers_keys_expire(redis: RedisServer, prefix: str) -> None:
    """A worker process killed with SIGKILL leaves no key behind once its lease expires."""
    async with raw(redis) as client:
        async with worker_process(redis, prefix, "asyncio") as other:
            await other.send("claim key A")
            await other.send("track op")
            await other.expect("claimed A")
            await other.expect("tracking op")
            kinds = {kind_of(name) for name in await keys_of(client, prefix)}
            assert {"k", "q", "r", "i", "a"} <= kinds
            other.process.kill()
        with anyio.fail_after(10):
            while True:
                left = await keys_of(client, prefix)
                kinds = {kind_of(name) for name in left}
                if not kinds - {"gen"}:
                    break
                assert -1 not in left.values(), left
                assert kinds <= {"k", "q", "r", "i", "a", "gen", "in"}
                await anyio.sleep(0.05)
        assert -1 not in left.values()  # the generation counter expires too


# -- the example ---------------------------------------------------------------------------


def test_example_runs(redis: RedisServer) -> None:
    """docs/examples/redis_example.py runs two workers on one key and prints what happened."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "examples" / "redis_example.py"), redis.url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # Each worker is a process of its own: their lines interleave in no fixed order.
    varying = r"(?<=generation )\d+|(?<=superseded by )\S+"
    assert_shows("redis_example.py", result.stdout.splitlines(), varying=varying, any_order=True)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("", "empty"),
        ("not a url", "no scheme"),
        ("redis://", "no host"),
        ("http://localhost:6379", "scheme 'http'"),
        ("redis://localhost:99999", "malformed"),
        ("redis://localhost/zero", "not a number"),
        ("unix://", "no socket path"),
    ],
)
def test_malformed_urls_are_refused_at_construction(url: str, problem: str) -> None:
    """A URL coredis cannot use raises ValueError naming the problem before anything connects."""
    with pytest.raises(ValueError, match=problem):
        RedisBackend(url)


async def test_tombstones_are_bounded_per_owner(redis: RedisServer, prefix: str) -> None:
    """One owner's tombstones stop at max_tombstones_per_owner; other owners keep working."""
    # one slot group: the limit is exact (a single server has one; see test_redis_cluster)
    async with workers(redis, prefix, n=1, max_tombstones_per_owner=2, slot_groups=1) as (a,):
        registry = TokenRegistry(backend=a)
        for id in ("t1", "t2"):
            assert await registry.cancel(id, owner="alice") is CancelOutcome.PENDING
        with pytest.raises(RegistryFull) as info:
            await registry.cancel("t3", owner="alice")
        assert (info.value.limit, info.value.value) == ("max_tombstones_per_owner", 2)
        assert await registry.cancel("t3", owner="bob") is CancelOutcome.PENDING
        assert await registry.cancel("t3") is CancelOutcome.PENDING  # no owner: one more owner
        assert await registry.cancel("t4") is CancelOutcome.PENDING
        with pytest.raises(RegistryFull):  # as in MemoryBackend: None counts as one owner
            await registry.cancel("t5")
        with pytest.raises(OperationCancelled):  # a refused start keeps the tombstone
            async with registry.track("t1", owner="alice"):
                pass  # pragma: no cover
        with pytest.raises(RegistryFull):
            await registry.cancel("t4", owner="alice")


async def test_a_cancel_interrupted_in_flight_leaves_no_orphan(
    redis: RedisServer, prefix: str
) -> None:
    """A claim and a registration whose callers are cancelled mid-script are released."""
    async with workers(redis, prefix) as (a, b), raw(redis) as client:
        for _ in range(20):
            with anyio.CancelScope() as scope:
                scope.cancel()  # cancelled at the first await: the script may or may not run
                async with LatestOnly(backend=a).claim("k"), TokenRegistry(backend=a).track("op"):
                    pass  # pragma: no cover
        await wait_for(lambda: a.statistics().claims == a.statistics().registrations == 0)
        with anyio.fail_after(10):  # at once, or within one lease if a release raced a script
            while True:
                try:
                    async with LatestOnly(policy="reject", backend=b).claim("k"):
                        break
                except SlotBusy:
                    await anyio.sleep(0.05)
            while True:
                try:
                    async with TokenRegistry(backend=b).track("op"):
                        break
                except OperationExists:
                    await anyio.sleep(0.05)
        assert -1 not in (await keys_of(client, prefix)).values()


# -- commit points ---------------------------------------------------------------------------


async def test_a_cancel_on_another_worker_wins_over_a_later_commit(
    redis: RedisServer, prefix: str, deaf: None
) -> None:
    """B cancels A's operation; A has not heard of it yet: A's commit is refused by Redis."""
    async with workers(redis, prefix) as (a, b):
        reg_a, reg_b = TokenRegistry(backend=a), TokenRegistry(backend=b)
        charged = []
        with pytest.raises(OperationCancelled) as info:
            async with reg_a.track("pay", owner="u") as op:
                reason = CancelReason(message="stop", source="b")
                assert (
                    await reg_b.cancel("pay", owner="u", reason=reason) is CancelOutcome.CANCELLED
                )
                assert not op.token.cancelled  # the delivery is still in flight
                await op.commit()
                charged.append("card")  # pragma: no cover
        assert charged == []
        assert info.value.reason == reason
        assert op.token.reason == reason


async def test_a_body_ending_before_its_cancel_arrives_reports_the_cancel(
    redis: RedisServer, prefix: str, deaf: None
) -> None:
    """A body that returns after B's cancel answered CANCELLED, before A heard of it, ends
    cancelled: the exit asks Redis (the issue's case 1, CANCELLED then it completes)."""
    async with workers(redis, prefix) as (a, b):
        reg_a, reg_b = TokenRegistry(backend=a), TokenRegistry(backend=b)
        with pytest.raises(OperationCancelled) as info:
            async with reg_a.hold("export"):
                assert await reg_b.cancel("export") is CancelOutcome.CANCELLED
        assert info.value.reason.kind is CancelKind.REQUESTED


async def test_a_commit_wins_over_a_later_cancel_on_another_worker(
    redis: RedisServer, prefix: str
) -> None:
    """A commits first: B's cancel answers COMMITTED and A's body is not interrupted."""
    async with workers(redis, prefix) as (a, b):
        reg_a, reg_b = TokenRegistry(backend=a), TokenRegistry(backend=b)
        async with reg_a.track("pay") as op:
            await op.commit()
            assert await reg_b.cancel("pay") is CancelOutcome.COMMITTED
            assert await reg_b.cancel("pay") is CancelOutcome.COMMITTED
            await anyio.sleep(0.05)  # room for a (wrong) delivery to arrive
        assert not op.token.cancelled
        assert await reg_b.cancel("pay") is CancelOutcome.NOT_FOUND


async def test_a_supersede_on_another_worker_wins_over_a_later_commit(
    redis: RedisServer, prefix: str, deaf: None
) -> None:
    """B's newer claim came first: A's claim.commit() is refused with B's claim as source."""
    async with workers(redis, prefix) as (a, b):
        slot_a, slot_b = LatestOnly(backend=a), LatestOnly(backend=b)
        with pytest.raises(OperationCancelled) as info:
            async with slot_a.hold("k") as claim, slot_b.claim("k") as newer:
                assert not claim.token.cancelled  # in flight
                await claim.commit()
        assert info.value.reason.kind is CancelKind.SUPERSEDED
        assert info.value.reason.source == newer.id


async def test_a_claim_superseded_in_flight_does_not_end_as_a_success(
    redis: RedisServer, prefix: str, deaf: None
) -> None:
    """A body that returns after B superseded it, before A heard, ends superseded."""
    async with workers(redis, prefix) as (a, b):
        slot_a, slot_b = LatestOnly(backend=a), LatestOnly(backend=b)
        with pytest.raises(OperationCancelled) as info:
            async with slot_a.hold("k"), slot_b.claim("k") as newer:
                pass
        assert info.value.reason.source == newer.id


async def test_a_committed_claim_runs_on_when_another_worker_supersedes_it(
    redis: RedisServer, prefix: str
) -> None:
    """A commits its claim; B's newer claim runs at once, A's body is not interrupted."""
    async with workers(redis, prefix) as (a, b):
        slot_a, slot_b = LatestOnly(backend=a), LatestOnly(backend=b)
        async with slot_a.claim("k") as claim:
            await claim.commit()
            async with slot_b.claim("k") as newer:
                assert await slot_b.is_current("k", newer.generation)
                assert not await slot_a.is_current("k", claim.generation)
            await anyio.sleep(0.05)  # room for the supersede to arrive (and be refused)
        assert not claim.token.cancelled


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_commit_survives_a_cancellation_at_every_suspension_point(
    redis: RedisServer, prefix: str
) -> None:
    """cancellens cancels the committing operation at each point it suspends (and twice)."""
    async with workers(redis, prefix, n=1) as (a,):
        await sweep_commit(TokenRegistry(backend=a))
