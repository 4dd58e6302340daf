"""Background operations across workers: a real redis-server, real processes.

The start/status/cancel/owner/limit/retention behaviour shared with the memory store is
tested in test_operations.py (parametrized over both); this module holds what only a shared
store has: several workers, a killed worker, key TTLs.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from fastapi import FastAPI, Response

from cancelkit import (
    BackgroundOperations,
    CancelKind,
    CancelOutcome,
    OperationState,
    OperationStatus,
    Progress,
    RegistryFull,
    TokenRegistry,
)
from cancelkit.backends import StatusStore
from cancelkit.fastapi import OperationStarter, install, operation_starter, operations_router
from cancelkit.redis import RedisBackend, RedisStatusStore, RedisUnavailable
from cancelkit.testing import StatusStoreContract, Stores
from tests.test_redis import keys_of, raw
from tests.workers import one_client_per_worker

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).parent.parent


@asynccontextmanager
async def worker(url: str, prefix: str, **options: Any) -> AsyncIterator[BackgroundOperations]:
    """One worker's BackgroundOperations on Redis (several may run in one test process)."""
    backend = RedisBackend(url, prefix=prefix, heartbeat=0.5, lease=5)
    store = RedisStatusStore(url, prefix=prefix, heartbeat=0.5, lease=6)  # backend's + 2 beats
    registry = TokenRegistry(backend=backend)
    async with backend, BackgroundOperations(registry=registry, store=store, **options) as ops:
        yield ops


class TestRedisStatusStoreContract(StatusStoreContract):
    """cancelkit.testing's status-store contract: two stores (two workers) on one prefix (and
    on the cluster: test_redis_cluster.py runs this class again with its own ``redis``)."""

    @pytest.fixture
    def stores(self, redis: Any) -> Stores:
        @asynccontextmanager
        async def two() -> AsyncIterator[Sequence[StatusStore]]:
            prefix = f"t{secrets.token_hex(6)}"
            async with (
                RedisStatusStore(redis.url, prefix=prefix, heartbeat=0.5, lease=6) as a,
                RedisStatusStore(redis.url, prefix=prefix, heartbeat=0.5, lease=6) as b,
            ):
                yield [a, b]

        return two


async def wait_while_running(ops: BackgroundOperations, id: str, owner: str | None) -> Any:
    """Poll the shared store until the status stops saying running (bounded by the caller)."""
    while True:
        status = await ops.status(id, owner=owner)
        if status is None or status.state is not OperationState.RUNNING:
            return status
        await anyio.sleep(0.05)  # another process must act: nothing to wait on here


async def test_another_worker_reads_and_cancels_the_operation(redis: Any) -> None:
    """Started on worker A: worker B sees it running (on A), cancels it, sees it cancelled."""
    prefix = f"t{secrets.token_hex(6)}"
    started = anyio.Event()

    async def export() -> None:
        await a.report(5, 10)
        started.set()
        await anyio.sleep_forever()

    async with worker(redis.url, prefix) as a, worker(redis.url, prefix) as b:
        id = await a.start(export, owner="alice")
        await started.wait()
        seen = await b.status(id, owner="alice")
        assert seen is not None
        assert seen.state is OperationState.RUNNING
        assert seen.worker == a.store.worker
        assert seen.progress is not None
        assert seen.progress.done == 5
        assert await b.status(id, owner="bob") is None
        assert await b.cancel(id, owner="bob") is CancelOutcome.NOT_FOUND
        assert await b.cancel(id, owner="alice") is CancelOutcome.CANCELLED
        with anyio.fail_after(30):
            final = await b.wait(id, owner="alice")  # polls the store: it runs on A
        assert final is not None
        assert final.state is OperationState.CANCELLED
        assert final.reason is not None
        assert final.reason.kind is CancelKind.REQUESTED
        assert await b.cancel(id, owner="alice") is CancelOutcome.NOT_FOUND


