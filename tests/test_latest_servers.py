"""Out of order on real servers: the client's sequence number wins, not the arrival order.

Real uvicorn processes on 127.0.0.1 (one worker with the memory backend; two workers on a
real redis-server), real sockets. The newer search is sent first and the test waits until
its body started; the older one is sent second, on another connection (with two workers:
to the other worker). Only the newer completes; the older is answered 409, stale, and never
starts its body. The outcome does not depend on timing: were the older to arrive after the
newer finished, the remembered sequence number would still refuse it.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import FastAPI, Query

from cancelkit import Claim, LatestOnly
from cancelkit.fastapi import install, latest_only
from tests.conftest import RedisServer
from tests.workers import one_client_per_worker

ROOT = Path(__file__).parent.parent


@contextmanager
def uvicorn_workers(workers: int, env: dict[str, str]) -> Iterator[dict[str, httpx.Client]]:
    """Serve tests/latest_app.py with ``workers`` processes; one client per worker."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "uvicorn", "tests.latest_app:app"),
            *("--workers", str(workers), "--host", "127.0.0.1", "--port", str(port)),
            *("--log-level", "warning"),
        ],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    clients: dict[str, httpx.Client] = {}
    try:
        clients = one_client_per_worker(
            f"http://127.0.0.1:{port}",
            lambda client: str(client.get("/started").json()["pid"]),
            workers=workers,
            headers={"x-user": "alice"},
            deadline=time.monotonic() + 90,
        )
        if workers == 1:  # a second connection to the same process
            (only,) = clients.values()
            clients["again"] = httpx.Client(base_url=str(only.base_url), headers=only.headers)
        yield clients
    finally:
        for client in clients.values():
            client.close()
        server.send_signal(signal.SIGINT)
        _, stderr = server.communicate(timeout=30)
    assert b"Traceback" not in stderr, stderr.decode()


def wait_started(client: httpx.Client, q: str) -> None:
    """Wait until the search ``q`` started its body on the worker behind ``client``."""
    deadline = time.monotonic() + 20
    while q not in client.get("/started").json()["started"]:
        assert time.monotonic() < deadline, f"{q!r} never started"
        time.sleep(0.01)  # polls the server's state; the order itself is not timed


def newer_first_then_older(clients: list[httpx.Client]) -> tuple[Any, Any]:
    """Send the newer search, wait until its body runs, then send the older one."""
    first, second = clients
    with ThreadPoolExecutor(1) as pool:
        newer = pool.submit(
            first.get, "/search", params={"q": "cancel"}, headers={"X-Sequence": "6"}
        )
        wait_started(first, "cancel")
        older = second.get("/search", params={"q": "canc"}, headers={"X-Sequence": "4"})
        return newer.result(), older


def check(newer: httpx.Response, older: httpx.Response, clients: list[httpx.Client]) -> None:
    assert newer.status_code == 200, newer.text
    assert newer.json()["q"] == "cancel"
    assert older.status_code == 409
    body = older.json()
    assert body["reason"] == "superseded"
    assert body["detail"].startswith("stale:")
    started = {q for client in clients for q in client.get("/started").json()["started"]}
    assert started == {"cancel"}  # the older search never started its body


def test_one_worker_runs_only_the_newer() -> None:
    """uvicorn, one worker: the newer search arrives first; the older is stale and never runs."""
    with uvicorn_workers(1, {"CANCELKIT_REDIS_URL": ""}) as by_worker:
        clients = list(by_worker.values())
        newer, older = newer_first_then_older(clients)
        check(newer, older, clients)


def test_two_workers_on_redis_run_only_the_newer(redis: RedisServer) -> None:
    """uvicorn --workers 2 on Redis: the older search reaches the other worker and is stale."""
    with uvicorn_workers(2, {"CANCELKIT_REDIS_URL": redis.url}) as by_worker:
        clients = list(by_worker.values())
        newer, older = newer_first_then_older(clients)
        check(newer, older, clients)
        assert str(newer.json()["pid"]) == next(iter(by_worker))  # and the older went to the other


def test_a_malformed_sequence_is_a_422_naming_the_header() -> None:
    """X-Sequence must be decimal digits up to 2**53; anything else is a 422 that names it."""
    with uvicorn_workers(1, {"CANCELKIT_REDIS_URL": ""}) as by_worker:
        (client, _) = by_worker.values()
        for header in ("soon", "-1", "9007199254740993", "1.0", "+5", "5_000", "1e3", "0x10"):
            response = client.get("/search", params={"q": "x"}, headers={"X-Sequence": header})
            assert response.status_code == 422
            assert response.json()["detail"][0]["loc"] == ["header", "X-Sequence"]
        assert client.get("/started").json()["started"] == []


def from_query(n: Annotated[int | str | None, Query()] = None) -> Any:
    """A sequence dependency: the ``n`` query parameter (an int if it is digits)."""
    return int(n) if isinstance(n, str) and n.isdigit() else n


# Module level: FastAPI resolves these (string) annotations in the module's globals.
Ordered = Annotated[
    Claim, latest_only(LatestOnly(), key=lambda request: request.headers["x-run"], seq=from_query)
]
ByHeader = Annotated[Claim, latest_only(LatestOnly(), key=lambda request: "k")]


@pytest.mark.anyio
async def test_the_sequence_may_come_from_any_dependency() -> None:
    """seq=<dependency>: its int orders the claims; a value that is no int in range is a 422."""
    app = FastAPI()
    install(app)

    @app.get("/s")
    async def endpoint(claim: Ordered) -> Any:
        return {"seq": claim.seq}

    transport = httpx.ASGITransport(app=app)
    run = {"x-run": secrets.token_hex(4)}  # a fresh key for each run
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", headers=run
    ) as client:
        assert (await client.get("/s", params={"n": "5"})).json() == {"seq": 5}
        stale = await client.get("/s", params={"n": "5"})  # equal: a number is used once
        assert stale.status_code == 409
        assert stale.json()["detail"].startswith("stale:")
        bad = await client.get("/s", params={"n": "five"})
        assert bad.status_code == 422
        assert "sequence number must be an int" in bad.json()["detail"][0]["msg"]
        assert (await client.get("/s")).json() == {"seq": None}  # none: arrival order
    assert "X-Sequence" not in str(app.openapi()["paths"]["/s"])  # a dependency, no header


def test_the_sequence_header_is_documented() -> None:
    """The default X-Sequence header shows in the OpenAPI schema, optional."""
    app = FastAPI()

    @app.get("/s")
    async def endpoint(claim: ByHeader) -> Any:
        return {}

    (param,) = app.openapi()["paths"]["/s"]["get"]["parameters"]
    assert (param["name"], param["in"], param["required"]) == ("X-Sequence", "header", False)
