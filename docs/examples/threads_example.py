"""Cooperative cancellation in worker threads: sync code checks the same token.

Run: python docs/examples/threads_example.py
"""

import threading
import time

import anyio
import anyio.to_thread

from cancelkit import CancellationToken, OperationCancelled, current_token


def resize_images(count: int) -> int:
    """Blocking code, deep in a call stack: it finds the token without a parameter."""
    token = current_token()
    assert token is not None
    done = 0
    for _ in range(count):
        token.raise_if_cancelled()  # a cheap check between steps
        time.sleep(0.01)  # one step of blocking work
        done += 1
    return done


def poll_upstream(token: CancellationToken) -> str:
    """A thread that waits: wait_blocking() sleeps, but wakes the moment the token is cancelled."""
    polls = 0
    while not token.wait_blocking(timeout=1.0):
        polls += 1
    return f"poller woke at once after {polls} polls: {token.reason}"


async def main() -> None:
    token = CancellationToken(name="job")
    results: list[str] = []

    async def run_resize() -> None:
        try:
            with token.scope():  # current_token() is `token` here, and in threads started here
                await anyio.to_thread.run_sync(resize_images, 10_000)
        except OperationCancelled as exc:
            results.append(f"resize stopped at its next check: {exc.reason.kind}")

    async def run_poller() -> None:
        results.append(await anyio.to_thread.run_sync(poll_upstream, token))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_resize)
        tg.start_soon(run_poller)
        await anyio.sleep(0.1)
        # cancel() may come from any thread: here, a plain thread that is not the event loop's
        canceller = threading.Thread(target=token.cancel)
        canceller.start()
        canceller.join()
    for line in sorted(results):
        print(line)


if __name__ == "__main__":
    anyio.run(main)