async def test_a_cancel_on_one_worker_before_the_start_on_another(redis: Any) -> None:
    """B cancels an id nobody started yet (PENDING); A's start of it then never runs it."""
    prefix = f"t{secrets.token_hex(6)}"
    ran: list[str] = []

    async def export() -> None:
        ran.append("ran")

    async with worker(redis.url, prefix) as a, worker(redis.url, prefix) as b:
        assert await b.cancel("exp-1", owner="alice") is CancelOutcome.PENDING
        assert await a.start(export, id="exp-1", owner="alice") == "exp-1"
        status = await b.status("exp-1", owner="alice")
        assert status is not None
        assert status.state is OperationState.CANCELLED
    assert ran == []


async def test_limits_are_per_worker(redis: Any) -> None:
    """max_running_per_owner counts this worker's operations; another worker has its own."""
    prefix = f"t{secrets.token_hex(6)}"
    async with (
        worker(redis.url, prefix, max_running_per_owner=1, grace=0) as a,
        worker(redis.url, prefix, max_running_per_owner=1, grace=0) as b,
    ):
        await a.start(anyio.sleep_forever, owner="alice")
        with pytest.raises(RegistryFull, match="max_running_per_owner"):
            await a.start(anyio.sleep_forever, owner="alice")
        await b.start(anyio.sleep_forever, owner="alice")


async def test_fleet_wide_limits_count_every_workers_operations(redis: Any) -> None:
    """Store limits hold across workers: per owner, then in all; an end frees the room."""
    prefix = f"t{secrets.token_hex(6)}"

    def operations() -> BackgroundOperations:
        store = RedisStatusStore(redis.url, prefix=prefix, max_running=2, max_running_per_owner=1)
        return BackgroundOperations(store=store, grace=0)

    async with operations() as a, operations() as b:
        await a.start(anyio.sleep_forever, id="a1", owner="alice")
        with pytest.raises(RegistryFull) as info:
            await b.start(anyio.sleep_forever, id="a2", owner="alice")
        assert (info.value.limit, info.value.value) == ("max_running_per_owner", 1)
        assert await b.status("a2", owner="alice") is None  # nothing was recorded
        await b.start(anyio.sleep_forever, id="b1", owner="bob")
        with pytest.raises(RegistryFull) as info:
            await b.start(anyio.sleep_forever, id="c1", owner="carol")
        assert (info.value.limit, info.value.value) == ("max_running", 2)
        assert await a.cancel("a1", owner="alice") is CancelOutcome.CANCELLED
        await a.wait("a1", owner="alice")
        await b.start(anyio.sleep_forever, id="a2", owner="alice")  # room again


async def test_statuses_live_in_keys_with_bounded_ttls(redis: Any) -> None:
    """A running status lives lease + retention (refreshed), an ended one retention."""
    prefix = f"t{secrets.token_hex(6)}"
    store = RedisStatusStore(redis.url, prefix=prefix, heartbeat=1, lease=3, retention=60)
    release = anyio.Event()

    async def export() -> None:
        await release.wait()

    async with BackgroundOperations(store=store) as ops:
        await ops.start(export, id="e1", owner="al:ice")
        key = f"{prefix}:o:s:6:al:ice:e1"
        running_ttl = int(redis.command("PTTL", key)[1:])
        assert 3_000 < running_ttl <= 63_000  # lease + retention, not the lease alone
        alive_ttl = int(redis.command("PTTL", f"{prefix}:o:a:{store.worker}")[1:])
        assert alive_ttl != -1  # it expires: -2 (gone) or at most the lease
        assert alive_ttl <= 3_000  # how long a dead worker's operations still read running
        release.set()
        await ops.wait("e1", owner="al:ice")
        ended_ttl = int(redis.command("PTTL", key)[1:])
        assert 3_000 < ended_ttl <= 60_000
        assert redis.command("ZCARD", f"{prefix}:o:z") == b":1"
        async with raw(redis) as client:  # every key expires, the index of ended ones too
            ttls = await keys_of(client, prefix)
        assert f"{prefix}:o:z" in ttls
        assert -1 not in ttls.values(), ttls


