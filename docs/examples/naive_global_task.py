"""The popular recipe for "cancel the previous request", and how it fails.

A module-level ``current_task`` that each new request cancels. This script serves that app with
a real uvicorn on 127.0.0.1 and shows each failure with real HTTP requests:

1. one user's request cancels another user's work;
2. the superseded client, which awaited the task, gets a 500;
3. the cancelled task's cleanup overlaps the new request's work;
4. with two workers (each has its own global; here two app instances stand in for
   ``uvicorn --workers 2``), a superseded search is never cancelled.

Run: python docs/examples/naive_global_task.py
"""

from __future__ import annotations

import asyncio
import socket

import httpx
import uvicorn
from fastapi import FastAPI

events: list[str] = []
running = 0
overlap_seen = False


def make_app() -> FastAPI:
    """One 'worker': an app with its own global current_task, as in the recipe."""
    app = FastAPI()
    current_task: asyncio.Task[str] | None = None

    async def do_search(user: str, q: str) -> str:
        global running, overlap_seen
        running += 1
        overlap_seen |= running > 1
        try:
            await asyncio.sleep(0.3)  # the expensive part
            events.append(f"{user}:{q} completed")
            return f"results for {q!r}"
        except asyncio.CancelledError:
            events.append(f"{user}:{q} cancelled")
            raise
        finally:
            await asyncio.sleep(0.1)  # cleanup: close a cursor, flush a cache...
            running -= 1

    @app.get("/search")
    async def search(user: str, q: str) -> dict[str, str]:
        nonlocal current_task
        if current_task is not None and not current_task.done():
            current_task.cancel()  # whoever started it
        current_task = asyncio.ensure_future(do_search(user, q))
        return {"result": await current_task}

    return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def serve(app: FastAPI) -> tuple[uvicorn.Server, asyncio.Task[None], str]:
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical")
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    return server, task, f"http://127.0.0.1:{port}"


async def started(count: int) -> None:
    """Wait until ``count`` searches are running (no guessing with sleeps)."""
    while running < count:
        await asyncio.sleep(0.005)


async def main() -> None:
    server_a, task_a, url_a = await serve(make_app())
    server_b, task_b, url_b = await serve(make_app())
    async with httpx.AsyncClient(timeout=10) as client:
        print("1+2. alice searches, then bob searches on the same worker:")
        alice = asyncio.ensure_future(client.get(f"{url_a}/search?user=alice&q=cats"))
        await started(1)
        bob = await client.get(f"{url_a}/search?user=bob&q=dogs")
        alice_response = await alice
        print(f"  alice got HTTP {alice_response.status_code} (her work was cancelled by bob)")
        print(f"  bob got HTTP {bob.status_code}")

        print("3. the cancelled search's cleanup overlapped the new search:", overlap_seen)

        print("4. two workers: carol's second keystroke lands on the other worker:")
        events.clear()
        first = asyncio.ensure_future(client.get(f"{url_a}/search?user=carol&q=c"))
        await started(1)
        await client.get(f"{url_b}/search?user=carol&q=ca")
        await first
        print(f"  {sorted(events)}: the superseded search ran to the end")
    for server in (server_a, server_b):
        server.should_exit = True
    await asyncio.gather(task_a, task_b)


if __name__ == "__main__":
    asyncio.run(main())
