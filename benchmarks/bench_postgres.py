# ruff: noqa: ASYNC110 - polling pg_stat_activity is the measurement
"""Cancel -> the Postgres backend is no longer ``active``: driver alone vs cancelkit.postgres.

For asyncpg and psycopg 3 (asyncio), side by side in one run, interleaved trial by trial:

- ``task.cancel()``: plain asyncio cancellation of the task awaiting ``SELECT pg_sleep(30)``;
- ``anyio scope``: an anyio cancel scope around it (what cancelkit's own scopes are);
- ``cancelkit``: the statement in ``cancelkit.postgres.transaction()``, its token cancelled;

and the same three for SQLAlchemy's ``AsyncSession`` on each driver (``transaction(session)``).

Each trial waits until the backend is ``active``, cancels, and polls ``pg_stat_activity`` from a
second connection until the backend leaves ``active`` (the poll's own round trip, about 0.1 ms,
is included). A trial still active after ``--give-up`` seconds counts as "not stopped" (its
backend is then terminated). Then the same connection runs ``SELECT 1`` ("reusable").
A second part holds a row lock in the cancelled transaction with another transaction waiting
for it, and times cancel -> the waiter gets the lock.

Needs PostgreSQL's ``initdb``/``pg_ctl`` (``CANCELKIT_PG_CTL``, or Debian's ``postgresql``).
Usage: ``python -m benchmarks.bench_postgres [--trials 200] [--give-up 1.0]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import psycopg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

import cancelkit
from benchmarks._util import percentile
from cancelkit.postgres import transaction

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.postgres import PostgresServer, find_pg_ctl


async def connect(driver: str, server: PostgresServer) -> Any:
    if driver == "asyncpg":
        return await asyncpg.connect(server.url)
    return await psycopg.AsyncConnection.connect(server.dsn, autocommit=True)


async def pid_of(driver: str, conn: Any) -> int:
    if driver == "asyncpg":
        return int(conn.get_server_pid())
    return int(conn.info.backend_pid)


async def run(driver: str, conn: Any, query: str) -> None:
    if driver == "asyncpg":
        await conn.execute(query)
    else:
        await conn.execute(query.encode())


async def state(monitor: Any, pid: int) -> str | None:
    value = await monitor.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1", pid)
    return None if value is None else str(value)


async def stop_time(monitor: Any, pid: int, cancel: Any, give_up: float) -> float | None:
    """Once ``pid`` is active: cancel, then seconds until it is not (None: terminated after)."""
    while await state(monitor, pid) != "active":
        await asyncio.sleep(0.0005)
    started = time.perf_counter()
    cancel()
    while time.perf_counter() - started < give_up:
        if await state(monitor, pid) != "active":
            return time.perf_counter() - started
    await monitor.execute("SELECT pg_terminate_backend($1)", pid)
    return None


async def trial(
    driver: str, how: str, server: PostgresServer, monitor: Any, conn: Any, give_up: float
) -> tuple[float | None, bool, Any]:
    """One cancel; returns (seconds to not active or None, reusable, the connection to keep)."""
    pid = await pid_of(driver, conn)
    token = cancelkit.CancellationToken()
    scope = anyio.CancelScope()

    async def work() -> None:
        if how == "cancelkit":
            try:
                async with transaction(conn, token=token):
                    await run(driver, conn, "SELECT pg_sleep(30)")
            except cancelkit.OperationCancelled:
                pass
        elif how == "anyio scope":
            with scope:
                await run(driver, conn, "SELECT pg_sleep(30)")
        else:
            await run(driver, conn, "SELECT pg_sleep(30)")

    task = asyncio.ensure_future(work())
    cancel = {"cancelkit": token.cancel, "anyio scope": scope.cancel, "task.cancel()": task.cancel}
    stopped = await stop_time(monitor, pid, cancel[how], give_up)
    try:
        with anyio.fail_after(give_up + 5):
            await asyncio.gather(task, return_exceptions=True)
            await run(driver, conn, "SELECT 1")
        return stopped, True, conn  # noqa: TRY300
    except Exception:
        await (conn.close() if driver == "psycopg" else asyncio.sleep(0))
        if driver == "asyncpg":
            conn.terminate()
        return stopped, False, await connect(driver, server)


async def lock_trial(driver: str, monitor: Any, conn: Any, waiter: Any, table: str) -> float:
    """cancel -> another transaction waiting for the cancelled one's row lock gets it."""
    token = cancelkit.CancellationToken()
    ready = asyncio.Event()

    async def work() -> None:
        try:
            async with transaction(conn, token=token):
                await run(driver, conn, f"UPDATE {table} SET v = v + 1 WHERE id = 1")
                ready.set()
                await run(driver, conn, "SELECT pg_sleep(30)")
        except cancelkit.OperationCancelled:
            pass

    task = asyncio.ensure_future(work())
    await ready.wait()
    pid = await pid_of(driver, conn)
    waiting = asyncio.ensure_future(waiter.execute(f"UPDATE {table} SET v = v + 10 WHERE id = 1"))
    while (await state(monitor, pid)) != "active" or not await monitor.fetchval(
        "SELECT count(*) FROM pg_locks WHERE NOT granted"
    ):
        await asyncio.sleep(0.0005)
    started = time.perf_counter()
    token.cancel()
    await waiting
    took = time.perf_counter() - started
    await task
    return took


