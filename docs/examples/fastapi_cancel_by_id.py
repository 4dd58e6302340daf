"""Stop a running request from another request: DELETE /operations/{id}.

The client picks the operation id (a UUID) and sends it with the work, so it
can cancel the work while it runs, or even before the server has seen it.

Run: python docs/examples/fastapi_cancel_by_id.py
"""

import asyncio
import uuid
from typing import Annotated

from fastapi import FastAPI, Header

from cancelkit import TokenRegistry, TrackedOperation
from cancelkit.fastapi import cancel_router, install, tracked

app = FastAPI()
install(app)
registry = TokenRegistry()


def current_user(x_user: Annotated[str, Header()]) -> str:
    """Your real auth dependency goes here: operations are scoped to their owner."""
    return x_user


# DELETE /operations/{operation_id} answers 202 "cancelled" (it was running) or
# 202 "pending" (unknown yet: it will start cancelled), 404 (another owner's, or just
# finished), 422 (a malformed id)
app.include_router(cancel_router(registry, owner=current_user))


@app.post("/exports")
async def export(
    op: Annotated[TrackedOperation, tracked(registry, owner=current_user)],
) -> dict[str, str]:
    for _ in range(20):  # the expensive part: interrupted by DELETE /operations/{op.id}
        await asyncio.sleep(0.1)
    return {"id": op.id, "status": "done"}


# --- demo: run it against a real server --------------------------------------------------


async def demo() -> None:
    import httpx
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        alice, mallory = {"x-user": "alice"}, {"x-user": "mallory"}
        op_id = str(uuid.uuid4())
        work = asyncio.ensure_future(
            http.post("/exports", headers={**alice, "X-Operation-Id": op_id})
        )
        while not registry.operations(owner="alice"):  # the export is running
            await asyncio.sleep(0.005)
        other = await http.delete(f"/operations/{op_id}", headers=mallory)
        print(f"mallory cancels alice's export -> {other.status_code} {other.json()['outcome']}")
        stop = await http.delete(f"/operations/{op_id}", headers=alice)
        print(f"alice presses Stop -> {stop.status_code} {stop.json()['outcome']}")
        response = await work
        print(f"the export request -> {response.status_code} {response.json()['reason']}")

        early_id = str(uuid.uuid4())
        early = await http.delete(f"/operations/{early_id}", headers=alice)
        print(f"Stop before the work arrives -> {early.status_code} {early.json()['outcome']}")
        late = await http.post("/exports", headers={**alice, "X-Operation-Id": early_id})
        print(f"the export arriving afterwards -> {late.status_code} {late.json()['reason']}")
        bad = await http.delete("/operations/not a valid id!", headers=alice)
        print(f"a malformed id -> {bad.status_code}")
    server.should_exit = True
    await serving


if __name__ == "__main__":
    asyncio.run(demo())