async def test_a_worker_killed_while_its_operation_runs_leaves_a_lost_status(
    redis: Any, anyio_backend: str
) -> None:
    """SIGKILL the worker: the status turns from running to lost (within the lease, 1.5 s)."""
    prefix = f"t{secrets.token_hex(6)}"
    command = [
        *(sys.executable, "-m", "tests.operations_worker"),
        *(redis.url, prefix, anyio_backend, "exp-9", "alice", "steps"),  # short leases
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    async with await anyio.open_process(command, cwd=ROOT, env=env, stderr=None) as process:
        assert process.stdout is not None
        with anyio.fail_after(30):
            line = await BufferedByteReceiveStream(process.stdout).receive_until(b"\n", 1000)
        assert line.startswith(b"running "), line
        dead_worker = line.split()[1].decode()
        async with AsyncExitStack() as stack:
            store = await stack.enter_async_context(RedisStatusStore(redis.url, prefix=prefix))
            reader = await stack.enter_async_context(BackgroundOperations(store=store))
            status = await reader.status("exp-9", owner="alice")
            assert status is not None
            assert status.state is OperationState.RUNNING
            assert status.worker == dead_worker
            alive_ttl = int(redis.command("PTTL", f"{prefix}:o:a:{dead_worker}")[1:])
            assert 0 < alive_ttl <= 1_500  # the bound: the worker's lease
            process.send_signal(signal.SIGKILL)
            with anyio.fail_after(30):
                assert await process.wait() == -signal.SIGKILL
                lost = await wait_while_running(reader, "exp-9", "alice")
            assert lost is not None
            assert lost.state is OperationState.LOST
            assert lost.state.ended
            assert lost.error is not None
            assert lost.error.type_name == "WorkerLost"
            assert dead_worker in lost.error.message
            assert await reader.cancel("exp-9", owner="alice") is CancelOutcome.NOT_FOUND
            # lost means the registration expired too: the id can be started again at once
            retry = await stack.enter_async_context(worker(redis.url, prefix))
            assert await retry.start(anyio.sleep_forever, id="exp-9", owner="alice") == "exp-9"
            status = await retry.status("exp-9", owner="alice")
            assert status is not None
            assert status.state is OperationState.RUNNING


@pytest.mark.parametrize("cancel", ["after-a-stopped", "as-a-resumes", "while-a-is-paused"])
async def test_a_paused_worker_whose_operation_ran_again_elsewhere_stops_its_copy(
    redis: Any, anyio_backend: str, cancel: str
) -> None:
    """Issue 25: worker A (a process) stops itself (SIGSTOP) past its lease, the id is
    started again on B, A resumes (SIGCONT): A cancels its copy at the first resync of its
    backend after the resume (counted: not one heartbeat more), its steps after the resume
    never reach the status, and a cancel from a third worker C stops every copy, the status
    ending as the current run's (B's, cancelled). The cancel comes after A stopped its copy
    (B's copy runs alone meanwhile), just after the resume (both copies may run), or while A
    is paused (A's copy still exists)."""
    prefix = f"t{secrets.token_hex(6)}"
    command = [
        *(sys.executable, "-m", "tests.operations_worker"),
        *(redis.url, prefix, anyio_backend, "exp-7", "alice", "steps"),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    async with await anyio.open_process(command, cwd=ROOT, env=env, stderr=None) as process:
        assert process.stdout is not None
        assert process.stdin is not None
        lines = BufferedByteReceiveStream(process.stdout)

        async def line(first: str) -> list[str]:
            with anyio.fail_after(30):
                words = (await lines.receive_until(b"\n", 1000)).decode().split()
            assert words[0] == first, words
            return words[1:]

        await line("running")
        async with worker(redis.url, prefix) as b, worker(redis.url, prefix) as c:
            await process.stdin.send(b"stop\n")
            resyncs, steps = map(int, await line("stopped"))
            try:
                with anyio.fail_after(30):
                    lost = await wait_while_running(b, "exp-7", "alice")
                assert lost is not None
                assert lost.state is OperationState.LOST
                assert await b.start(anyio.sleep_forever, id="exp-7", owner="alice") == "exp-7"
                if cancel == "while-a-is-paused":
                    assert await c.cancel("exp-7", owner="alice") is CancelOutcome.CANCELLED
            finally:
                process.send_signal(signal.SIGCONT)
            if cancel == "as-a-resumes":
                assert await c.cancel("exp-7", owner="alice") is CancelOutcome.CANCELLED
            b_worker = b.store.worker
            assert isinstance(b_backend := b.registry.backend, RedisBackend)
            kind, source, resyncs_then, steps_then = await line("ended")
            assert kind == "requested"
            assert source in (b_backend.worker, "None")  # "None": B's run had ended
            # stopped by the first resync that began after the resume (or by one in flight as
            # A stopped, whose script reached Redis only after the resume): not one more
            assert int(resyncs_then) <= resyncs + 1
            assert int(steps_then) >= steps  # A's steps after the resume: counted, ignored
            if cancel == "after-a-stopped":  # exactly one copy runs: B's
                current = await c.status("exp-7", owner="alice")
                assert current is not None
                assert (current.state, current.worker) == (OperationState.RUNNING, b_worker)
                assert current.progress is None  # B's run reported nothing: none of A's steps
                assert await c.cancel("exp-7", owner="alice") is CancelOutcome.CANCELLED
            with anyio.fail_after(30):
                ended = await b.wait("exp-7", owner="alice")
            assert ended is not None
            assert (ended.state, ended.worker) == (OperationState.CANCELLED, b_worker)
            stored = await c.status("exp-7", owner="alice")
            assert stored is not None
            assert (stored.state, stored.worker) == (OperationState.CANCELLED, b_worker)
            assert stored.progress is None  # none of A's steps, before or after its end
        await process.stdin.aclose()
        with anyio.fail_after(30):
            assert await process.wait() == 0


async def test_a_write_of_a_run_that_is_not_the_current_one_is_ignored(redis: Any) -> None:
    """Only a start replaces another run's status: progress and the end of an older run
    (its worker was lost, the id started again elsewhere) leave the current run's status."""
    prefix = f"t{secrets.token_hex(6)}"
    async with (
        RedisStatusStore(redis.url, prefix=prefix) as a,
        RedisStatusStore(redis.url, prefix=prefix) as b,
    ):
        old = OperationStatus("x", None, OperationState.RUNNING, 1.0, worker=a.worker)
        new = OperationStatus("x", None, OperationState.RUNNING, 2.0, worker=b.worker)
        await a.put(old)
        await b.put(new)  # the start of the current run
        for step in (5, 6):  # the second is no start either
            await a.put(replace(old, progress=Progress(step)))
        assert await b.get("x", None) == new
        ended = replace(new, state=OperationState.COMPLETED, ended_at=4.0)
        await b.put(ended)
        await a.put(replace(old, progress=Progress(7)))
        await a.put(replace(old, state=OperationState.CANCELLED, ended_at=5.0))
        assert await b.get("x", None) == ended


def test_the_default_leases_agree() -> None:
    """The store's default lease outlasts a default RedisBackend's registrations (lease + two
    heartbeats of the store), so a status reading lost means its id can be started again."""
    store, backend = RedisStatusStore(), RedisBackend()
    assert store._lease_ms / 1000 >= backend._settings.lease + 2 * store._heartbeat


async def test_an_unreachable_redis_is_a_clear_error() -> None:
    """Entering a store whose server does not answer raises RedisUnavailable, no hang."""
    store = RedisStatusStore("redis://127.0.0.1:1/0", timeout=0.5)
    with pytest.raises(RedisUnavailable, match="cannot reach Redis"):
        async with BackgroundOperations(store=store):
            pass  # pragma: no cover


def test_options_are_checked() -> None:
    """Bad options of the Redis store raise ValueError naming the option."""
    for options, name in (
        ({"heartbeat": 0}, "heartbeat"),
        ({"heartbeat": 1, "lease": 1}, "lease"),
        ({"retention": -1}, "retention"),
        ({"max_retained": 0}, "max_retained"),
        ({"max_running_per_owner": 0}, "max_running_per_owner"),
        ({"prefix": "a b"}, "prefix"),
    ):
        with pytest.raises(ValueError, match=name):
            RedisStatusStore(**options)


def test_two_uvicorn_workers_start_on_one_read_and_cancel_on_the_other(redis: Any) -> None:
    """uvicorn --workers 2 on Redis: POST on worker 1; GET and DELETE on worker 2."""
    examples = ROOT / "docs" / "examples"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "CANCELKIT_REDIS_URL": redis.url, "PYTHONPATH": str(examples)}
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "uvicorn", "fastapi_operations:app", "--workers", "2"),
            *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"),
        ],
        cwd=examples,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    clients: dict[str, httpx.Client] = {}
    try:
        clients = one_client_per_worker(
            f"http://127.0.0.1:{port}",
            lambda client: str(client.get("/worker").json()["worker"]),
            workers=2,
            headers={"x-user": "alice"},
            deadline=time.monotonic() + 120,  # slow imports on a loaded machine
        )
        (first_worker, first), (_, second) = clients.items()
        started = first.post("/exports", params={"table": "users", "chunks": 100_000})
        assert started.status_code == 202
        location = started.headers["location"]
        status = second.get(location).json()
        assert status["state"] == "running"
        assert status["worker"] == first_worker  # it runs on the first worker
        assert second.get(location, headers={"x-user": "bob"}).status_code == 404
        stop = second.delete(location)
        assert (stop.status_code, stop.json()["outcome"]) == (202, "cancelled")
        final = second.get(location, params={"wait": 20}).json()
        assert final["state"] == "cancelled"
        assert final["reason"]["kind"] == "requested"
        assert first.get(location).json()["state"] == "cancelled"
        assert second.delete(location).status_code == 404
    finally:
        for client in clients.values():
            client.close()
        server.send_signal(signal.SIGINT)
        _, stderr = server.communicate(timeout=30)
    assert server.returncode == 0
    assert b"Traceback" not in stderr, stderr.decode()


