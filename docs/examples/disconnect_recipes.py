"""The disconnect guide's recipes, as one runnable file: per-route modes, bounded cleanup,
calling shutdown() from uvicorn and hypercorn, and the per-request guard.

Run: python docs/examples/disconnect_recipes.py
"""

import asyncio
import socket
from typing import Any

import anyio
import httpx
import uvicorn
from fastapi import FastAPI

from cancelkit import CancelOnDisconnect, DisconnectGuard, shielded_cleanup
from cancelkit.fastapi import RequestToken

api = FastAPI()
rolled_back: list[str] = []


@api.post("/orders")
async def place_order() -> dict[str, str]:
    try:
        await anyio.sleep(30)  # the work; interrupted if the client leaves
        return {"status": "placed"}
    finally:
        # [cleanup]
        with shielded_cleanup(timeout=2.0):  # runs even though the handler was interrupted
            await anyio.sleep(0.01)  # e.g. await tx.rollback()
            rolled_back.append("order")
        # [/cleanup]


@api.post("/payments")
async def pay(token: RequestToken) -> dict[str, Any]:
    await anyio.sleep(0.2)  # signalling mode: this finishes even if the client left
    return {"status": "paid", "client_left": token.cancelled}


@api.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


# [modes]
app = CancelOnDisconnect(
    api,
    mode="interrupt",  # the default for every route
    modes={"/payments": "signal"},  # these finish, with the token as a hint
    exclude=["/health", "/static/"],  # these are passed through untouched
)
# [/modes]


# [uvicorn]
class Server(uvicorn.Server):
    """Served with lifespan="off", the middleware hears no signal: stop the requests first."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await app.shutdown()  # in-flight requests: reason "shutdown" after the grace period
        await super().shutdown(sockets)


# [/uvicorn]


# [hypercorn]
async def serve_with_hypercorn(config: Any, stop_requested: anyio.Event) -> None:
    from hypercorn.trio import serve  # or hypercorn.asyncio

    async def shutdown_trigger() -> None:
        await stop_requested.wait()
        await app.shutdown()

    await serve(app, config, shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]


# [/hypercorn]


# [guard]
async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
    """Your own ASGI code: one guard per HTTP request."""
    if scope["type"] != "http":
        return await api(scope, receive, send)
    guard = DisconnectGuard(scope, receive, send, mode="interrupt")
    await guard.run(api)


# [/guard]


# --- demo: run the recipes against real servers ------------------------------------------


async def leave_early(port: int, path: str) -> None:
    """A client that sends a request and closes the connection before the answer."""
    stream = await anyio.connect_tcp("127.0.0.1", port)
    await stream.send(f"POST {path} HTTP/1.1\r\nHost: demo\r\nContent-Length: 0\r\n\r\n".encode())
    await anyio.sleep(0.1)
    await stream.aclose()


async def with_uvicorn() -> None:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = Server(config)
    serving = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        print("excluded route:", (await http.get("/health")).json())
        print("signalling route:", (await http.post("/payments")).json())
    await leave_early(port, "/orders")
    while not rolled_back:
        await asyncio.sleep(0.01)
    print("interrupted handler cleaned up:", rolled_back)
    server.should_exit = True
    await serving
    print("uvicorn stopped; statistics:", app.statistics())


async def with_hypercorn_and_the_guard() -> None:
    from hypercorn.config import Config

    config = Config()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = config.errorlog = None
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(serve_with_hypercorn, config, stop)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(500):
                try:
                    health = (await http.get("/health")).json()
                    break
                except httpx.TransportError:
                    await anyio.sleep(0.02)
        print("hypercorn on trio:", health)
        stop.set()
    transport = httpx.ASGITransport(asgi_app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://guard") as http:
        print("guard:", (await http.get("/health")).json())


if __name__ == "__main__":
    asyncio.run(with_uvicorn())
    anyio.run(with_hypercorn_and_the_guard, backend="trio")
