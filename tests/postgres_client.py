"""A client process for the SIGKILL test: statements under a token with a deadline.

``python -m tests.postgres_client DRIVER DSN APPLICATION_NAME TIMEOUT`` runs, in
``cancelkit.postgres.transaction()`` under a token that expires in TIMEOUT seconds,
``SELECT pg_sleep(0.2)``, then reads the transaction's ``statement_timeout`` (printed, in ms,
after the one the transaction set), then runs ``SELECT pg_sleep(30)``. DRIVER: asyncpg, psycopg,
sqlalchemy+asyncpg or sqlalchemy+psycopg (on asyncio), or thread (a sync psycopg connection in a
worker thread, on trio). The test kills this process (SIGKILL) in the last statement, so only
the server-side ``statement_timeout`` can stop it.
"""

from __future__ import annotations

import sys
from typing import Any

import anyio
import anyio.to_thread

import cancelkit
from cancelkit.postgres import PostgresTransaction, transaction

SETTING = "SELECT setting FROM pg_settings WHERE name = 'statement_timeout'"


FIRST = "SELECT pg_sleep(0.2)"  # uses some of the budget
LAST = "SELECT pg_sleep(30)"  # killed in it


def report(tx: PostgresTransaction, setting: Any) -> None:
    """The statement_timeout the transaction set, and the one its third statement runs under."""
    if isinstance(setting, tuple):  # psycopg's row
        (setting,) = setting
    print(tx.statement_timeout, setting, flush=True)


async def main(driver: str, dsn: str, app: str, seconds: float) -> None:
    # The token is made once connected: a slow start (imports, a loaded machine) must not
    # eat the deadline before the statements are sent.
    if driver == "asyncpg":
        import asyncpg

        conn = await asyncpg.connect(dsn, server_settings={"application_name": app})
        token = cancelkit.CancellationToken(timeout=seconds)
        async with transaction(conn, token=token) as tx:
            await conn.execute(FIRST)
            report(tx, await conn.fetchval(SETTING))
            await conn.execute(LAST)
    elif driver.startswith("sqlalchemy+"):
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

        dbapi = driver.removeprefix("sqlalchemy+")
        settings = {"application_name": app}
        engine = create_async_engine(
            dsn.replace("postgresql://", f"postgresql+{dbapi}://"),
            connect_args={"server_settings": settings} if dbapi == "asyncpg" else settings,
        )
        async with AsyncSession(engine) as session:
            await session.connection()  # connected, its transaction begun
            token = cancelkit.CancellationToken(timeout=seconds)
            async with transaction(session, token=token) as tx:
                await session.execute(text(FIRST))
                report(tx, (await session.execute(text(SETTING))).scalar())
                await session.execute(text(LAST))
    elif driver == "psycopg":
        import psycopg

        aconn = await psycopg.AsyncConnection.connect(dsn, application_name=app)
        token = cancelkit.CancellationToken(timeout=seconds)
        async with transaction(aconn, token=token) as tx:
            await aconn.execute(FIRST.encode())
            report(tx, await (await aconn.execute(SETTING.encode())).fetchone())
            await aconn.execute(LAST.encode())
    else:  # thread: a sync connection in a worker thread, on trio
        import psycopg

        sync = psycopg.connect(dsn, application_name=app)
        token = cancelkit.CancellationToken(timeout=seconds)

        def work() -> None:
            with transaction(sync, token=token) as tx:
                sync.execute(FIRST.encode())
                report(tx, sync.execute(SETTING.encode()).fetchone())
                sync.execute(LAST.encode())

        await anyio.to_thread.run_sync(work)


if __name__ == "__main__":
    driver = sys.argv[1]
    backend = "trio" if driver == "thread" else "asyncio"
    anyio.run(main, driver, sys.argv[2], sys.argv[3], float(sys.argv[4]), backend=backend)
