"""WebSocket: a new message supersedes the previous one's work; closing stops it.

Run: python docs/examples/websocket_latest.py  (serves on 127.0.0.1, shows both)
"""

import asyncio
import uuid

import anyio
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from cancelkit import (
    CancelKind,
    CancellationToken,
    CancelReason,
    LatestOnly,
    OperationCancelled,
)

app = FastAPI()
replies = LatestOnly()  # one key per connection: the newest message wins
stopped: list[str] = []  # what the server stopped, and why


async def answer(
    websocket: WebSocket,
    key: str,
    text: str,
    closed: CancellationToken,
) -> None:
    try:
        async with replies.claim(key):  # supersedes this connection's previous work
            with closed.scope():  # and stops when the connection closes
                await anyio.sleep(0.5)  # the expensive part
                await websocket.send_json({"for": text, "answer": text.upper()})
    except OperationCancelled as exc:
        why = exc.reason.root.kind.value
        stopped.append(f"{text}: {why}")
        if why == "superseded":  # the client is still there: tell it
            await websocket.send_json({"for": text, "stopped": why})


@app.websocket("/ws")
async def chat(websocket: WebSocket) -> None:
    await websocket.accept()
    key = uuid.uuid4().hex  # this connection's slot
    closed = CancellationToken()
    async with anyio.create_task_group() as tasks:
        try:
            while True:
                text = await websocket.receive_text()
                tasks.start_soon(answer, websocket, key, text, closed)
        except WebSocketDisconnect:  # the client left: stop what still runs
            closed.cancel(CancelReason(CancelKind.CLIENT_DISCONNECTED))


# --- demo: run it against a real server --------------------------------------------------


async def demo() -> None:
    import uvicorn
    from websockets.asyncio.client import connect

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
        await ws.send("ca")
        while replies.statistics().running == 0:  # 'ca' is being answered
            await asyncio.sleep(0.005)
        await ws.send("cat")  # supersedes 'ca'
        print(await ws.recv())
        print(await ws.recv())
        await ws.send("cats")
        while replies.statistics().running == 0:  # 'cats' is being answered
            await asyncio.sleep(0.005)
    # the connection is closed: 'cats' stops
    while len(stopped) < 2:
        await asyncio.sleep(0.005)
    print("the server stopped:", ", ".join(stopped))
    server.should_exit = True
    await serving


if __name__ == "__main__":
    asyncio.run(demo())
