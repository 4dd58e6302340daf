"""cancelkit.testing: the backend contract, run against the memory backend and a toy one.

The Redis and Redis Cluster backends run it in tests/test_redis.py and
tests/test_redis_cluster.py. The toy backend below (tests/toy_backend.py) shows what a third
backend takes.
"""

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest

from cancelkit.backends import Backend, MemoryBackend, MemoryStatusStore, StatusStore
from cancelkit.testing import (
    BackendContract,
    StatusStoreContract,
    Stores,
    Workers,
    check_latest_only_model,
)
from tests.toy_backend import ToyBackend


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


class TestMemoryBackend(BackendContract):
    @pytest.fixture
    def workers(self) -> Workers:
        @asynccontextmanager
        async def one() -> AsyncIterator[Sequence[Backend]]:
            yield [MemoryBackend()]

        return one


class TestToyBackend(BackendContract):
    @pytest.fixture
    def workers(self) -> Workers:
        @asynccontextmanager
        async def one() -> AsyncIterator[Sequence[Backend]]:
            yield [ToyBackend()]

        return one


@asynccontextmanager
async def toy() -> AsyncIterator[Sequence[Backend]]:
    yield [ToyBackend()]


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_the_toy_backend_matches_the_model(loop: str) -> None:
    """check_latest_only_model drives LatestOnly on the toy backend: it behaves as the model."""
    check_latest_only_model(toy, anyio_backend=loop, examples=40)


def test_the_model_finds_a_backend_that_breaks_a_rule() -> None:
    """A toy backend that calls every accepted claim current, a superseded or waiting one too:
    the model check fails (it can fail, so its passes mean something)."""

    class Careless(ToyBackend):
        async def is_current(self, key: str, generation: int) -> bool:
            claims = self.keys.get(key)
            return claims is not None and any(
                c.generation == generation for c in claims.claims.values()
            )

    @asynccontextmanager
    async def careless() -> AsyncIterator[Sequence[Backend]]:
        yield [Careless()]

    with pytest.raises(AssertionError):
        check_latest_only_model(careless, examples=40, shrink=False)


class TestMemoryStatusStore(StatusStoreContract):
    @pytest.fixture
    def stores(self) -> Stores:
        @asynccontextmanager
        async def one() -> AsyncIterator[Sequence[StatusStore]]:
            async with MemoryStatusStore() as store:
                yield [store]

        return one
