"""One hop of the three-service chain of test_hops.py (and benchmarks/bench_hops.py).

Served by a real server process (uvicorn on asyncio, hypercorn on trio). ``HOP_NAME`` names it,
``HOP_NEXT`` is the next hop's URL (none for the last), ``HOP_MODE`` the CancelOnDisconnect
mode. Every work route calls the next hop with :class:`cancelkit.httpx.TokenTransport`; the
last hop answers at once, or holds (``hold=1``), or streams one chunk and holds (``hold=2``),
or works ``work_ms`` milliseconds and answers. ``HOP_PLAIN=1`` is the same chain without
cancelkit (no middleware, httpx's own transport): the benchmark's baseline.

The hop records, per request id, when its handler started and ended (the time left of its
deadline, its reason) and every status it sent; ``GET /records/{id}?until=started|ended``
waits (bounded) until the record gets there, so the test never sleeps.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from cancelkit import (
    CancellationToken,
    CancelOnDisconnect,
    Claim,
    LatestOnly,
    TokenRegistry,
    TrackedOperation,
    current_token,
)
from cancelkit.fastapi import cancel_router, install, latest_only, tracked
from cancelkit.httpx import TokenTransport

NAME = os.environ.get("HOP_NAME", "hop")
NEXT = os.environ.get("HOP_NEXT", "")
MODE: Any = os.environ.get("HOP_MODE", "interrupt")
PLAIN = os.environ.get("HOP_PLAIN") == "1"
WAIT_LIMIT = 30.0  # seconds a /records request may wait


class Record:
    """What one hop saw of one request."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.ended = anyio.Event()
        self.entry: float | None = None  # time.monotonic() as the handler started
        self.left_ms: float | None = None  # of its deadline, as the handler started
        self.call: float | None = None  # as it called the next hop
        self.end: str | None = None  # "completed" or the reason kind
        self.end_at: float | None = None
        self.statuses: list[int] = []

    def as_dict(self) -> dict[str, Any]:
        return {
            "hop": NAME,
            "started": self.started.is_set(),
            "ended": self.ended.is_set(),
            "entry": self.entry,
            "left_ms": self.left_ms,
            "call": self.call,
            "end": self.end,
            "end_at": self.end_at,
            "statuses": self.statuses,
        }


records: dict[str, Record] = {}
counts = {"started": 0, "ended": 0}
counted = anyio.Event()  # set (and replaced) whenever a handler ends
slot = LatestOnly()
registry = TokenRegistry()
client: httpx.AsyncClient


def record(id: str) -> Record:
    return records.setdefault(id, Record())


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    global client
    transport = httpx.AsyncHTTPTransport() if PLAIN else TokenTransport()
    async with httpx.AsyncClient(transport=transport, timeout=WAIT_LIMIT) as client:
        yield


app = FastAPI(lifespan=lifespan)
install(app)
app.include_router(cancel_router(registry))


async def work(id: str, request: Request) -> Any:
    """The body of every work route: record, spend, call the next hop or hold."""
    rec = record(id)
    token = current_token() or CancellationToken()  # (none without cancelkit)
    rec.entry = time.monotonic()
    rec.left_ms = None if token.deadline == float("inf") else (token.deadline - rec.entry) * 1000
    counts["started"] += 1
    rec.started.set()
    try:
        spend = int(request.query_params.get("spend_ms", "0"))
        if spend:
            await anyio.sleep(spend / 1000)  # the hop's own work before it calls the next
        hold = request.query_params.get("hold", "0")
        work_ms = int(request.query_params.get("work_ms", "0"))
        if NEXT:
            rec.call = time.monotonic()
            params = {"hold": hold, "work_ms": str(work_ms)}
            answer = await client.get(f"{NEXT}/work/{id}", params=params)
            answer.raise_for_status()
            rec.end = "completed"
            return answer.json()
        if hold == "1":
            await anyio.sleep_forever()
        if hold == "2":
            return StreamingResponse(held_stream())  # the exchange ends when the client goes
        await anyio.sleep(work_ms / 1000)
        rec.end = "completed"
        return {"done": NAME}
    finally:
        reason = token.reason  # (a claim's or an operation's token: not the request's)
        if rec.end is None and reason is not None:
            rec.end = reason.root.kind.value


async def held_stream() -> AsyncIterator[bytes]:
    yield b"first"
    await anyio.sleep_forever()


@app.get("/work/{id}")
async def plain(id: str, request: Request) -> Any:
    return await work(id, request)


@app.get("/search/{id}")
async def search(
    id: str, request: Request, claim: Annotated[Claim, latest_only(slot, key=lambda r: "k")]
) -> Any:
    return await work(id, request)


@app.post("/report/{id}")
async def report(
    id: str, request: Request, op: Annotated[TrackedOperation, tracked(registry)]
) -> Any:
    return await work(id, request)


@app.get("/records/{id}")
async def read_record(id: str, until: str = "") -> Any:
    rec = record(id)
    event = {"started": rec.started, "ended": rec.ended}.get(until)
    if event is not None:
        with anyio.move_on_after(WAIT_LIMIT):
            await event.wait()
    return rec.as_dict()


@app.get("/counts")
async def read_counts(ended: int = 0) -> Any:
    """The handlers started and ended so far; waits (bounded) until ``ended`` have ended."""
    with anyio.move_on_after(WAIT_LIMIT):
        while counts["ended"] < ended:
            await counted.wait()
    return counts


def recorded(inner: Callable[..., Any]) -> Callable[..., Any]:
    """Outermost ASGI layer: note every status sent for a request id, and the exchange's end."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        global counted
        parts = scope.get("path", "").split("/")
        if scope["type"] != "http" or len(parts) != 3 or parts[1] not in WORK:
            await inner(scope, receive, send)
            return
        rec = record(parts[2])

        async def noting(message: Any) -> None:
            if message["type"] == "http.response.start":
                rec.statuses.append(message["status"])
            await send(message)

        try:
            await inner(scope, receive, noting)
        finally:
            if rec.end is None:  # never started, or a stream that ended: the request's token
                token = scope.get("cancelkit.token")
                reason = None if token is None else token.reason
                rec.end = "completed" if reason is None else reason.root.kind.value
            rec.end_at = time.monotonic()
            counts["ended"] += 1
            rec.ended.set()
            counted.set()
            counted = anyio.Event()

    return app


WORK = {"work", "search", "report"}
asgi = recorded(app if PLAIN else CancelOnDisconnect(app, mode=MODE))
