from __future__ import annotations

import faulthandler
import os
import socket
import subprocess
import sys
import time
from collections.abc import Generator, Iterator

import pytest
from hypothesis import HealthCheck, settings

import cancelkit
from cancelkit import CancelEvent
from tests.cluster import LocalCluster
from tests.postgres import postgres_server as postgres_server
from tests.programs import program, unavailable

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.register_profile(
    "ci",
    parent=settings.get_profile("default"),
    derandomize=True,
    print_blob=True,
)
settings.load_profile("ci" if os.environ.get("CI") == "true" else "default")


# pytest-timeout interrupts a test that runs too long, but a test whose tasks cannot end (a
# shielded wait that nothing sets, a runner that waits for such a task) survives the interrupt and
# would hang the whole run. The backstop: past its timeout plus this grace, the process prints
# every thread's stack and exits, so the session fails in bounded time and says where.
_BACKSTOP_GRACE = 120.0


_STDERR = pytest.StashKey[int]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_STDERR] = os.dup(sys.stderr.fileno())  # the terminal's, not the capture's


def pytest_unconfigure(config: pytest.Config) -> None:
    os.close(config.stash[_STDERR])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    marker = item.get_closest_marker("timeout")
    limit = float(marker.args[0] if marker and marker.args else item.config.getini("timeout"))
    faulthandler.dump_traceback_later(
        limit + _BACKSTOP_GRACE, exit=True, file=item.config.stash[_STDERR]
    )
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async test of the core runs on asyncio and on trio."""
    return str(request.param)


class RedisServer:
    """A real redis-server on 127.0.0.1, on a free port, that tests can stop and restart."""

    def __init__(self, executable: str, directory: str) -> None:
        self.executable = executable
        self.directory = directory
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.process is None
        self.process = subprocess.Popen(
            [
                self.executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.directory,
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.command("PING") == b"+PONG":
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def command(self, *args: str) -> bytes | None:
        """Send one command (inline RESP) and return the first reply line, or None."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                payload = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
                sock.sendall(payload.encode())
                return sock.recv(65536).split(b"\r\n", 1)[0]
        except OSError:
            return None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server for the session; skipped without one, except in CI where that fails."""
    executable = program("CANCELKIT_REDIS_SERVER", "redis-server")
    if executable is None:
        unavailable(
            "redis-server is not installed: apt-get install redis-server, or name it with "
            "CANCELKIT_REDIS_SERVER (`python -m nox` installs it when run as root)"
        )
    server = RedisServer(executable, str(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisServer:
    """The session's redis-server, running (restarted if a test stopped it)."""
    if redis_server.process is None:
        redis_server.start()
    return redis_server


@pytest.fixture(scope="session")
def redis_cluster_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A Redis Cluster (3 primaries + 3 replicas) for the session; skipped like ``redis_server``."""
    executable = program("CANCELKIT_REDIS_SERVER", "redis-server")
    if executable is None:
        unavailable(
            "redis-server is not installed: apt-get install redis-server, or name it with "
            "CANCELKIT_REDIS_SERVER (`python -m nox` installs it when run as root)"
        )
    cluster = LocalCluster(executable, tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster(redis_cluster_session: LocalCluster) -> LocalCluster:
    """The session's cluster, healthy (nodes a test killed are restarted first)."""
    if not redis_cluster_session.healthy():
        redis_cluster_session.heal()
    return redis_cluster_session


@pytest.fixture
def deaf(monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis workers in this test hear no message (pub/sub, inbox, resync): every delivery
    from another worker stays in flight, as when it is slow to arrive."""
    from cancelkit.redis._listener import Listener

    monkeypatch.setattr(Listener, "on_line", lambda self, line: None)


@pytest.fixture
def events() -> Iterator[list[CancelEvent]]:
    """Every event of cancelkit's seam while the test runs (tests/test_events.py and others)."""
    seen: list[CancelEvent] = []
    remove = cancelkit.add_listener(seen.append)
    yield seen
    remove()
    remove()  # a second removal does nothing
