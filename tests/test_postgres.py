"""cancelkit.postgres against a real PostgreSQL server: the query stops on the server.

Server-side effects are observed from a second connection polling ``pg_stat_activity`` until a
generous bound (``POLL``); the bound only decides when to give up, never what passes.
asyncpg and psycopg's async mode run on asyncio only; the sync psycopg connection in a worker
thread is the trio way (it runs on both).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import asyncpg
import psycopg
import psycopg_pool
import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

import cancelkit
from cancelkit.postgres import PostgresTransaction, TransactionOutcome, transaction
from tests.postgres import OneShotProxy, PostgresServer

POLL = 10.0  # seconds to wait for a server-side effect before failing
CYCLES = 1000

pytestmark = pytest.mark.anyio
asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])


def application_name() -> str:
    return f"ck-{uuid.uuid4().hex[:12]}"


class Monitor:
    """A second connection that reads ``pg_stat_activity`` (sync, from worker threads)."""

    def __init__(self, server: PostgresServer) -> None:
        self.conn = psycopg.connect(server.dsn, autocommit=True)

    def states(self, app: str) -> list[str]:
        rows = self.conn.execute(
            # "active" means our pg_sleep() runs: other statements are not what tests wait for
            "SELECT CASE WHEN state = 'active' AND query NOT LIKE '%%pg_sleep%%'"
            " THEN 'active (other)' ELSE coalesce(state, '') END"
            " FROM pg_stat_activity WHERE application_name = %s",
            (app,),
        ).fetchall()
        return [row[0] for row in rows]

    def sql(self, query: str, *params: object) -> Any:
        cursor = self.conn.execute(query.encode(), params)
        row = cursor.fetchone() if cursor.description else None
        return None if row is None else row[0]

    async def wait_for(self, app: str, done: Callable[[list[str]], bool], what: str) -> None:
        give_up = time.monotonic() + POLL
        while not done(states := await anyio.to_thread.run_sync(self.states, app)):
            if time.monotonic() > give_up:
                pytest.fail(f"{what}: {POLL} s later the backends of {app} are {states}")
            await anyio.sleep(0.002)

    async def started(self, app: str) -> None:
        await self.wait_for(app, lambda states: "active" in states, "the query never started")

    async def stopped(self, app: str) -> None:
        await self.wait_for(app, lambda states: "active" not in states, "the query still runs")

    def terminate(self, app: str) -> None:
        self.sql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = %s",
            app,
        )


@pytest.fixture
def monitor(postgres_server: PostgresServer) -> Any:
    monitor = Monitor(postgres_server)
    yield monitor
    monitor.conn.close()


# --------------------------------------------------------------------------- the two drivers


class Driver:
    """What the tests do with a driver's pool and connections, the same for both."""

    name = ""

    def pool(self, server: PostgresServer, app: str, size: int) -> Any:
        raise NotImplementedError

    def acquire(self, pool: Any) -> AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    async def connect(self, server: PostgresServer, app: str, port: int) -> Any:
        raise NotImplementedError

    async def run(self, conn: Any, query: str) -> Any:
        raise NotImplementedError

    async def discarded(self, conn: Any) -> bool:
        """Whether ``conn`` (from ``connect()``) was closed; then let it go."""
        raise NotImplementedError


class Asyncpg(Driver):
    name = "asyncpg"

    @asynccontextmanager
    async def pool(self, server: PostgresServer, app: str, size: int) -> AsyncIterator[Any]:
        async with asyncpg.create_pool(
            server.url, min_size=size, max_size=size, server_settings={"application_name": app}
        ) as pool:
            yield pool

    def acquire(self, pool: Any) -> AbstractAsyncContextManager[Any]:
        return pool.acquire()  # type: ignore[no-any-return]

    async def connect(self, server: PostgresServer, app: str, port: int) -> Any:
        return await asyncpg.connect(
            host="127.0.0.1",
            port=port,
            user=server.user,
            database=server.database,
            server_settings={"application_name": app},
        )

    async def run(self, conn: Any, query: str) -> Any:
        return await conn.fetchval(query)

    async def discarded(self, conn: Any) -> bool:
        return conn.is_closed()  # type: ignore[no-any-return]


