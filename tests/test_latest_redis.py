"""LatestOnly's sequence numbers and policies on a real redis-server, across two workers.

The policy matrix itself is checked against a model in tests/test_latest_model.py (on Redis
too); this module pins what the model does not see: what Redis keeps after a release, for how
long, and how many keys, and the answers across workers.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import coredis
import pytest

from cancelkit import CancelKind, LatestOnly, OperationCancelled, SlotBusy
from cancelkit.redis import RedisBackend
from tests.conftest import RedisServer

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def two_workers(
    redis: RedisServer, **options: Any
) -> AsyncIterator[tuple[str, RedisBackend, RedisBackend]]:
    """Two backends on one prefix, standing in for two worker processes."""
    prefix = "s" + secrets.token_hex(4)
    async with AsyncExitStack() as stack:
        a, b = [
            await stack.enter_async_context(
                RedisBackend(redis.url, prefix=prefix, heartbeat=0.2, timeout=2, **options)
            )
            for _ in range(2)
        ]
        yield prefix, a, b


async def keys(redis: RedisServer, prefix: str) -> dict[str, int]:
    """Every key under the prefix (but the counters) with its PTTL."""
    async with coredis.Redis.from_url(redis.url, decode_responses=True) as client:
        found = {}
        async for key in client.scan_iter(match=f"{prefix}:*"):
            if key.split(":")[1] not in ("gen", "a"):
                found[key] = await client.pttl(key)
        return found


async def test_a_stale_claim_on_another_worker_never_runs(redis: RedisServer) -> None:
    """Worker B's older number is refused while A's newer claim runs: A keeps running."""
    async with two_workers(redis) as (_, a, b):
        slot_a, slot_b = LatestOnly(backend=a), LatestOnly(backend=b)
        async with slot_a.claim("k", seq=9) as newer:
            with pytest.raises(OperationCancelled) as info:
                async with slot_b.claim("k", seq=8):
                    pytest.fail("a stale claim must not run")  # pragma: no cover
            assert not newer.token.cancelled
        reason = info.value.reason
        assert (reason.kind, reason.source) == (CancelKind.SUPERSEDED, newer.id)
        assert reason.message.startswith("stale: sequence number 8 is not above 9")
        assert slot_b.statistics().stale == 1


async def test_the_newest_number_outlives_the_release_then_expires(redis: RedisServer) -> None:
    """After the release only the number is left, with the sequence TTL; then nothing."""
    async with two_workers(redis, seq_ttl=0.5) as (prefix, a, b):
        slot_a, slot_b = LatestOnly(backend=a), LatestOnly(backend=b)
        async with slot_a.claim("k", seq=5):
            pass
        left = await keys(redis, prefix)
        assert set(left) == {f"{prefix}:k:k", f"{prefix}:sz"}
        assert all(0 < ttl <= 500 for ttl in left.values())
        with pytest.raises(OperationCancelled):
            async with slot_b.claim("k", seq=5):
                pass  # pragma: no cover
        with anyio.fail_after(10):
            while await keys(redis, prefix):  # noqa: ASYNC110 - Redis's expiry has no event
                await anyio.sleep(0.05)
        async with slot_b.claim("k", seq=1) as claim:  # forgotten: any number is new again
            assert claim.started


async def test_remembered_numbers_are_bounded_across_workers(redis: RedisServer) -> None:
    """Past max_seq_keys released keys, the oldest number is forgotten first."""
    async with two_workers(redis, max_seq_keys=2) as (prefix, a, b):
        slots = [LatestOnly(backend=a), LatestOnly(backend=b)]
        for i, key in enumerate(("k1", "k2", "k3")):
            async with slots[i % 2].claim(key, seq=7):
                pass
        remembered = {k.rsplit(":", 1)[1] for k in await keys(redis, prefix) if ":k:" in k}
        assert remembered == {"k2", "k3"}
        async with slots[1].claim("k1", seq=0):  # k1's number was forgotten
            pass
        with pytest.raises(OperationCancelled):
            async with slots[0].claim("k3", seq=7):
                pass  # pragma: no cover


async def test_enqueue_overflow_across_workers_is_refused(redis: RedisServer) -> None:
    """enqueue, max_waiting=1: one runs, one waits (on the other worker), the next is refused."""
    async with two_workers(redis) as (prefix, a, b):
        slot_a = LatestOnly(policy="enqueue", max_waiting=1, backend=a)
        slot_b = LatestOnly(policy="enqueue", max_waiting=1, backend=b)
        order: list[str] = []
        release, first_runs = anyio.Event(), anyio.Event()

        async def run(slot: LatestOnly, name: str) -> None:
            async with slot.claim("q"):
                order.append(name)
                first_runs.set()
                await release.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, slot_a, "first")
            with anyio.fail_after(10):
                await first_runs.wait()
                tg.start_soon(run, slot_b, "second")
                async with coredis.Redis.from_url(redis.url, decode_responses=True) as client:
                    while await client.zcard(f"{prefix}:q:q") != 2:  # noqa: ASYNC110 - no event
                        await anyio.sleep(0.01)  # for another worker's script
            with pytest.raises(SlotBusy, match="1 claim"):
                async with slot_a.claim("q"):
                    pass  # pragma: no cover
            release.set()
        assert order == ["first", "second"]
