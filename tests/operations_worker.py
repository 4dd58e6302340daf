"""A worker process for the Redis operation tests: starts one operation and keeps it running.

Usage: ``python -m tests.operations_worker URL PREFIX ASYNC_BACKEND ID OWNER``. Starts operation
``ID`` of ``OWNER`` (it reports progress, then waits forever), writes ``running WORKER`` once
its status is in Redis, and runs until killed or until stdin closes.
"""

from __future__ import annotations

import sys

import anyio
import anyio.to_thread

from cancelkit import BackgroundOperations, TokenRegistry
from cancelkit.redis import RedisBackend, RedisStatusStore


async def main(url: str, prefix: str, id: str, owner: str) -> None:
    backend = RedisBackend(url, prefix=prefix, heartbeat=0.5, lease=5)
    store = RedisStatusStore(url, prefix=prefix, heartbeat=0.5, lease=6)  # backend's + 2 beats
    operations = BackgroundOperations(registry=TokenRegistry(backend=backend), store=store)

    async def export() -> None:
        await operations.report(1, 10, "first rows")
        await anyio.sleep_forever()

    async with backend, operations:
        await operations.start(export, id=id, owner=owner)
        sys.stdout.write(f"running {store.worker}\n")
        sys.stdout.flush()
        await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[4], sys.argv[5], backend=sys.argv[3])
