"""Stop handlers whose client went away, async and sync alike.

Run: python docs/examples/fastapi_disconnect.py
"""

import asyncio
import logging
import time

from fastapi import FastAPI

from cancelkit import CancelOnDisconnect, OperationCancelled
from cancelkit.fastapi import RequestToken, install

api = FastAPI()
install(api)
events: list[str] = []


@api.get("/report")
async def report(token: RequestToken) -> dict[str, str]:
    try:
        await asyncio.sleep(30)  # interrupted the moment the client disconnects
        return {"status": "done"}
    finally:
        events.append(f"async handler stopped, token: {token.reason}")


@api.get("/sync-report")
def sync_report(token: RequestToken) -> dict[str, str]:
    """Runs in a worker thread: it cannot be interrupted, so it checks the token."""
    try:
        for _ in range(3000):
            token.raise_if_cancelled()
            time.sleep(0.01)  # a step of blocking work
        return {"status": "done"}
    except OperationCancelled as exc:
        events.append(f"sync handler stopped at its next check: {exc.reason.root.kind}")
        raise


app = CancelOnDisconnect(api)  # serve this: uvicorn module:app


# --- demo: run it against a real server --------------------------------------------------


async def close_mid_request(port: int, path: str, stopped: int) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: demo\r\n\r\n".encode())
    await writer.drain()
    await asyncio.sleep(0.2)  # the handler is busy...
    writer.close()  # ...and the user closes the tab
    await writer.wait_closed()
    while len(events) < stopped:
        await asyncio.sleep(0.01)


async def demo() -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="  log: %(message)s")
    logging.getLogger("uvicorn").setLevel(logging.WARNING)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    await asyncio.wait_for(close_mid_request(port, "/report", 1), 10)
    await asyncio.wait_for(close_mid_request(port, "/sync-report", 2), 10)
    for line in events:
        print(line)
    server.should_exit = True
    await serving


if __name__ == "__main__":
    asyncio.run(demo())
