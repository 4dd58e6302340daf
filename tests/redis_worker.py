"""A worker process for the multi-process Redis tests, driven over stdin/stdout.

Usage: ``python -m tests.redis_worker URL PREFIX ASYNC_BACKEND``. Reads commands, one a line:
``claim KEY TAG``, ``track ID``, ``job ID MS`` (track ID with a body of MS milliseconds),
``cancel ID``; writes events, one a line: ``ready WORKER``, ``claimed TAG CLAIM_ID
GENERATION``, ``tracking ID``, ``cancelled TAG_OR_ID KIND SOURCE``, ``completed ID`` (a job's
body ran to its end), ``failed ID ERROR``, ``outcome ID OUTCOME``. Exits at end of input.
"""

from __future__ import annotations

import os
import sys

import anyio
import anyio.to_thread

from cancelkit import LatestOnly, OperationCancelled, TokenRegistry
from cancelkit.redis import RedisBackend


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main(url: str, prefix: str) -> None:
    async with RedisBackend(
        url,
        prefix=prefix,
        heartbeat=0.1,
        lease=0.4,
        timeout=2,
        fail_open=os.environ.get("CANCELKIT_FAIL_OPEN", "1") == "1",
    ) as backend:
        slot = LatestOnly(backend=backend)
        registry = TokenRegistry(backend=backend)

        async def claim(key: str, tag: str) -> None:
            try:
                async with slot.claim(key) as claim:
                    emit(f"claimed {tag} {claim.id} {claim.generation}")
                    await anyio.sleep_forever()
            except OperationCancelled as exc:
                emit(f"cancelled {tag} {exc.reason.kind} {exc.reason.source}")

        async def track(id: str) -> None:
            try:
                async with registry.track(id):
                    emit(f"tracking {id}")
                    await anyio.sleep_forever()
            except OperationCancelled as exc:
                emit(f"cancelled {id} {exc.reason.kind} {exc.reason.source}")

        async def job(id: str, ms: str) -> None:
            try:
                async with registry.track(id):
                    emit(f"tracking {id}")
                    await anyio.sleep(int(ms) / 1000)
                emit(f"completed {id}")
            except OperationCancelled as exc:
                emit(f"cancelled {id} {exc.reason.kind} {exc.reason.source}")
            except Exception as exc:  # a documented outcome (RedisUnavailable) or a bug
                emit(f"failed {id} {type(exc).__name__}")

        emit(f"ready {backend.worker}")
        async with anyio.create_task_group() as tg:
            readline = sys.stdin.readline
            while line := await anyio.to_thread.run_sync(readline, abandon_on_cancel=True):
                command, *args = line.split()
                if command == "claim":
                    tg.start_soon(claim, *args)
                elif command == "track":
                    tg.start_soon(track, *args)
                elif command == "job":
                    tg.start_soon(job, *args)
                elif command == "cancel":
                    emit(f"outcome {args[0]} {await registry.cancel(args[0])}")
            tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], backend=sys.argv[3])