class Psycopg(Driver):
    name = "psycopg"

    @asynccontextmanager
    async def pool(self, server: PostgresServer, app: str, size: int) -> AsyncIterator[Any]:
        async with psycopg_pool.AsyncConnectionPool(
            server.dsn,
            min_size=size,
            max_size=size,
            kwargs={"application_name": app, "autocommit": True},
            open=False,
        ) as pool:
            await pool.wait()
            yield pool

    def acquire(self, pool: Any) -> AbstractAsyncContextManager[Any]:
        return pool.connection()  # type: ignore[no-any-return]

    async def connect(self, server: PostgresServer, app: str, port: int) -> Any:
        return await psycopg.AsyncConnection.connect(
            f"host=127.0.0.1 port={port} user={server.user} dbname={server.database}",
            application_name=app,
            autocommit=True,
        )

    async def run(self, conn: Any, query: str) -> Any:
        cursor = await conn.execute(query.encode())
        row = await cursor.fetchone() if cursor.description else None
        return None if row is None else row[0]

    async def discarded(self, conn: Any) -> bool:
        return conn.closed  # type: ignore[no-any-return]


class Sqlalchemy(Driver):
    """SQLAlchemy's async engine on a driver: a session is the "connection"."""

    def __init__(self, dbapi: str) -> None:
        self.dbapi = dbapi
        self.name = f"sqlalchemy+{dbapi}"

    def engine(self, server: PostgresServer, app: str, size: int, port: int = 0) -> AsyncEngine:
        url = server.url.replace("postgresql://", f"postgresql+{self.dbapi}://")
        if port:
            url = url.replace(f":{server.port}/", f":{port}/")
        settings = {"application_name": app}
        return create_async_engine(
            url,
            pool_size=size,
            max_overflow=0,
            connect_args={"server_settings": settings} if self.dbapi == "asyncpg" else settings,
        )

    @asynccontextmanager
    async def pool(self, server: PostgresServer, app: str, size: int) -> AsyncIterator[Any]:
        engine = self.engine(server, app, size)
        try:
            yield engine
            assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        finally:
            await engine.dispose()

    def acquire(self, pool: Any) -> AbstractAsyncContextManager[Any]:
        return AsyncSession(pool)

    async def connect(self, server: PostgresServer, app: str, port: int) -> Any:
        engine = self.engine(server, app, 1, port)
        invalidated: list[object] = []
        event.listen(engine.sync_engine.pool, "invalidate", lambda *_: invalidated.append(1))
        session = AsyncSession(engine)
        session.info["invalidated"] = invalidated
        return session

    async def run(self, conn: Any, query: str) -> Any:
        result = await conn.execute(text(query))
        return result.scalar() if result.returns_rows else None

    async def discarded(self, conn: Any) -> bool:
        """Whether the pool invalidated (closed) the session's connection: never reused."""
        await conn.close()
        await conn.bind.dispose()
        return bool(conn.info["invalidated"])


DRIVERS = [
    pytest.param(Asyncpg(), id="asyncpg"),
    pytest.param(Psycopg(), id="psycopg"),
    pytest.param(Sqlalchemy("asyncpg"), id="sqlalchemy+asyncpg"),
    pytest.param(Sqlalchemy("psycopg"), id="sqlalchemy+psycopg"),
]


