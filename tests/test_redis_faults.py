"""Fault suite for RedisBackend: one real redis-server per test, one fault each.

Every test injects its fault while two backends (one ``fail_open=True``, one
``fail_open=False``) carry traffic, then checks the same post-conditions: the backends (the
"application") are alive and connected again; callers saw only documented outcomes (success,
:exc:`OperationCancelled`, :exc:`RedisUnavailable`, :exc:`SlotBusy`); a supersede storm across
the two backends ends with exactly one completed body; every key has a TTL; and what a
cancelled caller may have left on the server blocks its key or id for at most one lease.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import types
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import coredis
import pytest

from cancelkit import (
    CancelKind,
    CancelOutcome,
    CancelReason,
    Claim,
    LatestOnly,
    OperationCancelled,
    OperationExists,
    Policy,
    SlotBusy,
    TokenRegistry,
)
from cancelkit.backends import Admission
from cancelkit.redis import RedisBackend, RedisStatusStore, RedisUnavailable, _slots
from cancelkit.redis._connection import Connection
from cancelkit.redis._listener import Listener
from tests.conftest import RedisServer
from tests.history import Event, History, check, spinners
from tests.test_redis import Worker, keys_of, wait_for

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
LEASE = 1.0
OPTIONS: dict[str, Any] = {
    "heartbeat": 0.2,
    "lease": LEASE,
    "timeout": 0.5,
    "retry_delay": 0.02,
    "poll_interval": 0.02,
}
#: What a caller may see: success or one of these.
DOCUMENTED = (OperationCancelled, RedisUnavailable, SlotBusy)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, on a free port (faults must not leak to others)."""
    executable = shutil.which("redis-server")
    if executable is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed (CI must install the Debian package)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    redis = RedisServer(executable, str(tmp_path))
    redis.start()
    try:
        yield redis
    finally:
        if redis.process is not None:
            redis.process.send_signal(signal.SIGCONT)  # in case a test left it stopped
        redis.stop()


@pytest.fixture
def prefix() -> str:
    return "ckf"


@asynccontextmanager
async def two_backends(
    server: RedisServer, prefix: str, **options: Any
) -> AsyncIterator[list[RedisBackend]]:
    """Backend A fails open, backend B fails closed."""
    options = {**OPTIONS, **options}
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                RedisBackend(server.url, prefix=prefix, fail_open=fail_open, **options)
            )
            for fail_open in (True, False)
        ]


@asynccontextmanager
async def raw(server: RedisServer) -> AsyncIterator[coredis.Redis[str]]:
    async with coredis.Redis.from_url(server.url, decode_responses=True) as client:
        yield client


class Outcomes:
    """Counts what callers saw; anything undocumented propagates and fails the test."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()

    async def run(self, call: Callable[[], Awaitable[object]]) -> None:
        try:
            await call()
        except DOCUMENTED as exc:
            self.seen[type(exc).__name__] += 1
        else:
            self.seen["ok"] += 1


async def traffic(backends: list[RedisBackend], outcomes: Outcomes, tag: str, n: int = 12) -> None:
    """Claims, registrations and cancels from both backends, each bounded by the timeout."""
    slots = [LatestOnly(backend=b) for b in backends]
    registries = [TokenRegistry(backend=b) for b in backends]

    async def claim(i: int) -> None:
        async with slots[i % 2].claim(f"{tag}-k{i % 3}"):
            await anyio.lowlevel.checkpoint()

    async def track(i: int) -> None:
        async with registries[i % 2].track(f"{tag}-op{i}"):
            await anyio.lowlevel.checkpoint()

    async def cancel(i: int) -> None:
        await registries[(i + 1) % 2].cancel(f"{tag}-c{i}")

    with anyio.fail_after(20):  # no hang: every call is bounded by the timeout
        async with anyio.create_task_group() as tg:
            for i in range(n):
                for op in (claim, track, cancel):
                    tg.start_soon(outcomes.run, lambda op=op, i=i: op(i))


def _seen(i: int, *lists: list[int]) -> bool:
    return any(i in seen for seen in lists)


async def storm(backends: list[RedisBackend], key: str = "storm", n: int = 10) -> int:
    """Claims on one key, alternating between the backends; returns the completed bodies."""
    slots = [LatestOnly(backend=b) for b in backends]
    started: list[int] = []
    cancelled: list[int] = []
    completed: list[int] = []
    go = anyio.Event()

    async def body(i: int) -> None:
        while True:
            try:
                async with slots[i % 2].claim(key):
                    started.append(i)
                    await go.wait()
                    completed.append(i)
            except OperationCancelled:
                cancelled.append(i)
            except RedisUnavailable:  # documented for fail-closed B: a slow call (a loaded box)
                if i in started:
                    raise
                await anyio.sleep(0.05)  # not admitted: the claim is made again
                continue
            return

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(body, i)
                await wait_for(functools.partial(_seen, i, started, cancelled))
            await wait_for(lambda: len(cancelled) == n - 1)
            go.set()
    return len(completed)


async def unblocked_within_a_lease(backend: RedisBackend, keys: list[str], ids: list[str]) -> None:
    """A reject-policy claim on each key and a registration of each id get through in time."""
    slot = LatestOnly(policy="reject", backend=backend)
    registry = TokenRegistry(backend=backend)
    with anyio.fail_after(3 * LEASE + 2):  # one lease, a heartbeat, and slack for a busy box
        for key in keys:
            while True:
                try:
                    async with slot.claim(key):
                        break
                except SlotBusy:
                    await anyio.sleep(0.05)
        for id in ids:
            while True:
                try:
                    async with registry.track(id):
                        break
                except OperationExists:  # the id is still held
                    await anyio.sleep(0.05)


async def check_recovered(
    server: RedisServer,
    backends: list[RedisBackend],
    outcomes: Outcomes,
    *,
    keys: list[str] = [],  # noqa: B006 - never mutated
    ids: list[str] = [],  # noqa: B006
) -> None:
    assert set(outcomes.seen) <= {"ok", *(e.__name__ for e in DOCUMENTED)}, outcomes.seen
    await wait_for(lambda: all(b.statistics().connected for b in backends), limit=15)
    await unblocked_within_a_lease(backends[1], keys, ids)
    assert await storm(backends) == 1
    async with raw(server) as client:
        live = await keys_of(client, "ckf")
    assert -1 not in live.values(), live


# -- the faults ---------------------------------------------------------------------------

_BUSY_SCRIPT = """
local t = redis.call('TIME')
local start = tonumber(t[1]) + tonumber(t[2]) / 1e6
while true do
  t = redis.call('TIME')
  if tonumber(t[1]) + tonumber(t[2]) / 1e6 - start > tonumber(ARGV[1]) then return 1 end
