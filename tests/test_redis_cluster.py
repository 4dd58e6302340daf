"""RedisBackend on a Redis Cluster (3 primaries + 3 replicas, real servers on loopback).

The contract tests of ``tests/test_redis.py`` run here again, against the cluster: this
module's ``redis`` fixture stands in for the single server with the cluster primary that serves
the test's prefix (so the tests' raw clients see every key), and the backend finds out by
itself that it talks to a cluster. Tests of single-server faults (restart, pause, kills of one
server) stay there; the cluster's own faults (slot migration, failover) are tested here.
"""

from __future__ import annotations

import inspect
import secrets
import socket
from collections.abc import Callable
from typing import Any

import pytest

from tests import test_redis
from tests.cluster import LocalCluster

pytestmark = pytest.mark.anyio

#: Tests of tests/test_redis.py that need a single server of their own (they stop, pause or
#: reconfigure it) or spawn processes against it; everything else there is the contract.
SINGLE_SERVER_ONLY = {
    "test_redis_restart_mid_run",
    "test_fail_closed_refuses_new_work",
    "test_handover_falls_back_to_local_order_when_redis_is_down",
    "test_unreachable_at_start_is_a_clear_error",
    "test_use_before_start_is_a_clear_error",
    "test_options_are_validated",
    "test_supersede_and_cancel_across_processes",
    "test_race_across_processes",
    "test_example_runs",
    "test_connection_kills_during_a_race_lose_nothing",
}


class ClusterNodeServer:
    """The cluster primary that serves a prefix, looking like ``tests.conftest.RedisServer``."""

    def __init__(self, port: int) -> None:
        self.port = port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def command(self, *args: str) -> bytes | None:
        """Send one command (RESP) and return the first reply line, or None."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                payload = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
                sock.sendall(payload.encode())
                return sock.recv(65536).split(b"\r\n", 1)[0]
        except OSError:
            return None


@pytest.fixture
def prefix() -> str:
    """A prefix with its hash tag spelled out, so the tests' raw key names are the real ones."""
    return "{ck" + secrets.token_hex(4) + "}"


@pytest.fixture
def redis(redis_cluster: LocalCluster, prefix: str) -> ClusterNodeServer:
    """The primary serving the prefix's slot (every key of the test's backends lives there)."""
    return ClusterNodeServer(redis_cluster.primary_for_key(prefix).port)


def _contract_tests() -> dict[str, Callable[..., Any]]:
    found = {}
    for name, function in vars(test_redis).items():
        if not name.startswith("test_") or name in SINGLE_SERVER_ONLY:
            continue
        if "redis" in inspect.signature(function).parameters:
            found[name] = function
    return found


globals().update(_contract_tests())
