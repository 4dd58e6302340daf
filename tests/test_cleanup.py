"""shielded_cleanup: cleanup that runs in an interrupted handler, bounded in time."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from cancelkit import CancelOnDisconnect, shielded_cleanup
from tests.test_asgi import DISCONNECT, FakeServer, Probe, body, http_scope

pytestmark = pytest.mark.anyio


async def test_shielded_cleanup_runs_in_interrupted_handler() -> None:
    """shielded_cleanup() lets an interrupted handler await its cleanup, within a bound."""
    cleanup_done: list[bool] = []
    probe = Probe()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        probe.started.set()
        try:
            await anyio.sleep_forever()
        finally:
            with shielded_cleanup(5.0) as cleanup:
                await anyio.lowlevel.checkpoint()
                await anyio.lowlevel.checkpoint()
                cleanup_done.append(True)
            with shielded_cleanup(0.0) as bounded:
                await anyio.sleep_forever()
            cleanup_done.append(bounded.cancelled_caught and not cleanup.cancelled_caught)

    server = FakeServer(body())
    async with anyio.create_task_group() as tg:
        tg.start_soon(CancelOnDisconnect(app), http_scope(), server.receive, server.send)
        await probe.started.wait()
        await anyio.wait_all_tasks_blocked()
        server.client(DISCONNECT)
    assert cleanup_done == [True, True]


def test_shielded_cleanup_rejects_negative_timeout() -> None:
    """shielded_cleanup() refuses a negative timeout."""
    with pytest.raises(ValueError, match="timeout"):
        shielded_cleanup(-1)