end
"""


async def busy_for(server: RedisServer, seconds: float, tg: anyio.abc.TaskGroup) -> None:
    """Another client runs a script for ``seconds`` (in ``tg``): every call answers BUSY
    meanwhile, and unlike a pause no call waits in a socket to run later. Returns once it
    does."""
    server.command("CONFIG", "SET", "busy-reply-threshold", "50")
    tg.start_soon(anyio.to_thread.run_sync, server.command, "EVAL", _BUSY_SCRIPT, "0", str(seconds))
    with anyio.fail_after(10):
        while not (server.command("PING") or b"").startswith(b"-BUSY"):  # noqa: ASYNC110
            await anyio.sleep(0.01)  # another process's state: no event to wait on


async def test_busy_script_from_another_client(server: RedisServer, prefix: str) -> None:
    """BUSY replies (a long script elsewhere): no raw error, no dead task, then recovery."""
    async with two_backends(server, prefix) as backends:
        outcomes = Outcomes()
        async with anyio.create_task_group() as tg:
            await busy_for(server, 1.2, tg)
            await traffic(backends, outcomes, "busy")
        assert outcomes.seen["RedisUnavailable"] >= 1  # fail-closed B saw BUSY as unavailable
        await check_recovered(server, backends, outcomes)


async def test_pause_write_with_an_outer_cancel(server: RedisServer, prefix: str) -> None:
    """Claims and registrations cancelled while their scripts wait on CLIENT PAUSE WRITE
    leave nothing that blocks the key or the id past one lease."""
    async with two_backends(server, prefix) as (a, b):
        outcomes = Outcomes()
        scopes: list[anyio.CancelScope] = []

        async def interrupted(call: Callable[[], Awaitable[None]]) -> None:
            with anyio.CancelScope() as scope:
                scopes.append(scope)
                await outcomes.run(call)

        async def claim() -> None:
            async with LatestOnly(policy="keep_latest", backend=a).claim("paused"):
                await anyio.sleep_forever()

        async def track() -> None:
            async with TokenRegistry(backend=a).track("paused-op"):
                await anyio.sleep_forever()

        assert server.command("CLIENT", "PAUSE", "1500", "WRITE") == b"+OK"
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(interrupted, claim)
                tg.start_soon(interrupted, track)
                await anyio.wait_all_tasks_blocked()  # both scripts are in flight
                for scope in scopes:
                    scope.cancel()
        server.command("CLIENT", "UNPAUSE")
        await check_recovered(server, [a, b], outcomes, keys=["paused"], ids=["paused-op"])


async def test_client_kill_every_20ms_during_a_200_operation_race(
    server: RedisServer, prefix: str
) -> None:
    """Normal and pub/sub connections killed every 20 ms: every operation whose cancel answered
    CANCELLED or PENDING stops, and no cancel of a running operation answers NOT_FOUND."""
    async with two_backends(server, prefix) as backends, raw(server) as client:
        registries = [TokenRegistry(backend=b) for b in backends]
        outcomes = Outcomes()
        ended: list[int] = []
        refused: set[int] = set()  # RedisUnavailable from the fail-closed backend: never ran
        answers: dict[int, str] = {}
        stop = anyio.Event()

        async def killer() -> None:
            while not stop.is_set():
                for kind in (coredis.PureToken.NORMAL, coredis.PureToken.PUBSUB):
                    with suppress(coredis.exceptions.RedisError):
                        await client.client_kill(type_=kind, skipme=True)
                await anyio.sleep(0.02)

        async def operation(i: int, *, task_status: anyio.abc.TaskStatus[None]) -> None:
            try:
                async with registries[i % 2].track(f"race{i}"):
                    task_status.started()
                    await anyio.sleep_forever()
            except OperationCancelled:
                ended.append(i)
            except DOCUMENTED as exc:  # RedisUnavailable from the fail-closed backend
                outcomes.seen[type(exc).__name__] += 1
                refused.add(i)
                ended.append(i)
                task_status.started()

        async def cancel(i: int) -> None:
            try:
                answers[i] = str(await registries[(i + 1) % 2].cancel(f"race{i}"))
            except RedisUnavailable:  # documented; then the operation is stopped here
                answers[i] = "unavailable"
                outcomes.seen["RedisUnavailable"] += 1
                for scope in scopes.pop(i, ()):
                    scope.cancel()

        scopes: dict[int, list[anyio.CancelScope]] = {}

        async def guarded(i: int, *, task_status: anyio.abc.TaskStatus[None]) -> None:
            with anyio.CancelScope() as scope:
                scopes[i] = [scope]
                await operation(i, task_status=task_status)
            if scope.cancelled_caught:
                ended.append(i)

        with anyio.fail_after(100):  # no hang (a loaded box registers 200 slowly under kills)
            async with anyio.create_task_group() as tg:
                tg.start_soon(killer)
                for i in range(200):
                    await tg.start(guarded, i)
                    tg.start_soon(cancel, i)
                with suppress(TimeoutError):
                    await wait_for(lambda: len(ended) == 200, limit=30)
                stuck = {f"race{i}": answers.get(i) for i in range(200) if i not in ended}
                statistics = [b.statistics() for b in backends]
                stop.set()
                if stuck:  # end them, so that the failure below says which
                    tg.cancel_scope.cancel()
        assert not stuck, f"never stopped (id: its cancel's answer): {stuck}; {statistics}"
        not_found = {
            f"race{i}" for i, a in answers.items() if a == "not_found" and i not in refused
        }
        assert not not_found, ("a cancel of a running operation answered NOT_FOUND", not_found)
        await check_recovered(server, backends, outcomes)


async def test_sigstop_sigcont(server: RedisServer, prefix: str) -> None:
    """A frozen server: calls time out (never hang), then everything recovers."""
    assert server.process is not None
    async with two_backends(server, prefix) as backends:
        outcomes = Outcomes()
        server.process.send_signal(signal.SIGSTOP)
        try:
            await traffic(backends, outcomes, "stopped")
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert outcomes.seen["RedisUnavailable"] >= 1
        await check_recovered(server, backends, outcomes)


async def test_sigkill_and_restart_on_the_same_port(server: RedisServer, prefix: str) -> None:
    """A crashed server (data lost) restarted on the same port: entries are re-asserted."""
    assert server.process is not None
    async with two_backends(server, prefix) as backends:
        outcomes = Outcomes()
        registry = TokenRegistry(backend=backends[0])
        async with anyio.create_task_group() as tg:
            started = anyio.Event()

            async def survivor() -> None:
                async with registry.track("survivor"):
                    started.set()
                    await anyio.sleep_forever()

            tg.start_soon(outcomes.run, survivor)
            await started.wait()
            server.process.kill()
            server.process.wait(10)
            server.process = None
            await traffic(backends, outcomes, "killed")
            server.start()
            await wait_for(lambda: all(b.statistics().connected for b in backends), limit=15)
            other = TokenRegistry(backend=backends[1])
            assert await other.cancel("survivor") is CancelOutcome.CANCELLED  # re-asserted
        assert outcomes.seen["OperationCancelled"] >= 1
        await check_recovered(server, backends, outcomes)


async def test_out_of_memory(server: RedisServer, prefix: str) -> None:
    """OOM (maxmemory with noeviction) refuses writes: unavailable, never raw, then recovery."""
    async with two_backends(server, prefix) as backends:
        outcomes = Outcomes()
        server.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
        server.command("CONFIG", "SET", "maxmemory", "1")
        try:
            await traffic(backends, outcomes, "oom")
        finally:
            server.command("CONFIG", "SET", "maxmemory", "0")
        assert outcomes.seen["RedisUnavailable"] >= 1
        await check_recovered(server, backends, outcomes)


async def test_readonly_replica(server: RedisServer, prefix: str) -> None:
    """The server turned into a replica answers READONLY: unavailable, then recovery."""
    async with two_backends(server, prefix) as backends:
        outcomes = Outcomes()
        server.command("REPLICAOF", "127.0.0.1", "1")  # a primary that never answers
        try:
            await traffic(backends, outcomes, "readonly")
        finally:
            server.command("REPLICAOF", "NO", "ONE")
        assert outcomes.seen["RedisUnavailable"] >= 1
        await check_recovered(server, backends, outcomes)


async def test_script_flush_mid_run(server: RedisServer, prefix: str) -> None:
    """SCRIPT FLUSH mid-run: scripts are loaded again; nobody notices."""
    async with two_backends(server, prefix, timeout=5) as backends:  # no load-induced timeouts
        outcomes = Outcomes()
        await traffic(backends, outcomes, "before")
        server.command("SCRIPT", "FLUSH")
        await traffic(backends, outcomes, "after")
        assert set(outcomes.seen) <= {"ok", "OperationCancelled", "SlotBusy"}, outcomes.seen
        await check_recovered(server, backends, outcomes)


# -- a partitioned link -------------------------------------------------------------------


class Gate:
    """Open or closed; bytes that meet a closed gate wait (as in a network partition)."""

    def __init__(self) -> None:
        self._open = anyio.Event()
        self._open.set()

    def open(self) -> None:
        self._open.set()

    def close(self) -> None:
        if self._open.is_set():
            self._open = anyio.Event()

    async def wait(self) -> None:
        while not self._open.is_set():
            await self._open.wait()


class Link:
    """A TCP proxy between one backend and the server whose two directions can be cut.

    ``requests`` carries client to server, ``replies`` server to client; a cut holds the
    bytes (the connections stay open); :meth:`sever` closes every connection made so far
    (what was held is lost) and opens both gates.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.requests = Gate()
        self.replies = Gate()
        self._scopes: set[anyio.CancelScope] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener:
            task_status.started()
            await listener.serve(self._connection)

    def sever(self) -> None:
        for scope in self._scopes:
            scope.cancel()
        self.requests.open()
        self.replies.open()

    async def _connection(self, client: anyio.abc.SocketStream) -> None:
        async with client:
            with anyio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    async with (
                        await anyio.connect_tcp("127.0.0.1", self.target) as server,
                        anyio.create_task_group() as tg,
                    ):
                        tg.start_soon(self._pipe, client, server, self.requests, tg.cancel_scope)
                        tg.start_soon(self._pipe, server, client, self.replies, tg.cancel_scope)
                finally:
                    self._scopes.discard(scope)

    @staticmethod
    async def _pipe(
        source: anyio.abc.SocketStream,
        sink: anyio.abc.SocketStream,
        gate: Gate,
        both: anyio.CancelScope,
    ) -> None:
        with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            async for chunk in source:
                await gate.wait()
                await sink.send(chunk)
        both.cancel()  # one side closed: close the other


