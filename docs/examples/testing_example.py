"""Testing an app that uses cancelkit: concurrent requests in-process.

No sleeps, no server, no sockets.

Run: python -m pytest docs/examples/testing_example.py
"""

import anyio
import httpx
import pytest
from fastapi_latest import app, searches

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # add "trio" to run every test on both


def client(user: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app)  # the app runs in this event loop: no sockets
    return httpx.AsyncClient(
        transport=transport,
        base_url="http://test",
        headers={"x-user": user},
    )


async def test_a_newer_search_supersedes_the_older_one() -> None:
    results: dict[str, httpx.Response] = {}
    async with client("alice") as http, anyio.create_task_group() as tg:

        async def search(q: str) -> None:
            results[q] = await http.get("/search", params={"q": q})

        tg.start_soon(search, "ca")
        await anyio.wait_all_tasks_blocked()  # 'ca' is inside the endpoint: no guessing
        assert searches.statistics().running == 1
        tg.start_soon(search, "cat")
    assert results["ca"].status_code == 409
    assert results["ca"].json()["reason"] == "superseded"
    assert results["cat"].status_code == 200


async def test_users_do_not_supersede_each_other() -> None:
    async with (
        client("alice") as alice,
        client("bob") as bob,
        anyio.create_task_group() as tg,
    ):
        responses: list[httpx.Response] = []

        async def search(http: httpx.AsyncClient, q: str) -> None:
            responses.append(await http.get("/search", params={"q": q}))

        tg.start_soon(search, alice, "cats")
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(search, bob, "dogs")
    assert [r.status_code for r in responses] == [200, 200]