async def session_pid(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())


async def sqlalchemy_trial(
    engine: AsyncEngine, how: str, monitor: Any, give_up: float
) -> tuple[float | None, bool]:
    """One cancel of a session's statement; reusable: the pool's connection is the same after."""
    pid = await session_pid(engine)
    token = cancelkit.CancellationToken()
    scope = anyio.CancelScope()
    sleep = text("SELECT pg_sleep(30)")

    async def work() -> None:
        async with AsyncSession(engine) as session:
            if how == "cancelkit":
                try:
                    async with transaction(session, token=token):
                        await session.execute(sleep)
                except cancelkit.OperationCancelled:
                    pass
            elif how == "anyio scope":
                with scope:
                    await session.execute(sleep)
            else:
                await session.execute(sleep)

    task = asyncio.ensure_future(work())
    cancel = {"cancelkit": token.cancel, "anyio scope": scope.cancel, "task.cancel()": task.cancel}
    stopped = await stop_time(monitor, pid, cancel[how], give_up)
    await asyncio.gather(task, return_exceptions=True)
    return stopped, await session_pid(engine) == pid


async def sqlalchemy_part(
    server: PostgresServer, monitor: Any, trials: int, give_up: float
) -> None:
    for dbapi in ("asyncpg", "psycopg"):
        url = server.url.replace("postgresql://", f"postgresql+{dbapi}://")
        engine = create_async_engine(url, pool_size=1, max_overflow=0)
        kinds = ["task.cancel()", "anyio scope", "cancelkit"]
        times: dict[str, list[float]] = {how: [] for how in kinds}
        reusable = dict.fromkeys(kinds, 0)
        runs = dict.fromkeys(kinds, 0)
        for n in range(trials):
            for how in kinds:
                if how != "cancelkit" and n >= 5 and runs[how] > len(times[how]) == 0:
                    continue  # never stops: 5 trials say so, 200 would take 200 s
                stopped, ok = await sqlalchemy_trial(engine, how, monitor, give_up)
                runs[how] += 1
                reusable[how] += ok
                if stopped is not None:
                    times[how].append(stopped)
        name = f"sa+{dbapi}"
        for how in kinds:
            print(
                f"{name:12} {how:14} {summary(times[how])}  "
                f"{len(times[how]):3}/{runs[how]:<3}  {reusable[how]:3}/{runs[how]}"
            )
        await engine.dispose()


def summary(values: list[float]) -> str:
    if not values:
        return "      —         —"
    return f"{statistics.median(values) * 1e3:7.2f} ms {percentile(values, 99) * 1e3:7.2f} ms"


async def main_async(trials: int, give_up: float) -> None:
    pg_ctl = find_pg_ctl()
    if pg_ctl is None:
        raise SystemExit("PostgreSQL is not installed (apt-get install postgresql)")
    server = PostgresServer(pg_ctl)
    server.start()
    try:
        monitor = await asyncpg.connect(server.url)
        print(f"{trials} trials each, interleaved; not stopped = still active after {give_up} s")
        print(f"{'driver':8} {'how':14} {'median':>10} {'p99':>10}  stopped  reusable")
        for driver in ("asyncpg", "psycopg"):
            kinds = ["task.cancel()", "anyio scope", "cancelkit"]
            conns = {how: await connect(driver, server) for how in kinds}
            times: dict[str, list[float]] = {how: [] for how in kinds}
            reusable = dict.fromkeys(kinds, 0)
            runs = dict.fromkeys(kinds, 0)
            for n in range(trials):
                for how in kinds:
                    if how == "anyio scope" and driver == "psycopg" and n >= 5:
                        continue  # never stops: 5 trials say so, 200 would take 200 s
                    stopped, ok, conns[how] = await trial(
                        driver, how, server, monitor, conns[how], give_up
                    )
                    runs[how] += 1
                    reusable[how] += ok
                    if stopped is not None:
                        times[how].append(stopped)
            for how in kinds:
                print(
                    f"{driver:8} {how:14} {summary(times[how])}  "
                    f"{len(times[how]):3}/{runs[how]:<3}  {reusable[how]:3}/{runs[how]}"
                )
        print(
            "\nSQLAlchemy's AsyncSession (sa+dialect; reusable: the same pooled connection after)"
        )
        await sqlalchemy_part(server, monitor, trials, give_up)
        await monitor.execute("CREATE TABLE bench_locks (id int PRIMARY KEY, v int)")
        await monitor.execute("INSERT INTO bench_locks VALUES (1, 0)")
        print("\nrow lock released after cancel (cancelkit), another transaction waiting:")
        for driver in ("asyncpg", "psycopg"):
            conn = await connect(driver, server)
            waiter = await asyncpg.connect(server.url)
            took = [
                await lock_trial(driver, monitor, conn, waiter, "bench_locks")
                for _ in range(trials)
            ]
            print(f"{driver:8} {'cancelkit':14} {summary(took)}")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--give-up", type=float, default=1.0)
    args = parser.parse_args()
    asyncio.run(main_async(args.trials, args.give_up))


if __name__ == "__main__":
    main()
