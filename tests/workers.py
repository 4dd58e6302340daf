"""Helpers for tests that drive several real uvicorn worker processes over HTTP."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx


def one_client_per_worker(
    base_url: str,
    worker_of: Callable[[httpx.Client], str],
    *,
    workers: int,
    headers: dict[str, str],
    deadline: float,
) -> dict[str, httpx.Client]:
    """Open keep-alive connections until each of ``workers`` processes has one.

    The kernel spreads new connections over the processes that share the listening socket;
    ``worker_of`` asks the server which worker answered. Connections that land on a worker
    already covered are closed. Fails once ``deadline`` (``time.monotonic()``) has passed.
    """
    clients: dict[str, httpx.Client] = {}
    while len(clients) < workers:
        assert time.monotonic() < deadline, f"did not reach {workers} distinct workers"
        client = httpx.Client(base_url=base_url, headers=headers, timeout=20)
        try:
            worker = worker_of(client)
        except httpx.TransportError:
            client.close()
            time.sleep(0.05)  # the workers are still starting
            continue
        if worker in clients:
            client.close()
        else:
            clients[worker] = client
    return clients


def wait_for_key(redis: Any, key: str, deadline: float) -> None:
    """Wait until ``key`` exists on the test's redis-server: the work reached the backend."""
    while redis.command("EXISTS", key) != b":1":
        assert time.monotonic() < deadline, f"{key} never appeared"
        time.sleep(0.01)
