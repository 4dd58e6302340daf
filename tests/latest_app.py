"""A FastAPI app for the out-of-order tests: one latest-only search route keyed per user.

Served by real uvicorn processes (``--workers 1`` or ``2``); with ``CANCELKIT_REDIS_URL`` set
the slot lives in Redis, else in memory. Each worker remembers which searches started their
body, and tells it at ``GET /started``.
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
from fastapi import FastAPI, Header

from cancelkit import Claim, LatestOnly
from cancelkit.backends import Backend, MemoryBackend
from cancelkit.fastapi import install, latest_only
from cancelkit.redis import RedisBackend

url = os.environ.get("CANCELKIT_REDIS_URL")
backend: Backend = RedisBackend(url, prefix="ooo") if url else MemoryBackend()
searches = LatestOnly(backend=backend)
started: list[str] = []


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if isinstance(backend, RedisBackend):
        async with backend:
            yield
    else:
        yield


app = FastAPI(lifespan=lifespan)
install(app)


def user_key(x_user: Annotated[str, Header()]) -> str:
    return f"{x_user}:search"


@app.get("/search")
async def search(q: str, claim: Annotated[Claim, latest_only(searches, key=user_key)]) -> Any:
    started.append(q)
    await anyio.sleep(0.5)  # the work; a newer search interrupts it
    return {"q": q, "seq": claim.seq, "pid": os.getpid()}


@app.get("/started")
async def started_searches() -> Any:
    return {"started": started, "pid": os.getpid()}
