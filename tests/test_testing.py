"""cancelkit.testing: the backend contract, run against the memory backend and a toy one.

The Redis and Redis Cluster backends run it in tests/test_redis.py and
tests/test_redis_cluster.py. The toy backend below (tests/toy_backend.py) shows what a third
backend takes.
"""

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from cancelkit import CancelReason, Policy
from cancelkit.backends import (
    Acquired,
    Backend,
    CancelOutcome,
    Deliver,
    MemoryBackend,
    MemoryStatusStore,
    StatusStore,
)
from cancelkit.testing import (
    BackendContract,
    StatusStoreContract,
    Stores,
    Workers,
    check_latest_only_model,
)
from tests.toy_backend import Key, ToyBackend


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


# -- the contract can fail: backends that break one documented rule each ---------------------


class DeliversAfterUnregister(ToyBackend):
    """Calls a finished holder's deliver when its id is cancelled late ('for no holder
    after that')."""

    def __init__(self) -> None:
        super().__init__()
        self.old: dict[tuple[str | None, str], Deliver] = {}

    async def register(
        self, id: str, owner: str | None, holder: str, deliver: Deliver
    ) -> CancelReason | None:
        self.old[(owner, id)] = deliver
        return await super().register(id, owner, holder, deliver)

    async def cancel(self, id: str, owner: str | None, reason: CancelReason) -> CancelOutcome:
        outcome = await super().cancel(id, owner, reason)
        if outcome is CancelOutcome.NOT_FOUND and (owner, id) in self.old:
            self.old[(owner, id)](reason)
        return outcome


class UnregistersAnyHolder(ToyBackend):
    """Removes the registration whoever asks ('if holder still holds it')."""

    async def unregister(self, id: str, owner: str | None, holder: str) -> CancelReason | None:
        current = self.regs.get((owner, id))
        return await super().unregister(id, owner, holder if current is None else current[0])


class PromotesTheNewestWaiter(ToyBackend):
    """Runs the newest waiting claim when a slot frees ('the oldest waiting one runs')."""

    async def release(self, key: str, holder: str) -> CancelReason | None:
        k = self.keys.get(key)
        if k is not None:
            waiting = [h for h, c in k.claims.items() if c.state == "waiting"]
            if len(waiting) > 1:  # the newest waiter first in line
                k.claims = {waiting[-1]: k.claims[waiting[-1]]} | k.claims
        return await super().release(key, holder)


class SupersedesTheNewest(ToyBackend):
    """With limit > 1, supersedes the newest running claim ('the oldest running claim is')."""

    async def acquire(self, key: str, *args: Any, **kwargs: Any) -> Acquired:
        k = self.keys.setdefault(key, Key())
        running = [h for h, c in k.claims.items() if c.state == "running"]
        if len(running) > 1:
            k.claims = {running[-1]: k.claims[running[-1]]} | k.claims
        return await super().acquire(key, *args, **kwargs)


class QueuesOnAnUnknownPolicy(ToyBackend):
    """Takes a policy part it does not know for one it knows (``wait``; ``refuse`` when the
    queue is full: the toy's old ``else``) instead of refusing it ('refuse it loudly')."""

    async def acquire(
        self, key: str, holder: str, deliver: Deliver, *, policy: Policy, **kwargs: Any
    ) -> Acquired:
        busy = policy.when_busy if policy.when_busy in ("supersede", "refuse") else "wait"
        supersede = policy.when_full == "supersede"
        known = Policy(busy, "supersede" if supersede else "refuse", policy.max_waiting)
        return await super().acquire(key, holder, deliver, policy=known, **kwargs)


def broken_rules(backend: type[ToyBackend]) -> list[str]:
    """The BackendContract tests that fail (or hang to their limit) on ``backend``."""
    failed = []
    for name in dir(BackendContract):
        if not name.startswith("test_"):
            continue

        async def run(name: str = name) -> None:
            one = backend()
            await getattr(BackendContract(), name)((one, one))

        try:
            anyio.run(run)
        except (AssertionError, TimeoutError, pytest.fail.Exception):
            failed.append(name)
    return failed


@pytest.mark.parametrize(
    "backend",
    [
        DeliversAfterUnregister,
        UnregistersAnyHolder,
        PromotesTheNewestWaiter,
        SupersedesTheNewest,
        QueuesOnAnUnknownPolicy,
    ],
)
def test_the_contract_finds_a_backend_that_breaks_a_documented_rule(
    backend: type[ToyBackend],
) -> None:
    """Each of these breaks one documented rule: the contract must catch it."""
    assert broken_rules(ToyBackend) == []  # (the runner itself passes a correct backend)
    assert broken_rules(backend) != []
