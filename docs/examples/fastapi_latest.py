"""How do I cancel the previous request? One dependency, keyed per user.

Run: python docs/examples/fastapi_latest.py  (serves on 127.0.0.1 and shows it working)
"""

import asyncio
from typing import Annotated

from fastapi import FastAPI, Header, Request

from cancelkit import Claim, LatestOnly
from cancelkit.fastapi import install, latest_only

app = FastAPI()
install(app)  # superseded -> 409, deadline -> 504, client gone -> 499
searches = LatestOnly()  # in memory; backend=RedisBackend(...) for workers


def search_key(request: Request, x_user: Annotated[str, Header()]) -> str:
    """One slot per user and route: one user's typing never cancels another user's."""
    return f"{x_user}:{request.url.path}"


SearchClaim = Annotated[Claim, latest_only(searches, key=search_key)]


@app.get("/search")
async def search(q: str, claim: SearchClaim) -> dict:
    await asyncio.sleep(0.5)  # the expensive part: a newer request interrupts it
    return {"q": q, "results": [f"{q}-1", f"{q}-2"], "generation": claim.generation}


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
        alice = {"x-user": "alice"}
        first = asyncio.ensure_future(http.get("/search", params={"q": "ca"}, headers=alice))
        while searches.statistics().running == 0:  # 'ca' is running; alice keeps typing...
            await asyncio.sleep(0.005)
        second = asyncio.ensure_future(http.get("/search", params={"q": "cat"}, headers=alice))
        await asyncio.wait([first])  # 'cat' took alice's slot, so 'ca' was answered
        bob = http.get("/search", params={"q": "dog"}, headers={"x-user": "bob"})
        for name, response in zip(
            ["alice 'ca' ", "alice 'cat'", "bob 'dog'  "],
            await asyncio.gather(first, second, bob),
            strict=True,
        ):
            body = response.json()
            body.pop("source", None)  # the superseding request's id
            print(f"{name} -> {response.status_code} {body}")
    server.should_exit = True
    await serving


if __name__ == "__main__":
    asyncio.run(demo())
