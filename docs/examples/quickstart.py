"""Quickstart: a token stops work, says why, and never hides someone else's cancellation.

Run: python docs/examples/quickstart.py  (add "trio" to run it on trio)
"""

from __future__ import annotations

import sys

import anyio

from cancelkit import CancelKind, CancellationToken, CancelReason, OperationCancelled


async def search(query: str, token: CancellationToken) -> str:
    """Pretend to search: ten slow steps, interrupted when the token is cancelled."""
    with token.scope():
        for step in range(10):
            print(f"  {query!r}: step {step}")
            await anyio.sleep(0.05)
    return f"results for {query!r}"  # pragma: no cover - the demo always cancels it


async def main() -> None:
    print("1. A newer request supersedes the running one:")
    token = CancellationToken(name="search 'ca'")
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            try:
                await search("ca", token)
            except OperationCancelled as exc:
                print(f"  stopped: {exc.reason}")

        tg.start_soon(run)
        await anyio.sleep(0.12)
        token.cancel(CancelReason(CancelKind.SUPERSEDED, source="search 'cat'"))

    print("2. A deadline is reported as a deadline, not as a cancel:")
    try:
        await search("slow", CancellationToken(timeout=0.08))
    except OperationCancelled as exc:
        print(f"  stopped: {exc.reason.kind.value}")

    print("3. A sync function in a worker thread checks the same token:")
    shutdown = CancellationToken(name="shutdown")
    request = shutdown.child()  # cancelled with the app, released when done

    def crunch() -> int:
        done = 0
        while not request.wait_blocking(0.01):  # sleeps, but wakes at once on cancel
            done += 1
        return done

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, crunch)
        await anyio.sleep(0.05)
        shutdown.cancel(CancelReason(CancelKind.SHUTDOWN))
    print(f"  worker thread stopped: {request.reason}")


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
