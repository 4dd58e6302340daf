"""Two workers, one key: a newer request on worker 2 supersedes the one running on worker 1.

Run a Redis server, then: ``python docs/examples/redis_example.py [redis://127.0.0.1:6379/0]``.
Each worker is its own process here (as under ``uvicorn --workers 2``); in an app, enter the
backend in the FastAPI lifespan instead.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import sys

import anyio

from cancelkit import LatestOnly, OperationCancelled
from cancelkit.redis import RedisBackend

URL = sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/0"


async def worker(name: str, started: multiprocessing.synchronize.Event | None) -> None:
    async with RedisBackend(URL, prefix="example") as backend:
        search = LatestOnly(backend=backend)
        try:
            async with search.claim("user-42:search") as claim:
                print(f"{name}: running (generation {claim.generation})", flush=True)
                if started is not None:
                    started.set()
                    await anyio.sleep(30)  # slow work, superseded long before it ends
                print(f"{name}: finished", flush=True)
        except OperationCancelled as exc:
            print(f"{name}: {exc.reason.kind} by {exc.reason.source}", flush=True)


def run(name: str, started: multiprocessing.synchronize.Event | None) -> None:
    anyio.run(worker, name, started)


if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    started = context.Event()
    first = context.Process(target=run, args=("worker 1", started))
    first.start()
    if not started.wait(30):
        sys.exit("worker 1 did not start")
    second = context.Process(target=run, args=("worker 2", None))
    second.start()
    second.join(30)
    first.join(30)
    sys.exit(first.exitcode or second.exitcode or 0)