async def cancelled_in_flight(
    monitor: Monitor, app: str, token: cancelkit.CancellationToken, work: Callable[[], Any]
) -> None:
    """Run ``work`` until its query is active on the server, cancel, see the query stop."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(work)
        await monitor.started(app)
        token.cancel()
        await monitor.stopped(app)


async def take_the_lock(server: PostgresServer, table: str) -> Any:
    """Another transaction updates row 1 of ``table`` (waiting up to POLL for its lock)."""

    def update() -> Any:
        with psycopg.connect(server.dsn) as other:
            other.execute(f"SET lock_timeout = '{POLL}s'")
            row = other.execute(f"UPDATE {table} SET v = v + 10 WHERE id = 1 RETURNING v")
            return row.fetchone()

    return await anyio.to_thread.run_sync(update)


# --------------------------------------------------------------------------- asyncio drivers


@asyncio_only
@pytest.mark.parametrize("driver", DRIVERS)
async def test_cancelled_query_stops_on_the_server_and_the_pooled_connection_is_reused(
    driver: Driver, postgres_server: PostgresServer, monitor: Monitor
) -> None:
    """pg_sleep(30) under a cancelled token leaves `active`; the pool's connection then works."""
    app = application_name()
    token = cancelkit.CancellationToken()
    seen: dict[str, Any] = {}

    async def work() -> None:
        async with driver.acquire(pool) as conn:
            seen["pid"] = await driver.run(conn, "SELECT pg_backend_pid()")
            with pytest.raises(cancelkit.OperationCancelled) as caught:
                async with transaction(conn, token=token) as seen["tx"]:
                    await driver.run(conn, "SELECT pg_sleep(30)")
            assert caught.value.reason is token.reason

    async with driver.pool(postgres_server, app, 1) as pool:
        await cancelled_in_flight(monitor, app, token, work)
        assert seen["tx"].outcome is TransactionOutcome.ROLLED_BACK
        async with driver.acquire(pool) as conn:
            assert await driver.run(conn, "SELECT pg_backend_pid()") == seen["pid"]
            assert await driver.run(conn, "SELECT 1") == 1
    assert monitor.states(app) in ([], ["idle"])  # idle: the pool's close still on its way


@asyncio_only
@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_cancelled_statements_row_lock_is_released(
    driver: Driver, postgres_server: PostgresServer, monitor: Monitor
) -> None:
    """The cancelled statement's transaction is rolled back: another one gets its row lock."""
    app, table = application_name(), f"locks_{uuid.uuid4().hex[:8]}"
    monitor.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")
    monitor.sql(f"INSERT INTO {table} VALUES (1, 0) RETURNING v")
    token = cancelkit.CancellationToken()

    async def work() -> None:
        with pytest.raises(cancelkit.OperationCancelled):
            async with driver.acquire(pool) as conn, transaction(conn, token=token):
                await driver.run(conn, f"UPDATE {table} SET v = v + 1 WHERE id = 1")
                await driver.run(conn, "SELECT pg_sleep(30)")

    async with driver.pool(postgres_server, app, 1) as pool:
        await cancelled_in_flight(monitor, app, token, work)
        assert await take_the_lock(postgres_server, table) == (10,)  # the +1 rolled back
    monitor.sql(f"DROP TABLE {table}")


