"""Background exports: start now (202 + Location), read the status, cancel by id later.

Run the demo:       python docs/examples/fastapi_operations.py
Serve one worker:   uvicorn fastapi_operations:app
Serve a fleet:      CANCELKIT_REDIS_URL=redis://127.0.0.1:6379/0 \\
                        uvicorn fastapi_operations:app --workers 2
"""

import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Annotated

import anyio
from fastapi import FastAPI, Header, Response

from cancelkit import BackgroundOperations, TokenRegistry
from cancelkit.fastapi import (
    OperationStartedBody,
    OperationStarter,
    install,
    operation_starter,
    operations_router,
)

REDIS_URL = os.environ.get("CANCELKIT_REDIS_URL")
if REDIS_URL:  # several workers: cancels and statuses go through Redis
    from cancelkit.redis import RedisBackend, RedisStatusStore

    backend = RedisBackend(REDIS_URL)
    operations = BackgroundOperations(
        registry=TokenRegistry(backend=backend), store=RedisStatusStore(REDIS_URL)
    )
else:  # one process: everything in memory
    operations = BackgroundOperations()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with AsyncExitStack() as stack:
        if REDIS_URL:
            await stack.enter_async_context(backend)
        await stack.enter_async_context(operations)  # exit: grace, then cancel
        yield


app = FastAPI(lifespan=lifespan)
install(app)


def current_user(x_user: Annotated[str, Header()]) -> str:
    """Your real auth dependency goes here: operations are scoped to their owner."""
    return x_user


Start = Annotated[OperationStarter, operation_starter(operations, owner=current_user)]

# GET /operations/{id} (?wait=seconds) and DELETE /operations/{id}
app.include_router(operations_router(operations, owner=current_user))


async def export(table: str, chunks: int) -> dict[str, int | str]:
    """The slow work: it outlives the request that started it."""
    if table not in {"users", "events", "orders", "logs"}:
        raise LookupError(f"no table {table!r}")  # the client sees its type and message
    for done in range(1, chunks + 1):
        await anyio.sleep(0.05)  # one chunk of rows; a cancel interrupts it here
        await operations.report(done, chunks, f"{100 * done} rows of {table}")
    # The commit point: from here on a Stop answers 409 "committed" and the export
    # completes (a Stop that came first makes this raise: it ends "cancelled").
    await operations.commit()
    return {"table": table, "rows": 100 * chunks}


@app.post("/exports", status_code=202, response_model=OperationStartedBody)
async def start_export(table: str, start: Start, chunks: int = 10) -> Response:
    return await start(export, table, chunks)


@app.get("/worker")
async def worker() -> dict[str, str | int | None]:
    return {"worker": operations.store.worker, "pid": os.getpid()}


# --- demo: run it against a real server --------------------------------------------------


async def demo() -> None:
    import httpx
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        while not server.started:
            await anyio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        alice = {"x-user": "alice"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=alice) as http:
            started = await http.post("/exports", params={"table": "users", "chunks": 3})
            print(f"start -> {started.status_code} {started.json()['state']}")
            location = started.headers["location"]
            done = (await http.get(location, params={"wait": 10})).json()
            print(f"status -> {done['state']} {done['result']} {done['progress']['message']}")

            slow = await http.post("/exports", params={"table": "events", "chunks": 10_000})
            stop = await http.delete(slow.headers["location"])
            print(f"stop -> {stop.status_code} {stop.json()['outcome']}")
            status = (await http.get(slow.headers["location"], params={"wait": 10})).json()
            print(f"status -> {status['state']} ({status['reason']['kind']})")
            other = await http.get(location, headers={"x-user": "mallory"})
            print(f"another user reads it -> {other.status_code}")

            early = await http.delete("/operations/export-7")  # Stop before the start
            print(f"stop before the start -> {early.status_code} {early.json()['outcome']}")
            late = await http.post(
                "/exports", params={"table": "orders"}, headers={"X-Operation-Id": "export-7"}
            )
            print(f"the start arriving afterwards -> {late.status_code} {late.json()['state']}")

            twice = {"X-Operation-Id": "export-8"}
            params = {"table": "logs", "chunks": 10_000}
            await http.post("/exports", params=params, headers=twice)
            again = await http.post("/exports", params=params, headers=twice)
            print(f"the same id again -> {again.status_code} {again.json()['reason']}")
            await http.delete("/operations/export-8")

            failed = await http.post("/exports", params={"table": "nope"})
            status = (await http.get(failed.headers["location"], params={"wait": 10})).json()
            print(f"a failing export -> {status['state']} {status['error']}")
        server.should_exit = True


if __name__ == "__main__":
    anyio.run(demo)
