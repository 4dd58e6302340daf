"""The popular recipe for "start it now, cancel it by id later", and how it fails.

``asyncio.create_task(...)`` starts the work and the endpoint answers "Processing request" at
once; a dict of events lets ``/cancel/{request_id}`` stop it later. This script serves that app
with a real uvicorn on 127.0.0.1 and shows each failure with real HTTP requests:

1. a Stop sent before the work registered is lost: the work runs to the end;
2. a reused id orphans the first task: nothing can stop it any more;
3. a failed task dies unseen, and the cancel endpoint still claims to cancel it;
4. the dict only grows;
5. with two workers (two app instances stand in for ``uvicorn --workers 2``), a Stop that
   lands on the other worker finds nothing;
6. at shutdown nobody cancels the task: it is still running after the server stopped.

Run: python docs/examples/naive_background_tasks.py
"""

from __future__ import annotations

import asyncio
import socket

import httpx
import uvicorn
from fastapi import FastAPI

STEPS, STEP = 10, 0.03  # the export: ten chunks of work
events: list[str] = []


def make_app() -> FastAPI:
    """The recipe: create_task, a dict of events, and /cancel/{request_id}."""
    app = FastAPI()
    tasks: dict[str, asyncio.Event] = {}

    async def process(request_id: str, stop: asyncio.Event) -> None:
        for _ in range(STEPS):
            if stop.is_set():
                events.append(f"{request_id} stopped")
                return
            await asyncio.sleep(STEP)  # one chunk of the export
            if request_id.startswith("bad"):
                events.append(f"{request_id} failed")
                raise ValueError("the export failed")
        events.append(f"{request_id} completed")

    @app.post("/process/{request_id}")
    async def start(request_id: str) -> dict[str, str]:
        stop = asyncio.Event()
        tasks[request_id] = stop
        asyncio.create_task(process(request_id, stop))  # noqa: RUF006 (the recipe)
        return {"message": "Processing request"}

    @app.post("/cancel/{request_id}")
    async def cancel(request_id: str) -> dict[str, str]:
        if request_id in tasks:
            tasks[request_id].set()
            return {"message": "Request cancelled"}
        return {"message": "Request not found"}

    app.state.tasks = tasks  # for this script's report only
    return app


# --- run it against real servers ---------------------------------------------------------


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


async def logged(*lines: str) -> None:
    """Wait until the work logged ``lines`` (no guessing with sleeps)."""
    while not set(lines) <= set(events):
        await asyncio.sleep(0.005)


async def main() -> None:
    app_a, app_b = make_app(), make_app()
    server_a, task_a, a = await serve(app_a)
    server_b, task_b, b = await serve(app_b)
    async with httpx.AsyncClient(timeout=10) as http:
        print("1. Stop before the work registered:")
        stop = await http.post(f"{a}/cancel/early")
        await http.post(f"{a}/process/early")
        await logged("early completed")
        print(f"  Stop answered {stop.json()['message']!r}; the export: 'early completed'")

        print("2. the same id twice, then Stop:")
        await http.post(f"{a}/process/job")
        await http.post(f"{a}/process/job")
        await http.post(f"{a}/cancel/job")
        await logged("job stopped", "job completed")
        print("  one 'job stopped', the other 'job completed': nobody could stop it")

        print("3. an export that fails:")
        started = await http.post(f"{a}/process/bad-1")
        await logged("bad-1 failed")
        stop = await http.post(f"{a}/cancel/bad-1")
        print(f"  the client was told {started.json()['message']!r}, and nothing after")
        print(f"  Stop afterwards answered {stop.json()['message']!r}")

        print(f"4. entries left in the dict: {len(app_a.state.tasks)} (it never shrinks)")

        print("5. two workers: started on one, Stop sent to the other:")
        await http.post(f"{a}/process/w-1")
        stop = await http.post(f"{b}/cancel/w-1")
        await logged("w-1 completed")
        print(f"  Stop answered {stop.json()['message']!r}; the export: 'w-1 completed'")

        print("6. shutdown while an export runs:")
        await http.post(f"{a}/process/long")
    for server in (server_a, server_b):
        server.should_exit = True
    await asyncio.gather(task_a, task_b)
    orphans = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    print(f"  still running after the server stopped: {len(orphans)} task(s)")
    # asyncio.run() now cancels it without a word: no reason, no cleanup that knew why


if __name__ == "__main__":
    asyncio.run(main())