async def test_an_end_during_a_redis_outage_is_written_once_redis_is_back(redis: Any) -> None:
    """Redis restarts (empty) while the operation ends: the heartbeat writes the final status."""
    prefix = f"t{secrets.token_hex(6)}"
    store = RedisStatusStore(redis.url, prefix=prefix, heartbeat=0.2, lease=5, timeout=0.5)
    release = anyio.Event()

    async def export() -> str:
        await release.wait()
        return "done"

    async with BackgroundOperations(store=store) as ops:
        id = await ops.start(export, owner="alice")
        redis.stop()
        try:
            release.set()
            with anyio.fail_after(30), pytest.raises(RedisUnavailable):
                await ops.wait(id, owner="alice")  # it ended; the store cannot say so yet
        finally:
            redis.start()
        with anyio.fail_after(30):
            while True:  # the heartbeat retries every 0.2 s
                try:
                    status = await store.get(id, "alice")
                except RedisUnavailable:
                    status = None  # the client is reconnecting
                if status is not None:
                    break
                await anyio.sleep(0.05)
    assert status.state is OperationState.COMPLETED
    assert status.result == "done"


async def test_a_start_refused_during_a_redis_pause_leaves_nothing_past_a_lease(
    redis: Any,
) -> None:
    """Redis pauses (CLIENT PAUSE, like a SIGSTOP: it runs the script after the caller gave
    up): the start fails with RedisUnavailable; the status Redis then writes lives one lease,
    not lease + retention."""
    prefix = f"t{secrets.token_hex(6)}"
    store = RedisStatusStore(redis.url, prefix=prefix, heartbeat=1, lease=3, timeout=0.3)
    key = f"{prefix}:o:s:5:alice:paused"
    async with BackgroundOperations(store=store) as ops:
        await ops.start(anyio.sleep_forever, id="fine", owner="alice")
        confirmed = int(redis.command("PTTL", f"{prefix}:o:s:5:alice:fine")[1:])
        assert confirmed > 3_000  # an answered start gets lease + retention at once
        assert redis.command("CLIENT", "PAUSE", "1500", "WRITE") == b"+OK"
        with pytest.raises(RedisUnavailable):
            await ops.start(anyio.sleep_forever, id="paused", owner="alice")
        with anyio.fail_after(30):
            while redis.command("EXISTS", key) != b":1":  # noqa: ASYNC110 - Redis, no event
                await anyio.sleep(0.01)
        ttl = int(redis.command("PTTL", key)[1:])
        assert ttl <= 3_000  # the lease: gone soon, never an hour of "running"
        assert ops.statistics().running == 1


