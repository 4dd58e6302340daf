"""A worker process for the Redis operation tests: starts one operation and keeps it running.

Usage: ``python -m tests.operations_worker URL PREFIX ASYNC_BACKEND ID OWNER [steps]``. Starts
operation ``ID`` of ``OWNER`` (it reports progress, then waits forever), writes ``running
WORKER`` once its status is in Redis, and runs until killed or until stdin closes.

With ``steps`` the leases are short (1 s), the operation reports progress every 20 ms until it
is cancelled, and then writes ``ended KIND SOURCE RESYNCS STEPS`` (its token's reason; the
backend's resyncs and the steps made when the token fired). A ``stop`` line on stdin makes it
write ``stopped RESYNCS STEPS`` and SIGSTOP itself at once (nothing runs in between: the
counts are those of the moment it stopped).
"""

from __future__ import annotations

import os
import signal
import sys

import anyio
import anyio.to_thread

from cancelkit import BackgroundOperations, TokenRegistry, current_token
from cancelkit.redis import RedisBackend, RedisStatusStore


async def main(url: str, prefix: str, id: str, owner: str, mode: str = "") -> None:
    steps = mode == "steps"
    if steps:
        backend = RedisBackend(url, prefix=prefix, heartbeat=0.25, lease=1)
        store = RedisStatusStore(url, prefix=prefix, heartbeat=0.25, lease=1.5)
    else:
        backend = RedisBackend(url, prefix=prefix, heartbeat=0.5, lease=5)
        store = RedisStatusStore(url, prefix=prefix, heartbeat=0.5, lease=6)  # backend's + 2
    operations = BackgroundOperations(registry=TokenRegistry(backend=backend), store=store)

    steps_made = [0]

    async def export() -> None:
        await operations.report(1, 10, "first rows")
        if not steps:
            await anyio.sleep_forever()
        token = current_token()
        assert token is not None
        fired: list[int] = []
        token.on_cancel(lambda _: fired.append(backend.statistics().resyncs))
        try:
            for step in range(2, 1_000_000):
                await operations.report(step, None, "rows")
                steps_made[0] += 1
                await anyio.sleep(0.02)  # the work: one step of an export
        finally:
            reason = token.reason
            kind = "-" if reason is None else reason.kind.value
            counts = f"{fired[0]} {steps_made[0]}" if fired else "- -"
            sys.stdout.write(f"ended {kind} {reason and reason.source} {counts}\n")
            sys.stdout.flush()

    async with backend, operations:
        await operations.start(export, id=id, owner=owner)
        sys.stdout.write(f"running {store.worker}\n")
        sys.stdout.flush()
        while line := await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True):
            if line.strip() == "stop":
                resyncs = backend.statistics().resyncs
                sys.stdout.write(f"stopped {resyncs} {steps_made[0]}\n")
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGSTOP)  # stops before it returns


if __name__ == "__main__":
    url, prefix, backend, id, owner, *mode = sys.argv[1:]
    anyio.run(main, url, prefix, id, owner, mode[0] if mode else "", backend=backend)
