"""The app of test_stopping.py: a background operation, its long-poll, and a stream.

Served as a real process (``uvicorn tests.shutdown_app:asgi`` or hypercorn on trio). With
``SHUTDOWN_WRAP=middleware`` the app runs under :class:`~cancelkit.CancelOnDisconnect`;
otherwise it is the plain FastAPI app. Writes ``cleanup KIND`` when the operation's cleanup
runs and ``stream ended KIND`` when the stream stops (the token's reason). With
``SHUTDOWN_REDIS=URL`` (and ``SHUTDOWN_PREFIX``) the statuses live in a
:class:`~cancelkit.redis.RedisStatusStore` there.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from cancelkit import BackgroundOperations, CancellationToken, CancelOnDisconnect, current_token
from cancelkit.fastapi import RequestToken, operations_router
from cancelkit.redis import RedisStatusStore

GRACE = 1.0
REDIS = os.environ.get("SHUTDOWN_REDIS")
operations = BackgroundOperations(
    grace=GRACE,
    cleanup_timeout=GRACE,
    store=None if REDIS is None else RedisStatusStore(REDIS, prefix=os.environ["SHUTDOWN_PREFIX"]),
)
inflight = [0]


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def reason_of(token: CancellationToken | None) -> str:
    reason = None if token is None else token.reason
    return "-" if reason is None else reason.root.kind.value


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with operations:
        yield


app = FastAPI(lifespan=lifespan)
app.include_router(operations_router(operations, max_wait=60))


async def export() -> None:
    try:
        await anyio.sleep_forever()
    finally:
        say(f"cleanup {reason_of(current_token())}")


@app.post("/exports")
async def start_export() -> dict[str, str]:
    return {"id": await operations.start(export)}


@app.get("/inflight")
async def count() -> dict[str, int]:
    return {"inflight": inflight[0] - 1}  # not counting this request


@app.get("/stream")
async def stream(token: RequestToken) -> StreamingResponse:
    async def ticks() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"tick\n"
                await anyio.sleep(0.05)
        finally:
            say(f"stream ended {reason_of(token)}")

    return StreamingResponse(ticks())


async def counted(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return await app(scope, receive, send)
    inflight[0] += 1
    try:
        await app(scope, receive, send)
    finally:
        inflight[0] -= 1


asgi: Any = counted
if os.environ.get("SHUTDOWN_WRAP") == "middleware":
    asgi = CancelOnDisconnect(counted, shutdown_grace=GRACE)
