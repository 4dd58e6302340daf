"""Latest-only and cancel-by-id across ``uvicorn --workers N``: one Redis backend per worker.

Serve: CANCELKIT_REDIS_URL=redis://127.0.0.1:6379/0 uvicorn fastapi_redis:app --workers 2
"""

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI, Header, Request

from cancelkit import Claim, LatestOnly, TokenRegistry, TrackedOperation
from cancelkit.fastapi import cancel_router, install, latest_only, tracked
from cancelkit.redis import RedisBackend

backend = RedisBackend(os.environ.get("CANCELKIT_REDIS_URL", "redis://127.0.0.1:6379/0"))
searches = LatestOnly(backend=backend)
registry = TokenRegistry(backend=backend)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with backend:  # runs in each worker after the fork: its own id and channel
        yield


app = FastAPI(lifespan=lifespan)
install(app)


def current_user(x_user: Annotated[str, Header()]) -> str:
    return x_user


def search_key(request: Request, user: Annotated[str, Header(alias="x-user")]) -> str:
    return f"{user}:{request.url.path}"


app.include_router(cancel_router(registry, owner=current_user))


@app.get("/search")
async def search(q: str, claim: Annotated[Claim, latest_only(searches, key=search_key)]) -> dict:
    await asyncio.sleep(2)  # the expensive part: superseded by a newer search on any worker
    return {"q": q, "worker": backend.worker}


@app.post("/exports")
async def export(op: Annotated[TrackedOperation, tracked(registry, owner=current_user)]) -> dict:
    await asyncio.sleep(30)  # stopped by DELETE /operations/{id}, sent to any worker
    return {"id": op.id}  # pragma: no cover


@app.get("/worker")
async def worker() -> dict:
    return {"worker": backend.worker, "pid": os.getpid()}