@asyncio_only
@pytest.mark.parametrize("driver", DRIVERS)
async def test_cancel_cycles_leak_no_connection_and_leave_none_idle_in_transaction(
    driver: Driver, postgres_server: PostgresServer, monitor: Monitor
) -> None:
    """1,000 cancels of a statement seen running on the server, in track()'s scope: all rolled back.

    Before any connection goes back to its pool (whose reset would hide a transaction left
    open), the server is asked: every backend of the pool is `idle`, none `idle in transaction`.
    """
    app, size = application_name(), 8
    outcomes: dict[TransactionOutcome | None, int] = {}

    async def one(
        pool: Any,
        token: cancelkit.CancellationToken,
        ready: anyio.Event,
        settled: anyio.Event,
        release: anyio.Event,
    ) -> None:
        async with driver.acquire(pool) as conn:
            tx = transaction(conn, token=token)
            try:
                with token.move_on(), pytest.raises(cancelkit.OperationCancelled):
                    async with tx:  # the request's own interrupting scope, as in track()
                        ready.set()
                        await driver.run(conn, "SELECT pg_sleep(1)")
                outcomes[tx.outcome] = outcomes.get(tx.outcome, 0) + 1
            finally:
                ready.set()  # (a failure must not hang the round)
                settled.set()
            await release.wait()  # the server is asked before the connection goes back

    async with driver.pool(postgres_server, app, size) as pool:
        for _ in range(CYCLES // size):
            lanes = [
                (cancelkit.CancellationToken(), anyio.Event(), anyio.Event()) for _ in range(size)
            ]
            release = anyio.Event()
            async with anyio.create_task_group() as tg:
                for token, ready, settled in lanes:
                    tg.start_soon(one, pool, token, ready, settled, release)
                for _, ready, _ in lanes:
                    await ready.wait()
                await monitor.wait_for(  # every statement runs on the server
                    app, lambda states: states.count("active") == size, "a statement never ran"
                )
                for token, _, _ in lanes:
                    token.cancel()
                for _, _, settled in lanes:
                    await settled.wait()  # every lane rolled back, its connection still held
                states = await anyio.to_thread.run_sync(monitor.states, app)
                assert sorted(states) == ["idle"] * size  # none active, none idle in transaction
                release.set()
    await monitor.wait_for(app, lambda states: not states, "connections left after the pool")
    assert outcomes == {TransactionOutcome.ROLLED_BACK: CYCLES}


@asyncio_only  # the client process runs its own loop: trio for "thread"
@pytest.mark.parametrize(
    "driver", ["asyncpg", "psycopg", "sqlalchemy+asyncpg", "sqlalchemy+psycopg", "thread"]
)
async def test_the_deadline_stops_the_query_when_the_client_process_is_killed(
    driver: str, postgres_server: PostgresServer, monitor: Monitor
) -> None:
    """statement_timeout from the token's deadline: the server stops it, the client is gone.

    The bound is per statement: the third statement still runs under the budget set at BEGIN
    (the time its first statement took is not taken off), as docs/postgres.md says.
    """
    app = application_name()
    dsn = postgres_server.dsn if driver in ("psycopg", "thread") else postgres_server.url
    command = [sys.executable, "-m", "tests.postgres_client", driver, dsn, app, "2"]
    client = subprocess.Popen(  # noqa: ASYNC220 - a kill target, never waited on in the loop
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert client.stdout is not None
    assert client.stderr is not None
    try:
        timeouts = (await anyio.to_thread.run_sync(client.stdout.readline)).split()
        try:
            await monitor.started(app)
        except pytest.fail.Exception:
            client.kill()
            _, err = await anyio.to_thread.run_sync(client.communicate)
            pytest.fail(f"the client's query never ran; exit {client.returncode}: {err!r}")
        client.send_signal(signal.SIGKILL)  # before its deadline: it cannot cancel
        assert await anyio.to_thread.run_sync(client.wait) == -signal.SIGKILL
        await monitor.stopped(app)  # pg_sleep(30), stopped at about 2.2 s by the server
        set_at_begin, in_the_third_statement = map(int, timeouts)
        assert 0 < set_at_begin <= 2000
        assert in_the_third_statement == set_at_begin  # not the time left then
    finally:
        client.kill()
        client.wait()
        client.stdout.close()
        client.stderr.close()
        monitor.terminate(app)


@asyncio_only
@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_refused_cancel_request_ends_in_bounded_time_without_a_raw_exception(
    driver: Driver,
    postgres_server: PostgresServer,
    monitor: Monitor,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The cancel connection refused: OperationCancelled, the connection discarded, logged."""
    app = application_name()
    proxy = OneShotProxy(postgres_server.port)  # the cancel request's connection is refused
    token = cancelkit.CancellationToken()
    seen: dict[str, Any] = {}

    async def work() -> None:
        conn = await driver.connect(postgres_server, app, proxy.port)
        with anyio.fail_after(POLL), pytest.raises(cancelkit.OperationCancelled):
            async with transaction(conn, token=token, cancel_timeout=1) as seen["tx"]:
                await driver.run(conn, "SELECT pg_sleep(30)")
        seen["closed"] = await driver.discarded(conn)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(work)
            await monitor.started(app)
            token.cancel()
    finally:
        proxy.close()
        monitor.terminate(app)
    assert seen["tx"].outcome is TransactionOutcome.DISCARDED
    assert seen["closed"]
    assert "connection discarded" in caplog.text


# ------------------------------------------------------------------ sync psycopg in a thread


async def cancelled_in_a_thread(work: Callable[[], None]) -> None:
    """Run ``work`` in a worker thread: it must raise OperationCancelled, in bounded time."""
    with anyio.fail_after(POLL), pytest.raises(cancelkit.OperationCancelled):
        await anyio.to_thread.run_sync(work)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_a_thread_statement_stops_when_the_token_is_cancelled_on_trio(
    postgres_server: PostgresServer, monitor: Monitor
) -> None:
    """Sync psycopg in a worker thread: the token's cancel stops it, another transaction gets its
    row lock, the connection is reused."""
    app, table = application_name(), f"locks_{uuid.uuid4().hex[:8]}"
    monitor.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")
    monitor.sql(f"INSERT INTO {table} VALUES (1, 0)")
    conn = psycopg.connect(postgres_server.dsn, application_name=app, autocommit=True)
    token = cancelkit.CancellationToken()
    seen: dict[str, PostgresTransaction] = {}

    def work() -> None:  # current_token() follows the call into the thread
        with transaction(conn) as seen["tx"]:
            conn.execute(f"UPDATE {table} SET v = v + 1 WHERE id = 1".encode())
            conn.execute(b"SELECT pg_sleep(30)")

    async def request() -> None:
        with pytest.raises(cancelkit.OperationCancelled), token.scope():
            await anyio.to_thread.run_sync(work)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(request)
            await monitor.started(app)
            token.cancel()
            await monitor.stopped(app)
        assert seen["tx"].outcome is TransactionOutcome.ROLLED_BACK
        assert await take_the_lock(postgres_server, table) == (10,)  # the +1 rolled back
        assert conn.execute(b"SELECT v FROM " + table.encode()).fetchone() == (10,)
    finally:
        conn.close()
        monitor.sql(f"DROP TABLE {table}")


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_thread_cancel_cycles_leave_the_connection_clean_on_trio(
    postgres_server: PostgresServer, monitor: Monitor
) -> None:
    """500 cancels of a thread's statement: each rolled back, the backend `idle` after each.

    The token is cancelled once the transaction has begun, as the statement is sent or while it
    runs: either way the statement gets the cancel request.
    """
    app = application_name()
    conn = psycopg.connect(postgres_server.dsn, application_name=app, autocommit=True)
    outcomes: dict[TransactionOutcome | None, int] = {}

    def work(token: cancelkit.CancellationToken, ready: threading.Event) -> None:
        tx = transaction(conn, token=token)
        try:
            with pytest.raises(cancelkit.OperationCancelled), tx:
                ready.set()
                conn.execute(b"SELECT pg_sleep(1)")
        finally:
            ready.set()
            outcomes[tx.outcome] = outcomes.get(tx.outcome, 0) + 1

    try:
        for _ in range(CYCLES // 2):  # a thread hop each way and a cancel request: ~10 ms each
            token, ready = cancelkit.CancellationToken(), threading.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, work, token, ready)
                await anyio.to_thread.run_sync(ready.wait)
                token.cancel()
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            assert monitor.states(app) == ["idle"]  # the server agrees: not idle in transaction
    finally:
        conn.close()
    assert outcomes == {TransactionOutcome.ROLLED_BACK: CYCLES // 2}


async def test_a_refused_cancel_in_a_thread_ends_within_cancel_timeout_without_a_deadline(
    postgres_server: PostgresServer, monitor: Monitor, caplog: pytest.LogCaptureFixture
) -> None:
    """The thread's cancel request refused, no deadline: the socket is shut, nothing commits."""
    app, table = application_name(), f"refused_{uuid.uuid4().hex[:8]}"
    monitor.sql(f"CREATE TABLE {table} (v int)")
    proxy = OneShotProxy(postgres_server.port)
    conn = psycopg.connect(
        f"host=127.0.0.1 port={proxy.port} user={postgres_server.user}",
        application_name=app,
        autocommit=True,
    )
    token = cancelkit.CancellationToken()  # no deadline: no statement_timeout either
    seen: dict[str, PostgresTransaction] = {}

    def work() -> None:
        with transaction(conn, token=token, cancel_timeout=1) as seen["tx"]:
            conn.execute(f"INSERT INTO {table} VALUES (1)".encode())
            conn.execute(b"SELECT pg_sleep(30)")

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancelled_in_a_thread, work)
            await monitor.started(app)
            token.cancel()  # its cancel request is refused
    finally:
        conn.close()
        proxy.close()
        monitor.terminate(app)
    assert seen["tx"].outcome is TransactionOutcome.DISCARDED
    assert "the cancel request failed" in caplog.text
    assert monitor.sql(f"SELECT count(*) FROM {table}") == 0
    monitor.sql(f"DROP TABLE {table}")


@pytest.mark.parametrize("then", ["end", "statement"])
async def test_a_thread_block_cancelled_between_statements_rolls_back(
    then: str, postgres_server: PostgresServer, monitor: Monitor
) -> None:
    """Cancelled while the thread runs no statement: no commit, OperationCancelled.

    Then the block ends, or starts another statement (which gets the cancel request).
    """
    app, table = application_name(), f"between_{uuid.uuid4().hex[:8]}"
    monitor.sql(f"CREATE TABLE {table} (v int)")
    conn = psycopg.connect(postgres_server.dsn, application_name=app, autocommit=True)
    token = cancelkit.CancellationToken()
    between, go = threading.Event(), threading.Event()
    seen: dict[str, PostgresTransaction] = {}

    def work() -> None:
        with transaction(conn, token=token) as seen["tx"]:
            conn.execute(f"INSERT INTO {table} VALUES (1)".encode())
            between.set()
            go.wait()  # the thread's own work, while the token is cancelled
            if then == "statement":
                conn.execute(b"SELECT pg_sleep(30)")

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancelled_in_a_thread, work)
            await anyio.to_thread.run_sync(between.wait)
            token.cancel()
            go.set()
        assert seen["tx"].outcome is TransactionOutcome.ROLLED_BACK
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert monitor.sql(f"SELECT count(*) FROM {table}") == 0
    finally:
        go.set()
        conn.close()
        monitor.terminate(app)
        monitor.sql(f"DROP TABLE {table}")


@asyncio_only
@pytest.mark.parametrize("then", ["end", "statement"])
@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_block_cancelled_between_statements_rolls_back(
    driver: Driver, then: str, postgres_server: PostgresServer, monitor: Monitor
) -> None:
    """Cancelled with no statement in flight: no commit, OperationCancelled, the pool's again."""
    app, table = application_name(), f"between_{uuid.uuid4().hex[:8]}"
    monitor.sql(f"CREATE TABLE {table} (v int)")
    token = cancelkit.CancellationToken()
    async with driver.pool(postgres_server, app, 1) as pool, driver.acquire(pool) as conn:
        with anyio.fail_after(POLL), pytest.raises(cancelkit.OperationCancelled):
            async with transaction(conn, token=token) as tx:
                await driver.run(conn, f"INSERT INTO {table} VALUES (1)")
                token.cancel()
                if then == "statement":
                    await driver.run(conn, "SELECT pg_sleep(30)")
        assert tx.outcome is TransactionOutcome.ROLLED_BACK
        assert await driver.run(conn, "SELECT 1") == 1
    assert monitor.sql(f"SELECT count(*) FROM {table}") == 0
    monitor.sql(f"DROP TABLE {table}")


# ------------------------------------------------------------------ the rest of the contract


@asyncio_only
@pytest.mark.parametrize("driver", DRIVERS)
async def test_commit_error_and_outer_cancel_leave_nothing_behind(
    driver: Driver, postgres_server: PostgresServer
) -> None:
    """Commits; SET LOCAL ends with it; an error rolls back; an outer cancel goes through."""
    async with driver.pool(postgres_server, application_name(), 1) as pool:  # noqa: SIM117
        async with driver.acquire(pool) as conn:
            token = cancelkit.CancellationToken(timeout=60)
            async with transaction(conn, token=token) as tx:
                assert tx.statement_timeout is not None
                assert 59_000 < tx.statement_timeout <= 60_000
                assert await driver.run(conn, "SHOW statement_timeout") == "1min"
            assert tx.outcome is TransactionOutcome.COMMITTED
            assert await driver.run(conn, "SHOW statement_timeout") == "0"  # not left behind

            with pytest.raises(ZeroDivisionError):
                async with transaction(conn, token=cancelkit.CancellationToken()) as tx:
                    assert tx.statement_timeout is None  # no deadline, no timeout
                    1 / 0  # noqa: B018
            assert tx.outcome is TransactionOutcome.ROLLED_BACK

            with anyio.CancelScope() as outer:
                with cancelkit.CancellationToken().scope() as scope:
                    async with transaction(conn) as tx:  # current_token()
                        outer.cancel()
                        await driver.run(conn, "SELECT pg_sleep(0.1)")
                    await anyio.lowlevel.checkpoint()
            assert outer.cancelled_caught  # not swallowed
            assert not scope.cancelled_caught
            # asyncpg's statement is interrupted; psycopg's block is shielded from everything but
            # its token (psycopg would close the connection), so the outer cancel waits for it
            expected = "rolled_back" if driver.name == "asyncpg" else "committed"
            assert tx.outcome == expected
            assert await driver.run(conn, "SELECT 1") == 1


@asyncio_only
async def test_misuse_is_refused_clearly(postgres_server: PostgresServer) -> None:
    """Wrong connection type, wrong kind of `with`, no token, a bad timeout, a second entry."""
    token = cancelkit.CancellationToken()
    with pytest.raises(TypeError, match="asyncpg connection"):
        transaction(object(), token=token)
    with psycopg.Connection.connect(postgres_server.dsn) as conn:
        with pytest.raises(RuntimeError, match="needs a token"):
            transaction(conn)
        with pytest.raises(ValueError, match="cancel_timeout"):
            transaction(conn, token=token, cancel_timeout=0)
        tx = transaction(conn, token=token)
        with pytest.raises(TypeError, match="'with transaction"):
            await tx.__aenter__()
        with tx:
            pass
        with pytest.raises(RuntimeError, match="only be entered once"), tx:
            pass
    async with await psycopg.AsyncConnection.connect(postgres_server.dsn) as aconn:
        atx = transaction(aconn, token=token)
        with pytest.raises(TypeError, match="'async with"):
            atx.__enter__()
        async with atx:
            pass
        with pytest.raises(RuntimeError, match="only be entered once"):
            await atx.__aenter__()


def test_the_docs_example_stops_both_queries(postgres_server: PostgresServer) -> None:
    """docs/examples/postgres_example.py against a real server: both statements stop."""
    example = Path(__file__).parent.parent / "docs" / "examples" / "postgres_example.py"
    result = subprocess.run(
        [sys.executable, str(example), postgres_server.url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "statement_timeout for this transaction: 10000 ms",
        "asyncpg: stopped: requested",
        "asyncpg: statements still running on the server: 0",
        "sqlalchemy: stopped: requested",
        "sqlalchemy: statements still running on the server: 0",
        "sqlalchemy: connections checked out of the pool: 0",
        "trio: stopped: requested",
        "trio: the connection is IDLE",
    ]


@asyncio_only
async def test_psycopg_backend_terminated_mid_block_raises_the_drivers_error_not_unbound_local(
    postgres_server: PostgresServer, monitor: Monitor
) -> None:
    """A backend terminated inside the block: psycopg's error (or a discard), never a NameError.

    _settle_psycopg's ``except Exception:`` names no error; with no watcher error and a
    successful key.cancel(), ``self.error or error`` reads an unbound local.
    """
    app = application_name()
    async with Psycopg().pool(postgres_server, app, 1) as pool, pool.connection() as conn:
        with pytest.raises(psycopg.OperationalError):
            async with transaction(conn, token=cancelkit.CancellationToken()) as tx:
                await anyio.to_thread.run_sync(monitor.terminate, app)
                await conn.execute(b"SELECT 1")
        assert tx.outcome is TransactionOutcome.DISCARDED


# -- the thread's canceller on a frozen server and under cross-thread cancels (review 7a) ---


def stalled(conn: psycopg.Connection[Any]) -> Callable[[], None]:
    """SIGSTOP the backend of ``conn`` (a frozen server); return the call that resumes it."""
    pid = conn.info.backend_pid
    os.kill(pid, signal.SIGSTOP)
    return lambda: os.kill(pid, signal.SIGCONT)


@contextmanager
def frozen(conn: psycopg.Connection[Any], thread: threading.Thread) -> Iterator[None]:
    """Freeze the backend of ``conn`` for the block; then resume it, join ``thread``, close."""
    resume = stalled(conn)
    try:
        yield
    finally:
        resume()
        thread.join(POLL)
        conn.close()


def ended_within(thread: threading.Thread, seconds: float) -> bool:
    thread.join(seconds)
    return not thread.is_alive()


def test_a_thread_rollback_on_a_frozen_server_ends_within_cancel_timeout(
    postgres_server: PostgresServer,
) -> None:
    """Cancelled between statements, the server frozen: the ROLLBACK must be bounded too.

    docs/postgres.md: "when that cannot be done in time (... the server did not answer), it is
    closed and the pool replaces it". Before the fix the canceller stopped before the rollback,
    so nothing bounded it: the worker thread waited for the frozen server for ever.
    """
    conn = psycopg.connect(postgres_server.dsn, autocommit=True)
    token = cancelkit.CancellationToken()
    between, go = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def work() -> None:
        try:
            with transaction(conn, token=token, cancel_timeout=0.5) as seen["tx"]:
                conn.execute(b"SELECT 1")
                between.set()
                go.wait(POLL)
        except BaseException as exc:
            seen["exc"] = exc

    thread = threading.Thread(target=work)
    thread.start()
    assert between.wait(POLL)
    with frozen(conn, thread):
        token.cancel()
        go.set()
        assert ended_within(thread, POLL), "the rollback still waits for the frozen server"
    assert isinstance(seen["exc"], cancelkit.OperationCancelled)
    assert seen["tx"].outcome is TransactionOutcome.DISCARDED


def test_a_thread_begin_on_a_frozen_server_stops_when_the_token_is_cancelled(
    postgres_server: PostgresServer,
) -> None:
    """Cancelled while BEGIN waits for a frozen server: nothing watches it (the canceller is
    registered after BEGIN and SET LOCAL, before the fix), so the thread waited for ever."""
    conn = psycopg.connect(postgres_server.dsn, autocommit=True)
    token = cancelkit.CancellationToken()
    seen: dict[str, Any] = {}

    def work() -> None:
        seen["tx"] = tx = transaction(conn, token=token, cancel_timeout=0.5)
        try:
            with tx:
                conn.execute(b"SELECT 1")
        except BaseException as exc:
            seen["exc"] = exc

    thread = threading.Thread(target=work)
    with frozen(conn, thread):
        thread.start()
        give_up = time.monotonic() + POLL
        while conn.info.transaction_status != psycopg.pq.TransactionStatus.ACTIVE:  # BEGIN sent
            assert time.monotonic() < give_up
            time.sleep(0.001)
        token.cancel()
        assert ended_within(thread, POLL), "BEGIN still waits for the frozen server"
    assert isinstance(seen["exc"], cancelkit.OperationCancelled)
    assert seen["tx"].outcome is TransactionOutcome.DISCARDED


def test_a_cancel_from_another_thread_as_the_block_ends_raises_operation_cancelled(
    postgres_server: PostgresServer, monitor: Monitor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """token.cancel() in another thread runs canceller.start(), which sets ``self.thread``
    before ``thread.start()`` has returned; the block ending then calls ``stop()``, whose
    ``join()`` of the not-yet-started thread raises RuntimeError instead of OperationCancelled.

    The OS thread's slow start (a loaded machine) is held open here with an Event; the same
    window (tens of microseconds) is hit without any patch by cancelling as blocks end.
    """
    table = f"race_{uuid.uuid4().hex[:8]}"
    monitor.sql(f"CREATE TABLE {table} (v int)")
    conn = psycopg.connect(postgres_server.dsn, autocommit=True)
    token = cancelkit.CancellationToken()
    starting, release = threading.Event(), threading.Event()
    original = threading.Thread.start

    def slow_start(self: threading.Thread) -> None:
        if self.name == "cancelkit-pg-cancel":
            starting.set()
            # The new OS thread has not run yet. Fixed, the block's end waits for this start
            # (one lock): 1 s, not for ever; before the fix it joined the unstarted thread.
            release.wait(1.0)
        original(self)

    monkeypatch.setattr(threading.Thread, "start", slow_start)
    canceller = threading.Thread(target=token.cancel)
    seen: dict[str, Any] = {}
    try:
        with pytest.raises(cancelkit.OperationCancelled), transaction(conn, token=token) as tx:
            seen["tx"] = tx
            conn.execute(f"INSERT INTO {table} VALUES (1)".encode())
            canceller.start()  # another thread cancels the token as the block ends
            assert starting.wait(POLL)
    finally:
        release.set()
        canceller.join(POLL)
        conn.close()
    assert seen["tx"].outcome is TransactionOutcome.ROLLED_BACK
    assert monitor.sql(f"SELECT count(*) FROM {table}") == 0
    monitor.sql(f"DROP TABLE {table}")
