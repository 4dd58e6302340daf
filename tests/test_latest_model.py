"""LatestOnly against the plain model of cancelkit.testing, on the memory and Redis backends.

The model and its state machine live in cancelkit/testing/_model.py (a third backend runs
them with check_latest_only_model); here they run on the memory backend and on a real
redis-server (two backends standing in for two workers, claims alternating between them),
on asyncio and trio. tests/test_testing.py runs them on the toy backend,
tests/test_redis_cluster.py on the Redis Cluster.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import pytest

from cancelkit.backends import Backend, MemoryBackend
from cancelkit.redis import RedisBackend
from cancelkit.testing import Workers, check_latest_only_model
from tests.conftest import RedisServer

LIMIT = 10.0


@asynccontextmanager
async def memory() -> AsyncIterator[Sequence[Backend]]:
    backend = MemoryBackend()
    yield [backend]
    assert backend.statistics().keys == 0  # nothing left behind


def redis_workers(url: str) -> Workers:
    @asynccontextmanager
    async def two() -> AsyncIterator[Sequence[Backend]]:
        prefix = "m" + secrets.token_hex(4)
        async with AsyncExitStack() as stack:
            backends = [
                await stack.enter_async_context(
                    RedisBackend(url, prefix=prefix, heartbeat=0.5, timeout=LIMIT, retry_delay=0.02)
                )
                for _ in range(2)
            ]
            yield backends
            assert all(backend.statistics().claims == 0 for backend in backends)

    return two


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
def test_memory_backend_matches_the_model(anyio_backend: str) -> None:
    """Random claim/finish/cleanup sequences on the memory backend behave as the model says."""
    check_latest_only_model(memory, anyio_backend=anyio_backend, examples=60)


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
def test_redis_backend_matches_the_model(anyio_backend: str, redis: RedisServer) -> None:
    """The same on a real redis-server, with claims alternating between two workers."""
    check_latest_only_model(
        redis_workers(redis.url),
        anyio_backend=anyio_backend,
        examples=25,
    )
