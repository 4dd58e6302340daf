"""Three services, each calling the next: frontend → search → ranker (the "beyond" guide).

Each is a FastAPI app under CancelOnDisconnect that calls the next one with an httpx client
built on cancelkit.httpx.TokenTransport. Run it: ``python docs/examples/beyond_hops.py``. It
serves the three on 127.0.0.1 (uvicorn, one process for the demo; in production each is its
own service) and shows

1. a 250 ms budget: the ranker gets what is left of it, every hop stops when it runs out, and
   the caller gets one ``504`` marked ``Deadline-Expired``;
2. a client that leaves the frontend: the search and the ranker stop at once too.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import uvicorn
from fastapi import FastAPI

from cancelkit import CancelOnDisconnect, current_token
from cancelkit.fastapi import install
from cancelkit.httpx import TokenTransport

ranker_working: list[asyncio.Event] = []  # for the demo below: the ranker is working


# [service]
def service(name: str, next_url: str | None) -> Any:
    """One service: GET /search does its share and calls the next service, if any."""
    client = httpx.AsyncClient(transport=TokenTransport())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with client:
            yield

    app = FastAPI(lifespan=lifespan)
    install(app)

    @app.get("/search")
    async def search(q: str) -> Any:
        token = current_token()  # the request's token: its deadline came with the request
        assert token is not None
        left_ms = (token.deadline - time.monotonic()) * 1000
        print(f"{name}: {q!r} started, {left_ms:.0f} ms left")
        try:
            if next_url is not None:
                await anyio.sleep(0.02)  # this service's own work
                answer = await client.get(f"{next_url}/search", params={"q": q})
                return answer.json()
            for event in ranker_working:
                event.set()
            await anyio.sleep(1.0)  # the ranker is slow
            return {"results": [f"{q} 1", f"{q} 2"]}
        finally:
            if token.reason is not None:
                print(f"{name}: stopped: {token.reason.kind}")

    # The server's own limit: 10 s; a caller's Request-Timeout-Ms can only shorten it.
    return CancelOnDisconnect(app, timeout=10)


# [/service]


def listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


async def main() -> None:
    sockets = {name: listening() for name in ("frontend", "search", "ranker")}
    url = {name: f"http://127.0.0.1:{sock.getsockname()[1]}" for name, sock in sockets.items()}
    apps = {
        "frontend": service("frontend", url["search"]),
        "search": service("search", url["ranker"]),
        "ranker": service("ranker", None),
    }
    servers = [uvicorn.Server(uvicorn.Config(apps[name], log_level="critical")) for name in apps]
    serving = [
        asyncio.ensure_future(server.serve([sock]))
        for server, sock in zip(servers, sockets.values(), strict=True)
    ]
    while not all(server.started for server in servers):
        await asyncio.sleep(0.01)

    # [budget]
    async with httpx.AsyncClient() as caller:
        answer = await caller.get(
            f"{url['frontend']}/search", params={"q": "cat"}, headers={"Request-Timeout-Ms": "250"}
        )
    print(
        f"caller: HTTP {answer.status_code}, Deadline-Expired: "
        f"{answer.headers.get('deadline-expired')}, {answer.json()['reason']}"
    )
    # [/budget]
    await asyncio.sleep(0.1)  # the hops' last lines

    # A client that leaves: it sends its request, and closes the connection once the ranker
    # is working.
    working = asyncio.Event()
    ranker_working.append(working)
    _, writer = await asyncio.open_connection("127.0.0.1", sockets["frontend"].getsockname()[1])
    writer.write(b"GET /search?q=dog HTTP/1.1\r\nHost: demo\r\n\r\n")
    await working.wait()
    print("caller: leaves")
    writer.close()
    await asyncio.sleep(0.1)

    for server in servers:
        server.should_exit = True
    await asyncio.gather(*serving)


if __name__ == "__main__":
    asyncio.run(main())
