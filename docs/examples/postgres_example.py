"""A query that stops on the server when its request is cancelled (needs a PostgreSQL server).

Usage: ``python postgres_example.py postgresql://user@127.0.0.1:5432/db``
"""

import sys

import anyio
import asyncpg
import psycopg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

import cancelkit
from cancelkit.postgres import transaction

URL = sys.argv[1]
RUNNING = (
    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%' AND state = 'active'"
)


async def report(pool: asyncpg.Pool) -> None:
    """A handler's database work: it runs in the request's token (current_token())."""
    async with pool.acquire() as conn, transaction(conn) as tx:
        assert tx.statement_timeout is not None
        print(f"statement_timeout for this transaction: {round(tx.statement_timeout, -3)} ms")
        await conn.execute("SELECT pg_sleep(30)")  # a slow report


async def asyncpg_request() -> None:
    async with asyncpg.create_pool(URL, min_size=1, max_size=1) as pool:
        token = cancelkit.CancellationToken(timeout=10)  # the request's deadline
        async with anyio.create_task_group() as tg:

            async def request() -> None:
                try:
                    with token.scope():  # what track(), claim() and the middleware do
                        await report(pool)
                except cancelkit.OperationCancelled as exc:
                    print(f"asyncpg: stopped: {exc.reason.kind}")

            tg.start_soon(request)
            await anyio.sleep(0.5)
            token.cancel()  # the user pressed Stop
        async with pool.acquire() as conn:  # the same connection, clean
            busy = await conn.fetchval(RUNNING)
            print(f"asyncpg: statements still running on the server: {busy}")


async def sqlalchemy_request() -> None:
    engine = create_async_engine(URL.replace("postgresql://", "postgresql+asyncpg://"))
    token = cancelkit.CancellationToken()
    async with anyio.create_task_group() as tg:

        async def request() -> None:
            try:
                with token.scope():
                    async with AsyncSession(engine) as session, transaction(session):
                        await session.execute(text("SELECT pg_sleep(30)"))
            except cancelkit.OperationCancelled as exc:
                print(f"sqlalchemy: stopped: {exc.reason.kind}")

        tg.start_soon(request)
        await anyio.sleep(0.5)
        token.cancel()
    async with engine.connect() as conn:
        busy = (await conn.execute(text(RUNNING))).scalar()
    print(f"sqlalchemy: statements still running on the server: {busy}")
    print(f"sqlalchemy: connections checked out of the pool: {engine.pool.checkedout()}")
    await engine.dispose()


def trio_report(conn: psycopg.Connection) -> None:
    """Sync psycopg in a worker thread: the way to Postgres from trio."""
    with transaction(conn):  # current_token() followed the call into this thread
        conn.execute("SELECT pg_sleep(30)")


async def trio_request() -> None:
    with psycopg.connect(URL, autocommit=True) as conn:
        token = cancelkit.CancellationToken()
        async with anyio.create_task_group() as tg:

            async def request() -> None:
                try:
                    with token.scope():
                        await anyio.to_thread.run_sync(trio_report, conn)
                except cancelkit.OperationCancelled as exc:
                    print(f"trio: stopped: {exc.reason.kind}")

            tg.start_soon(request)
            await anyio.sleep(0.5)
            token.cancel()
        print(f"trio: the connection is {conn.info.transaction_status.name}")


anyio.run(asyncpg_request)
anyio.run(sqlalchemy_request)
anyio.run(trio_request, backend="trio")
