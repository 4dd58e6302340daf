"""MemoryStatusStore: the default StatusStore (the shared rules run in test_operations.py)."""

import pytest

from cancelkit import BackgroundOperations, MemoryStatusStore, OperationState
from tests.test_operations import FakeClock, forever

pytestmark = pytest.mark.anyio


async def test_ended_statuses_are_dropped_beyond_the_count() -> None:
    """The store keeps at most max_retained ended statuses, dropping the oldest first."""

    async def quick(n: int) -> int:
        return n

    async with BackgroundOperations(store=MemoryStatusStore(max_retained=2)) as ops:
        for n in range(3):
            await ops.wait(await ops.start(quick, n, id=f"op{n}"))
        assert await ops.status("op0") is None
        assert [(await ops.status(f"op{n}")) is not None for n in (1, 2)] == [True, True]


async def test_ended_statuses_expire_after_the_retention_time() -> None:
    """An ended status is gone once its retention time has passed; a running one stays."""
    clock = FakeClock()
    store = MemoryStatusStore(retention=60, clock=clock)

    async def quick() -> None:
        pass

    async with BackgroundOperations(store=store, grace=0) as ops:
        await ops.wait(await ops.start(quick, id="old"))
        await ops.start(forever, id="long")
        clock.now += 59
        assert await ops.status("old") is not None
        clock.now += 2
        assert await ops.status("old") is None
        status = await ops.status("long")
        assert status is not None
        assert status.state is OperationState.RUNNING
    assert len(store) == 1  # the long one, cancelled at shutdown, not yet expired


def test_bad_options_are_refused() -> None:
    """Retention and count must be positive."""
    with pytest.raises(ValueError, match="retention"):
        MemoryStatusStore(retention=0)
    with pytest.raises(ValueError, match="max_retained"):
        MemoryStatusStore(max_retained=0)
