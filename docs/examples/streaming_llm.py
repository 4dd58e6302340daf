"""Stop an LLM-style token stream: the user leaves, presses Stop, or sends a new prompt.

Run: python docs/examples/streaming_llm.py  (serves on 127.0.0.1, shows all three)
"""

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Cookie, Depends, FastAPI, Header, HTTPException
from fastapi.responses import StreamingResponse

from cancelkit import (
    CancelOnDisconnect,
    Claim,
    LatestOnly,
    TokenRegistry,
    TrackedOperation,
)
from cancelkit.fastapi import (
    RequestToken,
    cancel_router,
    install,
    latest_only,
    tracked,
)

api = FastAPI()
install(api)
answers = LatestOnly()  # one answer streams per user: a new prompt replaces it
registry = TokenRegistry()  # Stop: DELETE /operations/{operation_id}
stopped: list[str] = []  # what the server stopped, and why


def current_user(
    x_user: Annotated[str | None, Header()] = None,
    user: Annotated[str | None, Cookie()] = None,  # EventSource sends no headers
) -> str:
    if name := x_user or user:
        return name  # your auth dependency
    raise HTTPException(401)


CurrentUser = Annotated[str, Depends(current_user)]


def chat_key(user: CurrentUser) -> str:
    return f"{user}:chat"


async def generate(prompt: str) -> AsyncIterator[str]:
    """Stands in for your model client's stream: one token at a time."""
    for n in range(10_000):
        await asyncio.sleep(0.01)  # waiting for the model
        yield f"{prompt}-{n}"


# scope="request": the claim and the operation last while the answer streams
Answer = Annotated[Claim, latest_only(answers, key=chat_key, scope="request")]
Operation = Annotated[
    TrackedOperation,
    tracked(registry, owner=current_user, scope="request"),
]
api.include_router(cancel_router(registry, owner=current_user))


@api.post("/chat")
async def chat(
    prompt: str, answer: Answer, op: Operation, token: RequestToken
) -> StreamingResponse:
    return StreamingResponse(events(prompt, token), media_type="text/event-stream")


# For the browser's EventSource (GET only, no custom headers): the id goes in the path.
InPath = Annotated[
    TrackedOperation,
    tracked(registry, owner=current_user, path_param="operation_id", scope="request"),
]


@api.get("/chat/{operation_id}")
async def chat_from_event_source(
    prompt: str, answer: Answer, op: InPath, token: RequestToken
) -> StreamingResponse:
    return StreamingResponse(events(prompt, token), media_type="text/event-stream")


def events(prompt: str, token: RequestToken) -> AsyncIterator[str]:
    """The answer as server-sent events; a last ``end`` event says why it ended."""

    async def stream() -> AsyncIterator[str]:
        try:
            # ends (no error) when a new prompt, Stop or a disconnect cancels
            async for piece in token.until_cancelled(generate(prompt)):
                yield f"data: {piece}\n\n"
            why = token.reason.root.kind.value if token.reason else "done"
            yield f"event: end\ndata: {why}\n\n"  # the client sees a clean end
        finally:  # the model stopped generating: log it, free a GPU slot...
            why = token.reason.root.kind.value if token.reason else "done"
            stopped.append(f"{prompt}: {why}")

    return stream()


app = CancelOnDisconnect(api)  # serve this: uvicorn streaming_llm:app


# --- demo: run it against a real server --------------------------------------------------


async def tokens(lines: AsyncIterator[str], count: int) -> int:
    """Read ``count`` tokens of an answer."""
    seen = 0
    async for line in lines:
        seen += line.startswith("data: ")
        if seen == count:
            break
    return seen


async def ending(lines: AsyncIterator[str]) -> str:
    """Read the rest of an answer; return how it ended (the stream must end cleanly)."""
    last = [line async for line in lines if line][-2:]
    return " / ".join(last)


async def demo() -> None:
    import httpx
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    async with httpx.AsyncClient(base_url=url, headers={"x-user": "alice"}) as http:
        # 1. a new prompt supersedes the answer that is streaming
        op_id = "3f1c2b7e-5a4d-4c1e-9b8a-7d6e5f4a3b2c"  # the client picks it
        first = http.stream("POST", "/chat", params={"prompt": "first"})
        second = http.stream(
            "POST", "/chat", params={"prompt": "second"}, headers={"X-Operation-Id": op_id}
        )
        async with first as one:
            one_lines = one.aiter_lines()
            print("first:  read", await tokens(one_lines, 3), "tokens")
            async with second as two:
                print("first:  ends with", await ending(one_lines))
                two_lines = two.aiter_lines()
                print("second: read", await tokens(two_lines, 3), "tokens")
                # 2. the user presses Stop: cancel it by id, from another request
                stop = await http.delete(f"/operations/{op_id}")
                print("Stop ->", stop.status_code, stop.json()["outcome"])
                print("second: ends with", await ending(two_lines))
    # 3. the user leaves: the connection closes in the middle of an answer
    async with (
        httpx.AsyncClient(base_url=url, headers={"x-user": "bob"}) as bob,
        bob.stream("POST", "/chat", params={"prompt": "third"}) as three,
    ):
        print("third:  read", await tokens(three.aiter_lines(), 3), "tokens, leaves")
    # 4. a browser: GET with a cookie (all EventSource can send), Stop by the id it chose
    async with (
        httpx.AsyncClient(base_url=url, cookies={"user": "carol"}) as browser,
        browser.stream("GET", "/chat/tab-7", params={"prompt": "fourth"}) as four,
    ):
        lines = four.aiter_lines()
        print("fourth: read", await tokens(lines, 3), "tokens (EventSource)")
        stop = await browser.delete("/operations/tab-7")
        print("Stop ->", stop.status_code, stop.json()["outcome"])
        print("fourth: ends with", await ending(lines))
    while len(stopped) < 4:  # the server notices at once; wait for its note
        await asyncio.sleep(0.01)
    print("the server stopped:", ", ".join(stopped[:2]))
    print("                   ", ", ".join(stopped[2:]))
    server.should_exit = True
    await serving


if __name__ == "__main__":
    asyncio.run(demo())