async def test_a_cancel_taken_by_a_resync_whose_reply_is_lost_survives_the_lease(
    server: RedisServer, prefix: str
) -> None:
    """A fail-open worker's resync takes a tombstone (cancel answered PENDING) but its reply
    is lost, and the registration's lease lapses before the next resync: the operation
    still stops once the worker is back (the reason outlives the lease, as the tombstone
    would have)."""
    link = Link(server.port)
    registration, tombstone = f"{prefix}:r:-:op", f"{prefix}:t:-:op"
    async with anyio.create_task_group() as tg:
        await tg.start(link.serve)
        async with (
            RedisBackend(link.url, prefix=prefix, fail_open=True, **OPTIONS) as a,
            RedisBackend(server.url, prefix=prefix, fail_open=False, **OPTIONS) as b,
            raw(server) as client,
        ):
            running, stopped = anyio.Event(), anyio.Event()
            reasons: list[CancelKind] = []

            async def operation() -> None:
                try:
                    async with TokenRegistry(backend=a).track("op"):
                        running.set()
                        await anyio.sleep_forever()
                except OperationCancelled as exc:
                    reasons.append(exc.reason.kind)
                    stopped.set()

            tg.start_soon(operation)
            await running.wait()
            await wait_for(lambda: a.statistics().registrations == 1)

            async def exists(key: str) -> bool:
                return bool(await client.exists([key]))

            async def until(predicate: Callable[[], Awaitable[bool]]) -> None:
                with anyio.fail_after(15):  # the server's state: no event to wait on
                    while not await predicate():  # noqa: ASYNC110
                        await anyio.sleep(0.01)

            await until(lambda: exists(registration))
            link.requests.close()  # A is cut off: its calls time out, its lease lapses
            link.replies.close()
            await until(lambda: _not(exists(registration)))
            assert await TokenRegistry(backend=b).cancel("op") is CancelOutcome.PENDING
            link.requests.open()  # A's resync runs on the server; its reply is held

            async def taken() -> bool:  # A's resync recorded the cancel on its registration
                return await client.hget(registration, "c") is not None

            await until(taken)
            assert await exists(tombstone)  # kept: a start of "op" before it ends is refused
            link.requests.close()  # cut off again until the lease lapses once more
            await until(lambda: _not(exists(registration)))
            assert not stopped.is_set()  # A never heard of the cancel
            link.sever()  # back, with fresh connections
            with anyio.fail_after(15):  # A resyncs within a heartbeat or two; or never (the bug)
                await stopped.wait()
            assert reasons == [CancelKind.REQUESTED]
        tg.cancel_scope.cancel()


async def test_a_retried_unregister_still_reports_the_cancel(
    server: RedisServer, prefix: str
) -> None:
    """An exit's UNREGISTER ran on the server but its reply was lost (the connection was
    killed in between), so the call is retried: the retry must report the cancel that won, as
    the first attempt did. (It answered "no cancel": the exit of an operation whose cancel
    answered CANCELLED, and whose message had not arrived yet, reported success; the history
    checker found it in the two-process race with two CPU spinners.)"""
    async with two_backends(server, prefix) as (a, b):
        registrations = a._registrations
        assert await registrations.register("op", None, "h", lambda _: None) is None
        assert await TokenRegistry(backend=b).cancel("op") is CancelOutcome.CANCELLED
        call = registrations._unregister_call(registrations._by_holder["h"])
        first = await a._conn.run(*call)  # its reply lost: the call runs again
        assert first
        assert await a._conn.run(*call) == first


async def test_a_retried_release_still_reports_the_supersede(
    server: RedisServer, prefix: str
) -> None:
    """A claim's RELEASE ran on the server but its reply was lost, so the call is retried:
    the retry must report the supersede the first attempt saw. (It answered "none": a body
    that returned as another worker's newer claim of the key was admitted, its message not
    yet arrived, left its claim as a success.)"""
    async with two_backends(server, prefix) as (a, b):
        replace = Policy.named("replace")
        for backend, holder in ((a, "h1"), (b, "h2")):
            acquired = await backend.acquire(
                "k", holder, lambda _: None, policy=replace, limit=1, seq=None
            )
            assert acquired.admission is Admission.RUNNING
        call = a._slots._release_call("k", "h1")
        first = await a._conn.run(*call)  # its reply lost: the call runs again
        assert str(first[0]).startswith("s ")
        assert (await a._conn.run(*call))[0] == first[0]
        reason = await a.release("k", "h1")  # the backend's own call: a third run
        assert reason is not None
        assert (reason.kind, reason.source) == (CancelKind.SUPERSEDED, "h2")


async def _not(value: Awaitable[bool]) -> bool:
    return not await value


# -- two processes ------------------------------------------------------------------------


async def expect_any(worker: Worker, *starts: str, limit: float = 30) -> str:
    """The first line (already read or next) that starts with one of ``starts``."""
    with anyio.fail_after(limit):
        while True:
            for line in worker.lines:
                if line.startswith(starts):
                    worker.lines.remove(line)
                    return line
            await worker.read()


@asynccontextmanager
async def job_process(
    server: RedisServer,
    prefix: str,
    backend: str,
    *,
    fail_open: bool = False,
    call_timeout: float = 2,
) -> AsyncIterator[Worker]:
    """A tests/redis_worker.py process (its backend fails closed unless ``fail_open``)."""
    command = [sys.executable, "-m", "tests.redis_worker", server.url, prefix, backend]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CANCELKIT_FAIL_OPEN": str(int(fail_open)),
        "CANCELKIT_TIMEOUT": str(call_timeout),
    }
    async with await anyio.open_process(command, env=env, stderr=subprocess.DEVNULL) as process:
        worker = Worker(process)
        try:
            await worker.expect("ready", limit=30)  # a loaded box starts Python slowly
            yield worker
        finally:
            if process.returncode is None:
                process.kill()
            with anyio.CancelScope(shield=True):
                await process.wait()


async def kill_connections(client: coredis.Redis[str], stop: anyio.Event) -> None:
    """Kill every normal and pub/sub connection but this one, every 20-50 ms, until ``stop``."""
    pauses = (0.02, 0.035, 0.05)
    i = 0
    while not stop.is_set():
        for kind in (coredis.PureToken.NORMAL, coredis.PureToken.PUBSUB):
            with suppress(coredis.exceptions.RedisError):
                await client.client_kill(type_=kind, skipme=True)
        await anyio.sleep(pauses[i % 3])
        i += 1


#: (fail_open of the worker processes, CPU spinners running beside the race)
RACES = [
    pytest.param(False, 0, id="closed"),
    pytest.param(True, 0, id="open"),
    pytest.param(False, 2, id="closed-starved"),
    pytest.param(True, 2, id="open-starved"),
]


@pytest.mark.parametrize(("fail_open", "spin"), RACES)
async def test_two_process_cancel_race_with_connection_kills(
    server: RedisServer, prefix: str, anyio_backend: str, fail_open: bool, spin: int
) -> None:
    """Another process runs 102 jobs; each is cancelled from here (before it registers, just
    after, or around its commit point) while connections are killed every 20-50 ms: no answer
    contradicts what the job did (tests/history.py checks the whole history: nothing
    completes or commits after CANCELLED or PENDING, COMMITTED only for a job that committed,
    no NOT_FOUND while it runs)."""
    n = 102
    history = History()
    with spinners(spin):
        async with (
            job_process(server, prefix, anyio_backend, fail_open=fail_open) as other,
            two_backends(server, prefix, timeout=2) as backends,
            raw(server) as client,
        ):
            registry = TokenRegistry(backend=backends[0])
            answers: dict[str, str] = {}
            stop = anyio.Event()

            async def cancel(id: str, delay: float = 0) -> None:
                await anyio.sleep(delay)  # lands before, around or after the commit point
                start = time.monotonic()
                try:
                    answers[id] = str(await registry.cancel(id))
                except RedisUnavailable:  # documented: then the job may run to its end
                    answers[id] = "unavailable"
                history.add(Event("test", time.monotonic(), "cancel", id, answers[id], start=start))

            ends: dict[str, str] = {}
            with anyio.fail_after(90):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(kill_connections, client, stop)
                    for i in range(n):
                        id = f"job{i}"
                        if i % 3 == 0:  # cancel first, register a moment later
                            await cancel(id)
                            await other.send(f"job {id} 40")
                            continue
                        await other.send(f"job {id} 60 20" if i % 3 == 2 else f"job {id} 40")
                        started = await expect_any(other, f"tracking {id}", f"failed {id}")
                        if started.startswith("failed"):
                            ends[id] = "failed"  # refused: Redis unavailable for the worker
                        tg.start_soon(cancel, id, (i * 7 % 40) / 1000 if i % 3 == 2 else 0)
                    await wait_for(lambda: len(answers) == n, limit=30)
                    while len(ends) < n:  # every job ends: cancelled, completed or failed
                        line = await other.expect("", limit=30)
                        kind, id, *_ = line.split()
                        if kind in ("cancelled", "completed", "failed"):
                            ends[id] = kind
                    stop.set()
            await check_recovered(server, backends, Outcomes())
    for line in other.timed:
        history.line("w1", line)
    print(history.summary())  # shown with -s, or when the test fails
    anomalies = check(history)
    assert anomalies == [], "\n".join([*anomalies, history.around(anomalies[0])])
    obeyed = [id for id, answer in answers.items() if answer in ("cancelled", "pending")]
    assert obeyed, answers