async def test_a_redis_restarted_empty_gets_the_running_statuses_back(redis: Any) -> None:
    """Redis restarts without its data while an operation runs: the heartbeat of the worker
    running it writes its status again, so other workers read running (not 404)."""
    prefix = f"t{secrets.token_hex(6)}"
    options: dict[str, Any] = {"prefix": prefix, "heartbeat": 0.2, "lease": 1, "timeout": 0.5}
    store = RedisStatusStore(redis.url, **options)
    async with BackgroundOperations(store=store) as ops:
        await ops.start(anyio.sleep_forever, id="long-1", owner="kim")
        redis.stop()
        redis.start()
        assert redis.command("EXISTS", f"{prefix}:o:s:3:kim:long-1") == b":0"  # empty
        async with RedisStatusStore(redis.url, **options) as other:
            with anyio.fail_after(30):
                while True:
                    try:
                        status = await other.get("long-1", "kim")
                    except RedisUnavailable:
                        status = None  # a client still reconnecting
                    if status is not None:
                        break
                    await anyio.sleep(0.05)  # the other worker's heartbeat acts: no event
        assert status.state is OperationState.RUNNING
        assert status.worker == store.worker
        assert await ops.cancel("long-1", owner="kim") is CancelOutcome.CANCELLED


async def test_the_router_answers_503_while_redis_is_down(redis: Any) -> None:
    """During an outage a start, and the status or cancel of an operation that does not run
    in this worker, answer 503 unavailable with Retry-After; a local one still answers."""
    prefix = f"t{secrets.token_hex(6)}"
    store = RedisStatusStore(redis.url, prefix=prefix, heartbeat=0.5, lease=5, timeout=0.5)
    ops = BackgroundOperations(store=store, grace=0)
    app = FastAPI()
    install(app)
    app.include_router(operations_router(ops))

    @app.post("/exports", status_code=202)
    async def start_export(start: OperationStarter = operation_starter(ops)) -> Response:  # noqa: B008
        return await start(anyio.sleep_forever)

    transport = httpx.ASGITransport(app)
    async with ops, httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        location = (await http.post("/exports")).headers["location"]
        redis.stop()
        try:
            answers = [
                await http.post("/exports"),
                await http.get("/operations/elsewhere"),
                await http.delete("/operations/elsewhere"),
            ]
            local = await http.get(location)  # it runs here: its status is known
        finally:
            redis.start()
    assert local.json()["state"] == "running"
    for answer in answers:
        assert answer.status_code == 503
        assert answer.json()["reason"] == "unavailable"
        assert answer.headers["retry-after"] == "1"
