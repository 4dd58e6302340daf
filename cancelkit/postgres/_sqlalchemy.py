"""SQLAlchemy's AsyncSession tied to a token: SQLAlchemy is never interrupted in a statement.

SQLAlchemy takes a cancellation that reaches it in a statement for a lost connection and
invalidates (closes) the connection. Under anyio's cancel scopes, which cancel again at every
await, that close is cut short in turn and becomes an abort, which also kills the cancel request
the driver had just started: the query runs on on the server (measured: 50 of 50 cancelled
``pg_sleep(30)`` still active, asyncpg and psycopg alike; sqlalchemy#8145, #12077, asyncpg#1156).

So nothing interrupts SQLAlchemy: the block is shielded from every cancellation, as for psycopg.
When the token is cancelled, a watcher sends the driver's own cancel request for the statement
in flight, from a task of its own, and waits until the statement has ended: with the server's
"canceling statement" error, an ordinary exception to SQLAlchemy (the connection stays good).
Only then does the watcher interrupt the block, wherever it waits (never in a statement); a
statement the block starts after the token was cancelled raises at once. The statements are
seen through SQLAlchemy's own events (``before_cursor_execute``, ``after_cursor_execute``,
``handle_error``), listened to once per engine; they do nothing for a connection outside this
module's transactions but one dictionary look-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, final

import anyio

from .. import CancellationToken
from ._transaction import (
    PostgresTransaction,
    TransactionOutcome,
    begin,
    discarded,
    driver_of,
    logger,
    stopped_by,
)

__all__ = ["session_transaction"]


@final
class _Statement:
    """Whether a statement of one transaction's connection is in flight."""

    __slots__ = ("ended", "running", "token")

    def __init__(self, token: CancellationToken) -> None:
        self.token = token
        self.running = False
        self.ended: anyio.Event | None = None  # set by the watcher, waiting for the end

    def start(self) -> None:
        self.token.raise_if_cancelled()  # no statement starts once the token is cancelled
        self.running = True

    def end(self) -> None:
        self.running = False
        if self.ended is not None:
            self.ended.set()


#: The transactions' connections (SQLAlchemy ``Connection`` objects) and their statements.
_statements: weakref.WeakKeyDictionary[Any, _Statement] = weakref.WeakKeyDictionary()


def _before(conn: Any, *_: Any) -> None:
    statement = _statements.get(conn)
    if statement is not None:
        statement.start()


def _after(conn: Any, *_: Any) -> None:
    statement = _statements.get(conn)
    if statement is not None:
        statement.end()


def _failed(context: Any) -> None:
    statement = None if context.connection is None else _statements.get(context.connection)
    if statement is not None:
        statement.end()


def _listen(engine: Any) -> None:
    """Listen to ``engine``'s statements (once per engine)."""
    from sqlalchemy import event

    for name, listener in (
        ("before_cursor_execute", _before),
        ("after_cursor_execute", _after),
        ("handle_error", _failed),
    ):
        if not event.contains(engine, name, listener):
            event.listen(engine, name, listener)


def _closed(driver: Any) -> bool:
    """Whether the driver closed its connection (asyncpg does after a failed cancel request)."""
    return bool(driver.is_closed() if driver_of(driver) == "asyncpg" else driver.closed)


def _canceller(driver: Any, timeout: float) -> Callable[[], Awaitable[None]]:
    """The driver connection's cancel request, as a coroutine function."""
    kind = driver_of(driver)
    if kind == "asyncpg":

        async def cancel_asyncpg() -> None:
            # asyncpg has no public cancel: this is what it runs itself when a statement's
            # task is cancelled (asyncpg 0.29 to 0.32), with a waiter of ours. A failure
            # closes the connection (0.30+) or is set on the waiter (0.29).
            waiter = asyncio.get_running_loop().create_future()
            driver._cancel_current_command(waiter)
            with contextlib.suppress(ConnectionResetError):  # the server read it, then reset
                await waiter

        return cancel_asyncpg
    if kind == "psycopg":
        return lambda: driver.cancel_safe(timeout=timeout)
    raise TypeError(f"transaction(session) needs asyncpg or psycopg under SQLAlchemy, not {kind}")


@asynccontextmanager
async def session_transaction(
    tx: PostgresTransaction, session: Any
) -> AsyncIterator[PostgresTransaction]:
    """``transaction(session)``: the session's transaction, tied to ``tx.token``."""
    set_timeout = begin(tx)
    with anyio.CancelScope(shield=True), anyio.fail_after(tx.cancel_timeout):
        conn = await session.connection()  # begins the session's transaction if need be
        driver = (await conn.get_raw_connection()).driver_connection
        cancel = _canceller(driver, tx.cancel_timeout)
        if set_timeout is not None:
            await conn.exec_driver_sql(set_timeout)
    _listen(conn.sync_engine)
    statement = _statements[conn.sync_connection] = _Statement(tx.token)
    try:
        with anyio.CancelScope(shield=True) as scope:  # cancelled by the watcher only
            watcher = asyncio.get_running_loop().create_task(_watch(tx, scope, statement, cancel))
            try:
                yield tx
            finally:
                if not tx.token.cancelled:
                    watcher.cancel()  # else let it end: see _watch
                with anyio.CancelScope(shield=True):
                    await asyncio.wait([watcher])
        tx.token.raise_if_cancelled()  # whether or not it interrupted the block
        with anyio.CancelScope(shield=True):  # cut short, SQLAlchemy would close the connection
            await session.commit()
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await _settle(tx, session, conn, _closed(driver))
        stopped = stopped_by(tx.token, exc)
        if stopped is exc:
            raise
        raise stopped from exc
    finally:
        _statements.pop(conn.sync_connection, None)
    tx.outcome = TransactionOutcome.COMMITTED


async def _watch(
    tx: PostgresTransaction,
    scope: anyio.CancelScope,
    statement: _Statement,
    cancel: Callable[[], Awaitable[None]],
) -> None:
    """On the token's cancellation: stop the statement in flight, then interrupt the block.

    Never cut short once the token fired: a cancel request cut short may still reach the
    server, late, and cancel the next statement of the connection (its next user's).
    """
    await tx.token.wait()
    try:
        with anyio.fail_after(tx.cancel_timeout):
            if statement.running:
                ended = statement.ended = anyio.Event()
                await cancel()
                await ended.wait()
    except Exception as error:  # the cancel request failed or the statement went on
        tx.error = error
        logger.warning("postgres: the cancel request failed (token %r): %r", tx.token, error)
    finally:
        scope.cancel()


async def _settle(tx: PostgresTransaction, session: Any, conn: Any, closed: bool) -> None:
    """Roll the session back; its connection goes back to the pool clean, or is discarded."""
    # closed (by SQLAlchemy or by the driver), or a cancel request astray
    lost = closed or conn.invalidated or tx.error is not None
    try:
        with anyio.fail_after(tx.cancel_timeout):
            if lost and not conn.invalidated:
                await conn.invalidate()
            await session.rollback()
    except Exception as error:
        discarded(tx, tx.error or error, "the rollback failed or timed out")
        return
    if lost:
        discarded(tx, tx.error, "the cancel request failed or the connection was lost")
        return
    tx.outcome = TransactionOutcome.ROLLED_BACK