async def pump(worker: Worker) -> None:
    """Read the worker's lines as they come (until cancelled)."""
    while True:
        await worker.read()


def answered(worker: Worker, tags: list[str]) -> bool:
    """Whether every claim in ``tags`` was admitted, or refused (cancelled or failed) first."""
    seen = {
        line.split()[1] for line in worker.lines if line.startswith(("claimed", "cancel", "fail"))
    }
    return seen.issuperset(tags)


async def recovered(worker: Worker) -> None:
    """Wait until the worker is connected and ran two resyncs since (so it saw Redis's view).

    The worker's lines are read by :func:`pump` meanwhile.
    """
    first: int | None = None
    with anyio.fail_after(30):
        while True:
            await worker.send("stats")
            await wait_for(lambda: any(x.startswith("stats") for x in worker.lines))
            line = next(x for x in worker.lines if x.startswith("stats"))
            worker.lines.remove(line)
            _, connected, resyncs = line.split()
            if connected == "1":
                first = int(resyncs) if first is None else first
                if int(resyncs) >= first + 2:
                    return
            await anyio.sleep(0.05)  # another process's state: no event to wait on


async def read_owners(
    client: coredis.Redis[str], prefix: str, workers: list[Worker], history: History
) -> None:
    """Record the claims that Redis names running on key ``hot`` (by their tags)."""
    tags = {}  # claim id -> tag
    for worker in workers:
        for line in worker.lines:
            if line.startswith("claimed"):
                _, tag, claim_id, _ = line.split()
                tags[claim_id] = tag
    start = time.monotonic()
    state = await client.hgetall(f"{prefix}:k:hot")  # "WORKER HOLDER" -> r(unning)/w(aiting)
    running = [tags.get(field.split()[1], field) for field, st in state.items() if st == "r"]
    history.add(Event("test", time.monotonic(), "owners", "", " ".join(running), start, "hot"))


@pytest.mark.parametrize(("fail_open", "spin"), RACES)
async def test_two_process_hot_key_claim_race_with_connection_kills(
    server: RedisServer, prefix: str, anyio_backend: str, fail_open: bool, spin: int
) -> None:
    """Two worker processes claim one key 160 times in turn while connections are killed
    every 20-50 ms; then the kills stop and both resync. The history checker finds no worker
    running two bodies of the key at once, and at the end the newest admitted claim runs,
    is the owner Redis names, and no older claim runs beside it (no lost newest claim, no
    ghost owner)."""
    n = 160
    history = History()
    tags = [f"c{i}" for i in range(n)]
    with spinners(spin):
        async with (
            job_process(server, prefix, anyio_backend, fail_open=fail_open, call_timeout=0.1) as w1,
            job_process(server, prefix, anyio_backend, fail_open=fail_open, call_timeout=0.1) as w2,
            raw(server) as client,
        ):
            workers = [w1, w2]
            stop = anyio.Event()
            with anyio.fail_after(90):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(pump, w1)
                    tg.start_soon(pump, w2)
                    async with anyio.create_task_group() as race:
                        race.start_soon(kill_connections, client, stop)
                        for i, tag in enumerate(tags):
                            await workers[i % 2].send(f"claim hot {tag}")
                            await anyio.sleep(0.005)
                        await wait_for(lambda: answered(w1, tags[::2]), 30)
                        await wait_for(lambda: answered(w2, tags[1::2]), 30)
                        stop.set()
                    for worker in workers:
                        await recovered(worker)
                    await read_owners(client, prefix, workers, history)
                    tg.cancel_scope.cancel()
    for name, worker in (("w1", w1), ("w2", w2)):
        for line in worker.timed:
            history.line(name, line, keys=dict.fromkeys(tags, "hot"))
    print(history.summary())  # shown with -s, or when the test fails
    anomalies = check(history)
    assert anomalies == [], "\n".join([*anomalies, history.around(anomalies[0])])


# -- the newest claim survives an outage, and N means N in one worker ---------------------------


async def test_the_newest_claim_survives_an_outage_and_never_runs_beside_the_older(
    server: RedisServer, prefix: str
) -> None:
    """fail_open=True. Claim c1 runs (Redis admitted it); Redis stops answering; c2 for the
    same key is admitted on local state. c1 must stop then (one body per key in this worker:
    it used to run on beside c2, the local state knew nothing of c1), and once Redis answers
    again c2, the newest, is the key's running claim (the resync used to re-assert c2 behind
    c1 and supersede the newest: the user's last keystroke never answered)."""
    async with RedisBackend(server.url, prefix=prefix, **OPTIONS) as backend:
        slot = LatestOnly(backend=backend)
        ended: dict[str, str] = {}
        started = {name: anyio.Event() for name in ("c1", "c2")}
        generations: dict[str, int] = {}

        async def claim(name: str) -> None:
            try:
                async with slot.claim("k") as held:
                    generations[name] = held.generation
                    started[name].set()
                    await anyio.sleep_forever()
            except OperationCancelled as exc:
                ended[name] = exc.reason.kind.value

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(claim, "c1")
                await started["c1"].wait()
                server.command("CLIENT", "PAUSE", "1500", "ALL")  # Redis stops answering
                tg.start_soon(claim, "c2")
                await started["c2"].wait()  # admitted on local state
                await wait_for(lambda: "c1" in ended, 10)  # one body of the key, not two
                assert ended == {"c1": "superseded"}
                await wait_for(lambda: backend.statistics().connected, 20)
                resyncs = backend._listener.resyncs
                await wait_for(lambda: backend._listener.resyncs >= resyncs + 2, 20)
                assert await backend.is_current("k", generations["c2"])
                assert "c2" not in ended  # the newest runs on
                tg.cancel_scope.cancel()


