"""cancelkit under pytest-asyncio (the plugin most FastAPI projects use), in this suite.

The suite's own async tests run under anyio's plugin (`@pytest.mark.anyio`, asyncio and trio);
these are marked `asyncio` and run by pytest-asyncio, in strict mode, in the same session:
the two plugins coexist (pyproject.toml: ``asyncio_mode = "strict"``).
"""

from __future__ import annotations

import asyncio

import anyio
import pytest

from cancelkit import (
    CancelKind,
    CancellationToken,
    LatestOnly,
    OperationCancelled,
    TokenRegistry,
)


@pytest.mark.asyncio
async def test_runs_in_pytest_asyncios_loop() -> None:
    """This test's loop is pytest-asyncio's, not one anyio's plugin made."""
    assert asyncio.get_running_loop() is not None
    assert anyio.get_current_task().name  # anyio works inside it too


@pytest.mark.asyncio
async def test_a_newer_claim_supersedes_the_older_under_pytest_asyncio() -> None:
    """LatestOnly: the older body is interrupted with reason superseded."""
    slot = LatestOnly()
    reasons: list[CancelKind] = []

    async def older() -> None:
        try:
            async with slot.claim("k"):
                await asyncio.Event().wait()  # until superseded
        except OperationCancelled as exc:
            reasons.append(exc.reason.kind)

    task = asyncio.create_task(older())
    await anyio.wait_all_tasks_blocked()
    async with slot.claim("k") as claim:
        await task
        assert claim.generation == 2
    assert reasons == [CancelKind.SUPERSEDED]


@pytest.mark.asyncio
async def test_cancel_by_id_under_pytest_asyncio() -> None:
    """TokenRegistry: cancel by id stops tracked work; the token carries the reason."""
    registry = TokenRegistry()
    stopped: list[CancelKind] = []

    async def work() -> None:
        try:
            async with registry.track("op-1") as op:
                await asyncio.Event().wait()
        except OperationCancelled:
            assert op.token.reason is not None
            stopped.append(op.token.reason.kind)

    task = asyncio.create_task(work())
    await anyio.wait_all_tasks_blocked()
    outcome = await registry.cancel("op-1")
    await task
    assert outcome.value == "cancelled"
    assert stopped == [CancelKind.REQUESTED]


@pytest.mark.asyncio
async def test_token_scope_under_pytest_asyncio() -> None:
    """A token's scope interrupts a plain asyncio await and raises with the reason."""
    token = CancellationToken()
    asyncio.get_running_loop().call_soon(token.cancel)
    with pytest.raises(OperationCancelled) as info, token.scope():
        await asyncio.Event().wait()
    assert info.value.reason.kind is CancelKind.REQUESTED
