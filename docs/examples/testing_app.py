"""The app that the testing page's tests exercise (docs/examples/testing_example.py).

A search that a newer one supersedes, background exports that only their owner sees
and cancels, and a stream that stops when its client leaves or opens a newer one. The
exports run in a BackgroundOperations entered in the lifespan, as in production.

Serve it: uvicorn testing_app:app
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import anyio
from fastapi import FastAPI, Header, Response
from fastapi.responses import StreamingResponse

from cancelkit import BackgroundOperations, CancelOnDisconnect, Claim, LatestOnly
from cancelkit.fastapi import (
    OperationStarter,
    install,
    latest_only,
    operation_starter,
    operations_router,
)

searches = LatestOnly()  # one search per user runs; a newer one supersedes it
streams = LatestOnly()  # one stream per user
operations = BackgroundOperations()  # it owns a task group: enter it in the lifespan


@asynccontextmanager
async def lifespan(api: FastAPI) -> AsyncIterator[None]:
    async with operations:  # on exit: a grace period, then cancel ("shutdown")
        yield


api = FastAPI(lifespan=lifespan)
install(api)  # superseded -> 409, deadline -> 504, client gone -> 499
app = CancelOnDisconnect(api)  # serve this: a client that leaves cancels its request


async def current_user(x_user: Annotated[str, Header()]) -> str:
    """Your auth dependency; async (FastAPI runs a sync one in a worker thread)."""
    return x_user


Search = Annotated[Claim, latest_only(searches, key=current_user)]
Stream = Annotated[Claim, latest_only(streams, key=current_user, scope="request")]
Start = Annotated[OperationStarter, operation_starter(operations, owner=current_user)]
# GET /operations/{operation_id} and DELETE /operations/{operation_id}, per owner
api.include_router(operations_router(operations, owner=current_user))


@api.get("/search")
async def search(q: str, claim: Search) -> dict[str, str | int]:
    await anyio.sleep(0.2)  # the expensive part: a newer search interrupts it
    return {"q": q, "generation": claim.generation}


async def export(table: str, rows: int) -> dict[str, str | int]:
    """The slow work: it outlives the request that started it."""
    for done in range(1, rows + 1):
        await anyio.sleep(0.01)  # one row; a cancel interrupts it here
        await operations.report(done, rows)
    return {"table": table, "rows": rows}


@api.post("/exports", status_code=202)
async def start_export(table: str, start: Start, rows: int = 1_000) -> Response:
    return await start(export, table, rows)


async def ticks() -> AsyncIterator[int]:
    """Stands in for a model's answer or a feed: a new item every 10 ms, for ever."""
    n = 0
    while True:
        await anyio.sleep(0.01)
        yield n
        n += 1


@api.get("/ticks")
async def tick_stream(claim: Stream) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        # ends (no error) when the client leaves or opens a newer stream
        async for n in claim.token.until_cancelled(ticks()):
            yield f"data: {n}\n\n"
        reason = claim.token.reason
        yield f"event: end\ndata: {reason.root.kind.value if reason else 'done'}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
