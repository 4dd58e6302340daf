"""Testing the tutorial's app with pytest-asyncio, next to anyio's plugin.

Run: python -m pytest docs/examples/testing_pytest_asyncio.py
(configuration: `asyncio_mode = "strict"` in pyproject.toml; see the testing page)
"""

import asyncio

import anyio
import httpx
import pytest
import pytest_asyncio
from fastapi_latest import app, searches


@pytest_asyncio.fixture
async def alice():
    transport = httpx.ASGITransport(app)  # the app runs in the test's loop
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", headers={"x-user": "alice"}
    ) as client:
        yield client


@pytest.mark.asyncio
async def test_a_newer_search_supersedes_the_older_one(alice: httpx.AsyncClient):
    older = asyncio.create_task(alice.get("/search", params={"q": "ca"}))
    await anyio.wait_all_tasks_blocked()  # 'ca' waits inside the endpoint
    assert searches.statistics().running == 1
    newer = await alice.get("/search", params={"q": "cat"})
    assert (await older).status_code == 409
    assert (await older).json()["reason"] == "superseded"
    assert newer.status_code == 200


@pytest.mark.anyio  # anyio's plugin runs this one, side by side
async def test_anyio_tests_keep_working():
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app),
        base_url="http://test",
        headers={"x-user": "bob"},
    ) as bob:
        response = await bob.get("/search", params={"q": "dog"})
    assert response.status_code == 200


@pytest.fixture
def anyio_backend():
    return "asyncio"
