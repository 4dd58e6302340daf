"""A client process for the SIGKILL test: a statement under a token with a deadline.

``python -m tests.postgres_client DRIVER DSN APPLICATION_NAME TIMEOUT`` runs
``SELECT pg_sleep(30)`` in ``cancelkit.postgres.transaction()`` (DRIVER: asyncpg, psycopg,
sqlalchemy+asyncpg or sqlalchemy+psycopg) under a token that expires in
TIMEOUT seconds; the test kills this process (SIGKILL) while the statement runs, so only the
server-side ``statement_timeout`` can stop it.
"""

from __future__ import annotations

import sys

import anyio

import cancelkit
from cancelkit.postgres import transaction


async def main(driver: str, dsn: str, app: str, seconds: float) -> None:
    # The token is made once connected: a slow start (imports, a loaded machine) must not
    # eat the deadline before the statement is sent.
    if driver == "asyncpg":
        import asyncpg

        conn = await asyncpg.connect(dsn, server_settings={"application_name": app})
        token = cancelkit.CancellationToken(timeout=seconds)
        async with transaction(conn, token=token):
            await conn.execute("SELECT pg_sleep(30)")
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
            async with transaction(session, token=token):
                await session.execute(text("SELECT pg_sleep(30)"))
    else:
        import psycopg

        aconn = await psycopg.AsyncConnection.connect(dsn, application_name=app)
        token = cancelkit.CancellationToken(timeout=seconds)
        async with transaction(aconn, token=token):
            await aconn.execute("SELECT pg_sleep(30)")


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
