"""A worker process for the multi-process Redis tests, driven over stdin/stdout.

Usage: ``python -m tests.redis_worker URL PREFIX ASYNC_BACKEND`` (``CANCELKIT_FAIL_OPEN=0``: the
backend fails closed; ``CANCELKIT_TIMEOUT``: its timeout, 2 s by default). Reads commands, one
a line: ``claim KEY TAG``, ``track ID``, ``job ID MS
[COMMIT_MS]`` (track ID with a body of MS milliseconds; with COMMIT_MS, it calls
``op.commit()`` that far into its body), ``cancel ID``, ``stats``. Writes events, one a line,
each after the ``time.monotonic()`` it happened at: ``ready WORKER``, ``claimed TAG CLAIM_ID
GENERATION``, ``tracking ID``, ``committing ID`` then ``committed ID`` / ``refused ID`` /
``unavailable ID``, ``stopping TAG`` (a claim's token was cancelled), ``exiting TAG_OR_ID``
(the body left its block), ``cancelled TAG_OR_ID KIND SOURCE``, ``completed ID`` (a job's exit
reported success), ``failed TAG_OR_ID ERROR``, ``outcome ID OUTCOME``, ``stats CONNECTED
RESYNCS``, and ``offline`` / ``online`` when the backend logs that Redis became unreachable /
reachable again (the lines tests/history.py reads). Exits at end of input.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import anyio
import anyio.to_thread

from cancelkit import LatestOnly, OperationCancelled, TokenRegistry
from cancelkit.redis import RedisBackend
from tests.history import Outages


def emit(line: str) -> None:
    sys.stdout.write(f"{time.monotonic()!r} {line}\n")
    sys.stdout.flush()


async def main(url: str, prefix: str) -> None:
    logging.getLogger("cancelkit.redis").addHandler(Outages(emit))
    async with RedisBackend(
        url,
        prefix=prefix,
        heartbeat=0.1,
        lease=0.4,
        timeout=float(os.environ.get("CANCELKIT_TIMEOUT", "2")),
        fail_open=os.environ.get("CANCELKIT_FAIL_OPEN", "1") == "1",
    ) as backend:
        slot = LatestOnly(backend=backend)
        registry = TokenRegistry(backend=backend)

        async def claim(key: str, tag: str) -> None:
            try:
                async with slot.claim(key) as claim:
                    emit(f"claimed {tag} {claim.id} {claim.generation}")
                    claim.token.on_cancel(lambda _: emit(f"stopping {tag}"))
                    try:
                        await anyio.sleep_forever()
                    finally:
                        emit(f"exiting {tag}")
            except OperationCancelled as exc:
                emit(f"cancelled {tag} {exc.reason.kind} {exc.reason.source}")
            except Exception as exc:  # a documented outcome (RedisUnavailable) or a bug
                emit(f"failed {tag} {type(exc).__name__}")

        async def track(id: str) -> None:
            try:
                async with registry.track(id):
                    emit(f"tracking {id}")
                    await anyio.sleep_forever()
            except OperationCancelled as exc:
                emit(f"cancelled {id} {exc.reason.kind} {exc.reason.source}")

        async def job(id: str, ms: str, commit_ms: str = "") -> None:
            try:
                async with registry.track(id) as op:
                    emit(f"tracking {id}")
                    try:
                        if commit_ms:
                            await anyio.sleep(int(commit_ms) / 1000)
                            emit(f"committing {id}")
                            try:
                                await op.commit()
                            except OperationCancelled:
                                emit(f"refused {id}")
                                raise
                            except Exception:
                                emit(f"unavailable {id}")
                                raise
                            emit(f"committed {id}")
                        await anyio.sleep((int(ms) - int(commit_ms or 0)) / 1000)
                    finally:
                        emit(f"exiting {id}")
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
                elif command == "stats":  # connected, and how many resyncs ran
                    connected = backend.statistics().connected
                    emit(f"stats {int(connected)} {backend._listener.resyncs}")
            tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], backend=sys.argv[3])