async def test_a_claim_starts_only_after_its_workers_superseded_claims_of_the_key_stop(
    server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker A's claim c0 was superseded by B's c1, but the message to A is still in flight
    when A claims the key again (c2): c2's ACQUIRE tells A of c0's supersede, so c0 is
    cancelled before c2's body starts (one body per key in a worker). It used to start
    beside c0 until the message came (the history checker saw it in the hot-key race)."""
    monkeypatch.setattr(Listener, "on_line", lambda self, line: None)  # messages in flight
    async with two_backends(server, prefix) as (a, b):
        claims: dict[str, Claim] = {}
        running = {name: anyio.Event() for name in ("c0", "c1")}
        beside: list[bool] = []

        async def hold(slot: LatestOnly, name: str) -> None:
            with suppress(OperationCancelled):
                async with slot.claim("k") as claim:
                    claims[name] = claim
                    running[name].set()
                    await anyio.sleep_forever()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(hold, LatestOnly(backend=a), "c0")
                await running["c0"].wait()
                tg.start_soon(hold, LatestOnly(backend=b), "c1")
                await running["c1"].wait()
                assert not claims["c0"].token.cancelled  # A has not heard
                async with LatestOnly(backend=a).claim("k"):
                    beside.append(not claims["c0"].token.cancelled)
                tg.cancel_scope.cancel()
        assert beside == [False]


async def test_a_retried_acquire_still_supersedes_the_workers_older_claim(
    server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim's ACQUIRE ran on the server but its reply was lost, so the call ran again: the
    retry must still tell this worker that its older claim of the key was superseded (only
    the reply carries that line: no message is published to the worker itself), so that the
    older body stops before the new one starts. The retry answered "running" alone."""
    run = Connection.run

    async def lost_reply(self: Connection, script: str, *args: Any, **kwargs: Any) -> Any:
        if script == "ACQUIRE":
            await run(self, script, *args, **kwargs)  # ran; its reply was lost
        return await run(self, script, *args, **kwargs)

    monkeypatch.setattr(Listener, "on_line", lambda self, line: None)  # no resync's help
    monkeypatch.setattr(Connection, "run", lost_reply)
    async with RedisBackend(server.url, prefix=prefix, **OPTIONS) as backend:
        slot = LatestOnly(backend=backend)
        beside: list[bool] = []

        async def older(*, task_status: anyio.abc.TaskStatus[Claim]) -> None:
            with suppress(OperationCancelled):
                async with slot.claim("k") as claim:
                    task_status.started(claim)
                    await anyio.sleep_forever()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                first = await tg.start(older)
                async with slot.claim("k"):
                    beside.append(not first.token.cancelled)
                tg.cancel_scope.cancel()
        assert beside == [False]


@pytest.mark.parametrize("kind", ["backend", "store"])
async def test_entering_and_leaving_under_connection_kills_never_fails_while_the_server_is_up(
    server: RedisServer, prefix: str, kind: str
) -> None:
    """500 starts and stops of a backend, or of a RedisStatusStore (10 at a time), while
    normal and pub/sub connections are killed every 5-15 ms: no start fails (a killed first
    ping or subscribe is retried within ``timeout``, as any call) and no stop raises anything
    (a backend's raised a raw exception group of coredis.ConnectionError on trio in 9 of 480
    exits, and its start failed 22 times in 180; a store's start, 26 in 100 on asyncio).

    ``timeout`` 5: on a loaded machine (the lowest-versions run) an attempt takes up to 0.5 s
    and over half of them are killed; the store once needed 18 attempts over 1.6 s, and one
    start in 1,500 ran out of a 2 s bound."""
    entries: list[BaseException] = []
    exits: list[BaseException] = []
    cycled = [0]
    done = anyio.Event()

    async def kill() -> None:
        kinds = ("normal", "pubsub")
        i = 0
        while not done.is_set():
            i += 1
            await anyio.to_thread.run_sync(server.command, "CLIENT", "KILL", "TYPE", kinds[i % 2])
            await anyio.sleep(0.005 + 0.001 * (i % 11))

    async def cycles(n: int) -> None:
        for _ in range(n):
            entered: RedisBackend | RedisStatusStore = (
                RedisBackend(server.url, prefix=prefix, **{**OPTIONS, "timeout": 5})
                if kind == "backend"
                else RedisStatusStore(server.url, prefix=prefix, timeout=5)
            )
            try:
                await entered.__aenter__()
            except Exception as exc:
                entries.append(exc)
                continue
            await anyio.lowlevel.checkpoint()
            try:
                await entered.__aexit__(None, None, None)
            except Exception as exc:
                exits.append(exc)
            cycled[0] += 1

    with anyio.fail_after(180):
        async with anyio.create_task_group() as killer:
            killer.start_soon(kill)
            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(cycles, 50)
            done.set()
    assert (len(entries), len(exits), cycled[0]) == (0, 0, 500), (entries[:3], exits[:3])


async def test_a_claim_whose_lease_ran_out_stops_before_the_workers_next_claim_starts(
    server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fail_open=False. A worker's claim c1 runs; its lease runs out without a refresh (here
    the heartbeat is held; in the hot-key race, an outage longer than the lease) and Redis
    forgets it; the same worker's next claim c2 of the key is admitted. c1 lost its place: it
    is stopped before c2's body starts. It ran on beside c2 until the worker's next resync
    (the history checker saw two bodies of one key in one worker, 2 of ~88 starved runs)."""

    async def held(self: Listener) -> None:
        await anyio.sleep_forever()

    async def first_runs(start_first: Callable[[], Awaitable[None]]) -> None:
        await start_first()
        await anyio.sleep(0.6)  # past c1's lease: the next script on the key prunes it

    monkeypatch.setattr(Listener, "beat", held)  # no refresh: c1's lease runs out
    options = {**OPTIONS, "heartbeat": 0.1, "lease": 0.3, "fail_open": False}
    async with RedisBackend(server.url, prefix=prefix, **options) as backend:
        await the_first_claim_stops_before_the_next_starts(backend, first_runs)


async def test_a_claim_made_while_redis_was_unreachable_stops_before_a_newer_one_starts(
    server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fail_open=True. Redis is paused (SIGSTOP): claim c1's ACQUIRE times out and c1 runs on
    the worker's own state, unknown to Redis. Redis resumes and admits c2 of the same key
    before the worker's resync re-asserts c1 (held here; in the hot-key race the next claim's
    reply came first). c1 stops before c2's body starts: it ran on beside c2 until the
    resync (the history checker saw two bodies of one key in one worker: CI, trio, starved)."""
    process = server.process
    assert process is not None

    async def first_runs(start_first: Callable[[], Awaitable[None]]) -> None:
        process.send_signal(signal.SIGSTOP)
        try:
            await start_first()  # once its ACQUIRE timed out: on local state
        finally:
            process.send_signal(signal.SIGCONT)
        assert not backend.statistics().connected  # marked down, nothing resynced since

    options = {**OPTIONS, "heartbeat": 0.1, "lease": 0.4, "timeout": 0.3, "fail_open": True}
    async with RedisBackend(server.url, prefix=prefix, **options) as backend:
        monkeypatch.setattr(Listener, "resync", _held)  # started: no resync from here on
        await the_first_claim_stops_before_the_next_starts(backend, first_runs)


async def the_first_claim_stops_before_the_next_starts(
    backend: RedisBackend, first_runs: Callable[[Callable[[], Awaitable[None]]], Awaitable[None]]
) -> None:
    """Claim c1 of a key runs (``first_runs`` starts it and sets the scene), then c2 of the
    key: c1 lost its place and is stopped before c2's body starts; c2 is the current one."""
    slot = LatestOnly(backend=backend)
    first: list[Claim] = []
    running, second_started = anyio.Event(), anyio.Event()
    when_second_started: list[bool] = []
    ended: list[CancelReason] = []

    async def c1() -> None:
        try:
            async with slot.claim("k") as claim:
                first.append(claim)
                running.set()
                await anyio.sleep_forever()
        except OperationCancelled as exc:
            ended.append(exc.reason)

    async def c2() -> None:
        async with slot.claim("k") as claim:
            when_second_started.append(first[0].token.cancelled)
            second_started.set()
            assert await backend.is_current("k", claim.generation)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:

            async def start_first() -> None:
                tg.start_soon(c1)
                await running.wait()

            await first_runs(start_first)
            tg.start_soon(c2)
            await second_started.wait()
    assert when_second_started == [True]  # stopped before c2's body began
    (reason,) = ended
    assert reason.kind is CancelKind.SUPERSEDED
    assert "lost its place" in reason.message


async def test_a_start_abandoned_in_an_outage_never_cancels_the_live_run_after_a_restart(
    server: RedisServer, prefix: str
) -> None:
    """Worker A runs operation "X"; Redis restarts without persistence (A's registration is
    lost; A's resync re-asserts it). Meanwhile worker B (fail_open=False) was asked to start
    "X" too: its REGISTER failed, and it queued the UNREGISTER of a registration it never
    made. Redis is back and B's cleaner runs first: that UNREGISTER must leave no
    finished-marker, which A's resync reads as "another run of the id ended" and cancels
    its live run (review3: an exit whose registration was gone wrote one)."""
    slow = {**OPTIONS, "heartbeat": 1.0, "lease": 5.0, "retry_delay": 2.0}  # A resyncs later
    async with (
        RedisBackend(server.url, prefix=prefix, fail_open=True, **slow) as a,
        RedisBackend(server.url, prefix=prefix, fail_open=False, **OPTIONS) as b,
    ):
        running = anyio.Event()
        ended: list[str] = []

        async def body() -> None:
            try:
                async with TokenRegistry(backend=a).track("X"):
                    running.set()
                    await anyio.sleep(4)
                ended.append("completed")
            except OperationCancelled as exc:
                ended.append(f"{exc.reason.kind.value}: {exc.reason.message}")

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(body)
                await running.wait()
                server.stop()  # its data is lost with it
                with pytest.raises(RedisUnavailable):
                    async with TokenRegistry(backend=b).track("X"):
                        pytest.fail("B started X while Redis was down")
                server.start()
                await wait_for(
                    lambda: a.statistics().connected and b.statistics().connected, limit=15
                )
    assert ended == ["completed"], ended


_FAST = {**OPTIONS, "heartbeat": 0.1, "lease": 10.0, "timeout": 0.3, "fail_open": True}


async def set_up_unstarved(
    scenario: Callable[[str], Awaitable[Bodies | None]], prefix: str
) -> Bodies:
    """Run ``scenario`` (each time under a fresh prefix) until its set-up held, 3 times at most.

    A scenario answers ``None`` when a call of its set-up, made before the fault it injects,
    timed out: on a starved machine (load 14 on 2 cores) a 0.3 s timeout can pass, and that
    run had an outage the test did not make, so it did not test what it says.
    """
    for attempt in range(3):
        bodies = await scenario(f"{prefix}{attempt}")
        if bodies is not None:
            return bodies
    pytest.fail("the set-up's calls timed out in 3 runs: the machine is starved past the test")


class Bodies:
    """The bodies of key "k" that run in one worker: each from its start to its token's
    cancel (a stopped body is interrupted at its next checkpoint) or its exit."""

    def __init__(self, slot: LatestOnly) -> None:
        self.slot = slot
        self.running: set[str] = set()
        self.most = 0
        self.started: list[str] = []
        self.stopped: dict[str, str] = {}
        self.events: dict[str, anyio.Event] = {}

    def began(self, name: str) -> anyio.Event:
        """Set once ``name``'s body has started."""
        return self.events.setdefault(name, anyio.Event())

    async def run(self, name: str, until: Callable[[], Awaitable[object]]) -> None:
        """Claim "k" and run until ``until()`` returns, or the claim is stopped."""
        try:
            async with self.slot.claim("k") as claim:
                self.running.add(name)
                self.most = max(self.most, len(self.running))
                self.started.append(name)
                claim.token.on_cancel(lambda _: self.running.discard(name))
                self.began(name).set()
                try:
                    await until()
                finally:
                    self.running.discard(name)
        except OperationCancelled as exc:
            self.stopped[name] = exc.reason.message

    def __repr__(self) -> str:
        return f"<Bodies started={self.started} stopped={self.stopped}>"


@pytest.mark.parametrize("policy", ["enqueue", "keep_latest"])
async def test_a_claim_waiting_in_redis_and_one_made_in_an_outage_never_run_together(
    server: RedisServer, prefix: str, policy: Literal["enqueue", "keep_latest"]
) -> None:
    """max_concurrency=1, fail_open=True. c0 runs, cw waits in Redis's queue; Redis is
    paused (SIGSTOP). cl is made on the worker's own state and waits behind c0 there (the
    fallback knows c0, which runs, not cw). c0 ends while Redis is still paused: the fallback
    gives cl its turn, and cw, its TURN failing, is first of the worker's claims of the key.
    Both ran (review3): now whichever starts second makes room, and one body runs."""
    process = server.process
    assert process is not None
    options = {**OPTIONS, "heartbeat": 0.1, "lease": 5.0, "timeout": 0.3, "fail_open": True}
    async with RedisBackend(server.url, prefix=prefix, **options) as backend:
        bodies = Bodies(LatestOnly(backend=backend, policy=policy))
        end0 = anyio.Event()
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(bodies.run, "c0", end0.wait)
                await bodies.began("c0").wait()
                tg.start_soon(bodies.run, "cw", functools.partial(anyio.sleep, 1.5))
                await wait_for(lambda: bodies.slot.statistics().waiting == 1)
                await anyio.sleep(0.3)  # its ACQUIRE answered: it waits in Redis's queue
                process.send_signal(signal.SIGSTOP)
                try:
                    tg.start_soon(bodies.run, "cl", functools.partial(anyio.sleep, 1.5))
                    await anyio.sleep(1.0)  # cl's ACQUIRE timed out: it waits in the fallback
                    assert bodies.started == ["c0"]
                    end0.set()  # c0 ends while Redis is still paused
                    await anyio.sleep(1.0)
                finally:
                    process.send_signal(signal.SIGCONT)
    assert bodies.most == 1, bodies
    assert bodies.started[0] == "c0", bodies
    assert len(bodies.started) >= 2, bodies  # then cw or cl (or both, one after the other)


@pytest.mark.parametrize(("policy", "resync"), [("enqueue", "held"), ("keep_latest", "free")])
async def test_a_claim_queued_on_local_state_waits_for_the_claim_redis_admitted(
    server: RedisServer,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    policy: Literal["enqueue", "keep_latest"],
    resync: str,
) -> None:
    """max_concurrency=1, fail_open=True. Redis is paused: cl1 runs on the worker's own state
    and cl2 waits behind it there. Redis resumes and admits c3 (before the worker's resync
    when it is held): cl1 stops, and its release gives cl2 the fallback's turn, which knows
    nothing of c3. cl2's body started beside c3's (review3); now cl2 lost its place. (A
    lease nothing outlasts: with the resync held, Redis would forget c3 itself.)"""
    process = server.process
    assert process is not None

    options = {**OPTIONS, "heartbeat": 0.1, "lease": 10.0, "timeout": 0.3, "fail_open": True}
    async with RedisBackend(server.url, prefix=prefix, **options) as backend:
        if resync == "held":
            monkeypatch.setattr(Listener, "resync", _held)
        bodies = Bodies(LatestOnly(backend=backend, policy=policy))
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                process.send_signal(signal.SIGSTOP)
                try:
                    tg.start_soon(bodies.run, "cl1", functools.partial(anyio.sleep, 1.0))
                    await bodies.began("cl1").wait()  # its ACQUIRE timed out: local state
                    tg.start_soon(bodies.run, "cl2", functools.partial(anyio.sleep, 1.0))
                    await anyio.sleep(0.6)  # its ACQUIRE timed out: it waits on local state
                finally:
                    process.send_signal(signal.SIGCONT)
                tg.start_soon(bodies.run, "c3", functools.partial(anyio.sleep, 1.0))
    assert bodies.most == 1, bodies
    assert "c3" in bodies.started, bodies
    assert "c3" not in bodies.stopped, bodies


async def test_a_claim_made_in_an_outage_is_never_ordered_by_the_servers_clock(
    server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """replace, fail_open=True, this worker's clock 1 s ahead of the Redis server's (nothing
    asks hosts to agree). c1 runs on local state during a pause, its generation from the
    worker's clock; c2, the newest, is then admitted by Redis with a generation from the
    server's clock, lower. Making room by generation stopped c2 for c1 (review3): a claim
    Redis never knew now loses its place to one it admitted, clocks never compared."""
    process = server.process
    assert process is not None
    ahead = types.SimpleNamespace(time_ns=lambda: time.time_ns() + 1_000_000_000)
    monkeypatch.setattr(_slots, "time", ahead)

    options = {**OPTIONS, "heartbeat": 0.1, "lease": 0.4, "timeout": 0.3, "fail_open": True}
    async with RedisBackend(server.url, prefix=prefix, **options) as backend:
        monkeypatch.setattr(Listener, "resync", _held)
        bodies = Bodies(LatestOnly(backend=backend, policy="replace"))
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                process.send_signal(signal.SIGSTOP)
                try:
                    tg.start_soon(bodies.run, "c1", anyio.sleep_forever)
                    await bodies.began("c1").wait()  # on local state
                finally:
                    process.send_signal(signal.SIGCONT)
                await bodies.run("c2", anyio.lowlevel.checkpoint)  # admitted by Redis
                tg.cancel_scope.cancel()
    assert bodies.started == ["c1", "c2"], bodies
    assert "lost its place" in bodies.stopped["c1"], bodies
    assert "c2" not in bodies.stopped, bodies


async def test_a_claim_redis_still_holds_keeps_its_place_over_one_it_never_knew(
    server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """enqueue, max_concurrency=2, fail_open=True, a lease nothing outlasts. c1 runs, admitted
    by Redis; Redis answers BUSY for 1.2 s (another client's long script: unlike a pause, no
    call waits in a socket to run later): c2 runs beside c1 on local state. Redis is back
    and admits c3 beside c1. Making room stopped c1, the oldest (review3), though Redis held
    it all along: now c2, the claim Redis never knew, stops. (No resync: one that ran before
    c3's call would tell Redis of c2, and c3 would rightly wait; seen under load.)"""

    async def scenario(prefix: str) -> Bodies | None:
        async with RedisBackend(server.url, prefix=prefix, **_FAST) as backend:
            monkeypatch.setattr(Listener, "resync", _held)  # started: no resync from here on
            bodies = Bodies(LatestOnly(backend=backend, policy="enqueue", max_concurrency=2))
            three = functools.partial(anyio.sleep, 3)
            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(bodies.run, "c1", three)
                    await bodies.began("c1").wait()
                    if backend.statistics().failures:  # c1's own call timed out
                        tg.cancel_scope.cancel()
                        return None
                    async with anyio.create_task_group() as outage:
                        await busy_for(server, 1.2, outage)
                        tg.start_soon(bodies.run, "c2", three)
                        await bodies.began("c2").wait()  # on local state, beside c1
                    tg.start_soon(bodies.run, "c3", three)
        return bodies

    bodies = await set_up_unstarved(scenario, prefix)
    assert bodies.most == 2, bodies
    assert set(bodies.stopped) == {"c2"}, bodies
    assert "lost its place" in bodies.stopped["c2"], bodies


async def _held(self: Listener, *, force: bool = False) -> None:
    await anyio.sleep_forever()


@pytest.mark.parametrize("outage", [False, True])
async def test_handover_waits_for_the_cleanup_of_a_local_claim_it_stopped(
    server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch, outage: bool
) -> None:
    """replace, max_concurrency=1, handover_timeout=5 (bodies, cleanup included, never
    overlap), fail_open=True, resync held. c1 runs; c2 of the key is admitted by Redis.

    Without an outage (control), c2's handover wait lasts until c1's body and its cleanup
    ended: Redis keeps c1 as superseded, and TURN counts it ahead of c2.

    With an outage (Redis answers BUSY while c1 is claimed), c1 runs on the worker's own
    state, unknown to Redis. Making room cancels c1's token, and c2's TURN answers at once
    (Redis knows only c2): c2's body started while c1's cleanup still ran (review4). Now a
    handover also waits for the claims stopped to make room."""
    async with RedisBackend(server.url, prefix=prefix, **_FAST) as backend:
        monkeypatch.setattr(Listener, "resync", _held)
        slot = LatestOnly(backend=backend, policy="replace", handover_timeout=5)
        log: list[str] = []
        began = anyio.Event()

        async def c1() -> None:
            try:
                async with slot.claim("k"):
                    log.append("c1 start")
                    began.set()
                    try:
                        await anyio.sleep_forever()
                    finally:
                        with anyio.CancelScope(shield=True):
                            await anyio.sleep(0.5)  # the body's cleanup
                        log.append("c1 end")
            except OperationCancelled:
                pass

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                if outage:
                    async with anyio.create_task_group() as busy:
                        await busy_for(server, 1.2, busy)
                        tg.start_soon(c1)
                        await began.wait()  # on local state
                else:
                    tg.start_soon(c1)
                    await began.wait()
                async with slot.claim("k"):
                    log.append("c2 start")
        stats = slot.statistics()
    assert log == ["c1 start", "c1 end", "c2 start"], log
    assert (stats.running, stats.waiting) == (0, 0), stats


async def test_a_committed_claim_keeps_its_place_and_the_claim_over_the_limit_loses_it(
    server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """enqueue, max_concurrency=1, fail_open=True, resync held. c1 runs on the worker's own
    state (Redis answers BUSY) and passes its commit point (the fallback decides it). Redis is
    back and admits c2 (it never knew c1). Making room "stopped" c1, but a committed token
    ignores the cancel: both bodies ran (review4). Now a committed claim keeps its place and
    c2, the one over the limit, loses it."""
    async with RedisBackend(server.url, prefix=prefix, **_FAST) as backend:
        monkeypatch.setattr(Listener, "resync", _held)
        bodies = Bodies(LatestOnly(backend=backend, policy="enqueue"))
        committed = anyio.Event()

        async def c1() -> None:  # Bodies.run, with a commit
            async with bodies.slot.claim("k") as claim:
                bodies.running.add("c1")
                bodies.started.append("c1")
                claim.token.on_cancel(lambda _: bodies.running.discard("c1"))
                try:
                    await claim.commit()
                    committed.set()
                    await anyio.sleep(1.5)
                finally:
                    bodies.running.discard("c1")

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                async with anyio.create_task_group() as busy:
                    await busy_for(server, 1.2, busy)
                    tg.start_soon(c1)
                    await committed.wait()  # on local state, committed there
                tg.start_soon(bodies.run, "c2", functools.partial(anyio.sleep, 0.2))
        stats = bodies.slot.statistics()
    assert bodies.started == ["c1"], bodies
    assert "lost its place" in bodies.stopped["c2"], bodies
    assert (stats.running, stats.waiting) == (0, 0), stats


async def test_a_running_claim_is_never_stopped_for_one_that_waited_behind_it(
    server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """enqueue, max_concurrency=1, fail_open=True. The worker asks for x, then y; x's ACQUIRE
    travels on a slower pool connection and reaches Redis after y's (the pool runs calls on
    several connections; nothing orders them). Redis admits y and queues x behind it.

    Redis answers BUSY: x's TURN fails, and the ``Down`` path of ``wait_turn`` lets x run
    because x is *first in the worker's dict* (the order of the calls, not Redis's). Making
    room then stopped y, which Redis admitted and still held (review4). Now a queued claim
    starts during an outage only with room in the worker, first of its queued claims."""
    run = Connection.run
    calls: list[str] = []
    answered: dict[str, anyio.Event] = {}  # "x", "y": each run's own

    async def slow_first_acquire(self: Connection, script: str, *args: Any, **kw: Any) -> Any:
        if script != "ACQUIRE":
            return await run(self, script, *args, **kw)
        calls.append(script)
        first = len(calls) == 1
        if first:
            await answered["y"].wait()  # a slower connection: x's call reaches Redis after y's
        try:
            return await run(self, script, *args, **kw)
        finally:  # answered, or timed out (then the scenario runs again)
            answered["x" if first else "y"].set()

    async def scenario(prefix: str) -> Bodies | None:
        calls.clear()
        answered.update(x=anyio.Event(), y=anyio.Event())
        async with RedisBackend(server.url, prefix=prefix, **_FAST) as backend:
            monkeypatch.setattr(Connection, "run", slow_first_acquire)
            bodies = Bodies(LatestOnly(backend=backend, policy="enqueue"))
            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(bodies.run, "x", functools.partial(anyio.sleep, 0.5))
                    await wait_for(lambda: len(calls) == 1)  # x's call is under way
                    tg.start_soon(bodies.run, "y", functools.partial(anyio.sleep, 2.5))
                    await bodies.began("y").wait()
                    await answered["x"].wait()  # x waits in Redis's queue, behind y
                    if backend.statistics().failures:  # x's or y's call timed out
                        tg.cancel_scope.cancel()
                        return None
                    await anyio.sleep(0.2)
                    async with anyio.create_task_group() as busy:
                        await busy_for(server, 1.2, busy)
        return bodies

    bodies = await set_up_unstarved(scenario, prefix)
    stats = bodies.slot.statistics()
    assert "y" not in bodies.stopped, bodies
    assert bodies.started == ["y", "x"], bodies
    assert (stats.running, stats.waiting) == (0, 0), stats


@pytest.mark.parametrize(
    ("policy", "limit"), [("enqueue", 1), ("keep_latest", 1), ("enqueue", 2), ("replace", 2)]
)
async def test_the_resync_after_an_outage_keeps_the_policy_of_the_claims_it_reasserts(
    server: RedisServer,
    prefix: str,
    policy: Literal["enqueue", "keep_latest", "replace"],
    limit: int,
) -> None:
    """fail_open=True, a key Redis holds nothing of. Redis answers BUSY: the worker makes c1
    and c2 on its own state; with max_concurrency=1, c2 waits behind c1 there (enqueue,
    keep_latest), with 2 both run. Redis is back and the resync re-asserts both.

    The resync read the key's limit and policy from its state in Redis, which had none (the
    ACQUIREs never ran): as 1 and not superseding, so c2 ended superseded by the older c1
    (review4): a waiting claim under enqueue/keep_latest never ran, and the newest of two
    under max_concurrency=2 stopped. Now the worker tells Redis the claims' settings, and a
    claim that waits in its worker waits in Redis's queue again."""
    async with RedisBackend(server.url, prefix=prefix, **_FAST) as backend:
        bodies = Bodies(LatestOnly(backend=backend, policy=policy, max_concurrency=limit))
        slot = bodies.slot
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg, anyio.create_task_group() as busy:
                await busy_for(server, 1.2, busy)
                tg.start_soon(bodies.run, "c1", functools.partial(anyio.sleep, 1.5))
                await bodies.began("c1").wait()
                tg.start_soon(bodies.run, "c2", functools.partial(anyio.sleep, 1.5))
                if limit == 1:
                    await wait_for(lambda: slot.statistics().waiting == 1)
                else:
                    await bodies.began("c2").wait()
        stats = slot.statistics()
    assert "c2" not in bodies.stopped, bodies
    assert "c2" in bodies.started, bodies
    assert (stats.running, stats.waiting) == (0, 0), stats


@pytest.mark.parametrize(
    ("policy", "limit", "extra"),
    [
        ("replace", 1, "plain"),
        ("enqueue", 2, "handover"),
        ("keep_latest", 1, "debounce"),
        ("reject", 2, "plain"),
    ],
)
async def test_no_claim_loses_its_place_without_an_outage_when_replies_come_out_of_order(
    server: RedisServer,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    policy: Literal["enqueue", "keep_latest", "replace", "reject"],
    limit: int,
    extra: str,
) -> None:
    """No outage: 3 waves of 16 claims of one key at once, each ACQUIRE, TURN and RELEASE
    delayed 0-40 ms before it is sent and after its reply, so Redis's order and the order the
    worker reads the replies in differ. Redis's view is the worker's, so nothing may be stopped
    for "lost its place", no more than ``limit`` bodies run, and the statistics end at zero
    (review4; a seeded shuffle per case)."""
    rng = random.Random(f"{policy}{limit}{extra}")
    run = Connection.run
    delayed = ("ACQUIRE", "TURN", "RELEASE")

    async def shuffled(self: Connection, script: str, *args: Any, **kw: Any) -> Any:
        if script in delayed:
            await anyio.sleep(rng.uniform(0, 0.04))
        result = await run(self, script, *args, **kw)
        if script in delayed:
            await anyio.sleep(rng.uniform(0, 0.04))
        return result

    options = {**OPTIONS, "heartbeat": 0.1, "lease": 10.0, "fail_open": True}
    more: dict[str, Any] = {
        "plain": {},
        "handover": {"handover_timeout": 5.0},
        "debounce": {"debounce": 0.02},
    }[extra]
    async with RedisBackend(server.url, prefix=prefix, **options) as backend:
        monkeypatch.setattr(Connection, "run", shuffled)
        bodies = Bodies(LatestOnly(backend=backend, policy=policy, max_concurrency=limit, **more))

        async def one(i: int) -> None:
            with suppress(SlotBusy):  # reject: a full key refuses
                await bodies.run(f"c{i}", functools.partial(anyio.sleep, rng.uniform(0, 0.1)))

        with anyio.fail_after(60):
            for _ in range(3):
                async with anyio.create_task_group() as tg:
                    for i in range(16):
                        tg.start_soon(one, i)
        stats = bodies.slot.statistics()
    lost = {name: why for name, why in bodies.stopped.items() if "lost its place" in why}
    assert not lost, bodies
    assert bodies.most <= limit, bodies
    assert (stats.running, stats.waiting) == (0, 0), stats


async def test_a_claim_whose_late_acquire_left_it_waiting_in_redis_stops_at_the_resync(
    server: RedisServer, prefix: str
) -> None:
    """enqueue, max_concurrency=1, two workers. Redis is paused (SIGSTOP): worker B's ACQUIRE
    of z is sent first (B waits long), then worker A's of x (fail_open=True, short timeout):
    x's call times out and x runs on A's own state. Redis resumes and runs the queued calls in
    order: z runs, and x's late ACQUIRE finds the key busy and queues x. A's resync must stop
    x, which Redis has waiting behind z: two bodies of a key across workers last only until
    that resync (review4: they lasted until z ended)."""
    process = server.process
    assert process is not None
    a_opts = {**OPTIONS, "heartbeat": 0.1, "lease": 10.0, "timeout": 0.3, "fail_open": True}
    b_opts = {**OPTIONS, "heartbeat": 0.1, "lease": 10.0, "timeout": 5.0, "fail_open": False}
    async with (
        RedisBackend(server.url, prefix=prefix, **a_opts) as a,
        RedisBackend(server.url, prefix=prefix, **b_opts) as b,
    ):
        slot_a = LatestOnly(backend=a, policy="enqueue")
        slot_b = LatestOnly(backend=b, policy="enqueue")
        log: list[str] = []

        async def x() -> None:
            try:
                async with slot_a.claim("k"):
                    log.append("x start")
                    await anyio.sleep(10)
                log.append("x end")
            except OperationCancelled:
                log.append("x stopped")

        async def z() -> None:
            async with slot_b.claim("k"):
                log.append("z start")
                await anyio.sleep(10)
            log.append("z end")

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                process.send_signal(signal.SIGSTOP)
                try:
                    tg.start_soon(z)
                    await anyio.sleep(0.1)  # z's call is in Redis's socket
                    tg.start_soon(x)
                    await wait_for(lambda: "x start" in log)  # x timed out: on A's state
                finally:
                    process.send_signal(signal.SIGCONT)
                await wait_for(lambda: "x stopped" in log or "x end" in log, limit=20)
                tg.cancel_scope.cancel()
    # x never ran to its end beside z (had x's ACQUIRE reached Redis first, z waited for x).
    assert "x end" not in log or "z start" not in log[: log.index("x end")], log


@pytest.mark.parametrize("first", ["cancel", "exit"])
async def test_an_operation_whose_registration_was_lost_gets_answers_that_agree(
    server: RedisServer, prefix: str, first: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its registration is gone from Redis while the body runs (a failover lost the write, or
    its lease lapsed), then a cancel and the body's exit race. Cancel first: it writes a
    tombstone and answers PENDING, and the exit must not report success (it did: the cluster
    primary-kill race on the history checker; now the exit reads the tombstone). Exit first:
    it reports success, and the cancel answers PENDING, true then: nothing of the id runs,
    and a start before the tombstone expires never runs its body. (NOT_FOUND would need a
    finished-marker, which a worker's resync reads as "another run ended": it cancelled a
    live run whose registration a restart lost, after a failed duplicate start elsewhere.)"""
    async with (
        two_backends(server, prefix) as (a, b),
        raw(server) as client,
    ):
        monkeypatch.setattr(Listener, "resync", _held)  # none re-registers it before the cancel
        running, finish = anyio.Event(), anyio.Event()
        ended: list[str] = []

        async def body() -> None:
            try:
                async with TokenRegistry(backend=a).track("lost"):
                    running.set()
                    await finish.wait()
                ended.append("completed")
            except OperationCancelled as exc:
                ended.append(exc.reason.kind.value)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(body)
                await running.wait()
                registration = [k for k in await keys_of(client, prefix) if ":r:" in k]
                assert len(registration) == 1, registration
                await client.delete(registration)  # the server lost it
                if first == "cancel":
                    outcome = await TokenRegistry(backend=b).cancel("lost")
                    assert outcome is CancelOutcome.PENDING  # a tombstone: nobody runs "lost"
                finish.set()  # the body ends before any resync tells it
        if first == "cancel":
            assert ended == ["requested"]
        else:
            assert ended == ["completed"]
            assert await TokenRegistry(backend=b).cancel("lost") is CancelOutcome.PENDING
            with pytest.raises(OperationCancelled):
                async with TokenRegistry(backend=a).track("lost"):
                    pytest.fail("a start of a tombstoned id ran its body")


# -- entering and leaving under an outer cancellation (review 7a) ------------------------------


@asynccontextmanager
async def silent_server() -> AsyncIterator[tuple[str, anyio.Event]]:
    """A TCP server that accepts connections and never answers; the event: one arrived."""
    arrived = anyio.Event()

    async def hold(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            arrived.set()
            await anyio.sleep_forever()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, hold)
        try:
            yield f"redis://127.0.0.1:{port}/0", arrived
        finally:
            tg.cancel_scope.cancel()


@pytest.mark.parametrize("kind", ["backend", "store"])
async def test_an_outer_cancellation_while_entering_stays_a_cancellation(kind: str) -> None:
    """The scope around ``async with`` is cancelled while the first attempt waits for a server
    that never answers: the cancellation must reach that scope, not become RedisUnavailable.

    The connect and handshake are shielded (``_Pool.get_connection``); their timeout is turned
    into RedisUnavailable by ``abandon()`` and raised by ``start()`` past ``give_up`` without a
    checkpoint, so the pending cancellation is swallowed."""
    async with silent_server() as (url, arrived):
        entered = (
            RedisBackend(url, timeout=0.5)
            if kind == "backend"
            else RedisStatusStore(url, timeout=0.5)
        )
        with anyio.fail_after(10):
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:

                    async def enter() -> None:
                        async with entered:
                            pass  # pragma: no cover

                    tg.start_soon(enter)
                    await arrived.wait()
                    scope.cancel()
    assert scope.cancelled_caught


async def test_leaving_a_backend_under_an_outer_cancellation_raises_nothing_raw(
    redis: RedisServer,
) -> None:
    """A running backend left because its scope was cancelled: ``close_quietly`` lets the
    closing pub/sub's ClosedResourceError escape, in a group with the Cancelled (not an
    ``Exception``, so not caught); the scope strips its Cancelled and the caller gets a raw
    ``ExceptionGroup[ClosedResourceError]`` (trio: 10 exits in 40; asyncio: none seen)."""
    raised: list[BaseException] = []
    for _ in range(20):
        try:
            with anyio.fail_after(10), anyio.CancelScope() as scope:
                async with RedisBackend(redis.url, prefix="rev7a", timeout=0.5):
                    scope.cancel()
                    await anyio.sleep_forever()
        except BaseException as exc:
            raised.append(exc)
    assert raised == []
