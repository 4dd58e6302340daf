"""Cancel a FastAPI handler when its client goes away.

Run it: ``python docs/examples/disconnect_example.py``. It starts uvicorn on 127.0.0.1,
sends a request for a slow report, closes the connection while the report is being made,
and shows that the handler was stopped at once, with its cleanup run.
"""

from __future__ import annotations

import logging
import socket

import anyio
import uvicorn
from fastapi import FastAPI, Request

from cancelkit import CancelOnDisconnect, request_token, shielded_cleanup

api = FastAPI()
handler_started = anyio.Event()
handler_stopped = anyio.Event()


@api.get("/report")
async def report(request: Request) -> dict[str, str]:
    token = request_token(request.scope)  # also: cancelkit.current_token()
    handler_started.set()
    try:
        await anyio.sleep(30)  # stands for expensive work: queries, an upstream call...
        return {"report": "done"}
    finally:
        with shielded_cleanup(timeout=1.0):  # cleanup may await, within a bound
            await anyio.sleep(0.01)
        reason = token.reason.kind if token.reason else None
        print(f"handler stopped: {reason}", flush=True)
        handler_stopped.set()


# Outermost, around the whole application: a pure ASGI middleware.
app = CancelOnDisconnect(api, exclude=["/health"], shutdown_grace=2.0)


async def main() -> None:
    logging.basicConfig(format="%(name)s %(levelname)s %(message)s")
    logging.getLogger("cancelkit").setLevel(logging.INFO)  # the 499 line
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            client = await anyio.connect_tcp("127.0.0.1", port)
            await client.send(b"GET /report HTTP/1.1\r\nHost: example\r\n\r\n")
            await handler_started.wait()
            print("handler started; the client closes the connection", flush=True)
            await client.aclose()
            await handler_stopped.wait()
            server.should_exit = True
    print(app.statistics(), flush=True)


if __name__ == "__main__":
    anyio.run(main)
