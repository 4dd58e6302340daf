"""Testing the testing page's app with pytest-asyncio, next to anyio's plugin.

Run: python -m pytest docs/examples/testing_pytest_asyncio.py
(configuration: `asyncio_mode = "strict"` in pyproject.toml; see the testing page)
"""

import asyncio
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
import pytest_asyncio
from testing_app import app, operations, searches
from testing_example import running  # the app's lifespan, as a server runs it


@pytest_asyncio.fixture
async def lifespan() -> AsyncIterator[None]:
    """The app's lifespan, entered and exited in one task of its own.

    pytest-asyncio runs a fixture's setup and its teardown in two different tasks, and
    the lifespan's task group must exit in the task that entered it.
    """
    started = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    async def run() -> None:
        async with running(app):
            started.set_result(None)
            await stop.wait()

    task = asyncio.create_task(run())
    await asyncio.wait([started, task], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # the startup failed: raise its error here
    yield
    stop.set()
    await task  # the shutdown runs in the task that ran the startup


@pytest_asyncio.fixture
async def alice(lifespan: None) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app)  # the app runs in the test's loop
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", headers={"x-user": "alice"}
    ) as client:
        yield client


@pytest.mark.asyncio
async def test_a_newer_search_supersedes(alice: httpx.AsyncClient) -> None:
    older = asyncio.create_task(alice.get("/search", params={"q": "ca"}))
    await anyio.wait_all_tasks_blocked()  # 'ca' waits inside the endpoint
    assert searches.statistics().running == 1
    newer = await alice.get("/search", params={"q": "cat"})
    assert (await older).status_code == 409
    assert (await older).json()["reason"] == "superseded"
    assert newer.status_code == 200


@pytest.mark.asyncio
async def test_the_owner_cancels_an_export(alice: httpx.AsyncClient) -> None:
    started = await alice.post("/exports", params={"table": "users"})
    assert len(operations.operations(owner="alice")) == 1
    stop = await alice.delete(started.headers["location"])
    assert stop.json()["outcome"] == "cancelled"


@pytest.mark.anyio  # anyio's plugin runs this one, side by side, on both backends
async def test_anyio_tests_keep_working() -> None:
    async with (
        running(app),  # in the test's task: no task of its own needed
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app),
            base_url="http://test",
            headers={"x-user": "bob"},
        ) as bob,
    ):
        response = await bob.get("/search", params={"q": "dog"})
    assert response.status_code == 200


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)
