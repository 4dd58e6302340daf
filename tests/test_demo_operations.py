"""The demo's background export: start (202 + Location), progress, Stop; one and two workers.

In process through the app's real lifespan (asyncio and trio); across two real uvicorn
workers on a real redis-server. An export that must still be running when the test acts
takes minutes unless stopped; one that must complete is given no work time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from demo.app import WORDS, create_app
from tests.workers import one_client_per_worker

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


@asynccontextmanager
async def serving(work_seconds: float) -> AsyncIterator[tuple[FastAPI, Any]]:
    app = create_app(work_seconds=work_seconds)

    def client(user: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://demo", headers={"X-User": user}
        )

    async with app.router.lifespan_context(app):
        yield app, client


async def test_export_runs_in_the_background_and_reports_progress_to_the_end() -> None:
    """POST /exports → 202 + Location; the status ends completed, every word exported."""
    async with serving(work_seconds=0) as (_, client), client("tab-1") as tab:
        started = await tab.post("/exports")
        assert started.status_code == 202
        location = started.headers["location"]
        assert location == f"/exports/{started.json()['id']}"  # a path: any worker serves it
        status = (await tab.get(location, params={"wait": 10})).json()
        assert status["state"] == "completed"
        assert status["result"] == {"words": len(WORDS)}
        assert status["progress"]["done"] == status["progress"]["total"] == len(WORDS)


async def test_stop_export_cancels_it_by_id_and_only_for_its_tab() -> None:
    """Another tab cannot see or stop the export; its own tab's Stop ends it as requested."""
    async with (
        serving(work_seconds=600) as (_, client),
        client("tab-1") as tab,
        client("tab-2") as other,
    ):
        location = (await tab.post("/exports")).headers["location"]
        assert (await tab.get(location)).json()["state"] == "running"
        assert (await other.get(location)).status_code == 404
        assert (await other.delete(location)).status_code == 404
        stop = await tab.delete(location)
        assert (stop.status_code, stop.json()["outcome"]) == (202, "cancelled")
        status = (await tab.get(location, params={"wait": 10})).json()
        assert status["state"] == "cancelled"
        assert status["reason"]["kind"] == "requested"


async def test_a_tab_runs_at_most_two_exports() -> None:
    """The third running export of one tab is refused with 503; another tab may start."""
    async with (
        serving(work_seconds=600) as (_, client),
        client("tab-1") as tab,
        client("tab-2") as other,
    ):
        assert (await tab.post("/exports")).status_code == 202
        assert (await tab.post("/exports")).status_code == 202
        third = await tab.post("/exports")
        assert (third.status_code, third.json()["reason"]) == (503, "full")
        assert (await other.post("/exports")).status_code == 202


def test_two_workers_on_redis_start_on_one_and_stop_on_the_other(redis: Any) -> None:
    """``python -m demo --redis URL --workers 2``: an export started on one worker shows its
    progress on the other and stops from there."""
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "demo", "--port", "0", "--workers", "2"),
            *("--redis", redis.url, "--work-seconds", "600"),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    clients: dict[str, httpx.Client] = {}
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip().removeprefix("cancelkit demo: open ")

        def worker_of(client: httpx.Client) -> str:
            return str(client.get("/about").json()["worker"])

        clients = one_client_per_worker(
            url, worker_of, workers=2, headers={"X-User": "tab-1"}, deadline=time.monotonic() + 120
        )
        first, second = clients.values()
        started = first.post("/exports")
        assert started.status_code == 202
        location = started.headers["location"]
        status = second.get(location).json()
        assert status["state"] == "running"
        stop = second.delete(location)
        assert (stop.status_code, stop.json()["outcome"]) == (202, "cancelled")
        final = second.get(location, params={"wait": 20}).json()
        assert final["state"] == "cancelled"
        assert final["reason"]["kind"] == "requested"
    finally:
        for client in clients.values():
            client.close()
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=30)
    assert server.returncode == 0
