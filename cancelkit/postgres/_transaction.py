"""PostgresTransaction: a transaction tied to a token, for asyncpg and psycopg 3."""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from types import TracebackType
from typing import Any, Literal, TypeAlias, final

import anyio
import anyio.to_thread

from .. import CancellationToken, OperationCancelled, current_token

__all__ = ["PostgresTransaction", "TransactionOutcome", "transaction"]

logger = logging.getLogger("cancelkit")

#: SQLSTATE of "canceling statement due to user request / statement timeout".
_QUERY_CANCELED = "57014"


class TransactionOutcome(enum.StrEnum):
    """What became of the transaction and its connection.

    .. versionadded:: 0.1
    """

    #: The block ended normally and the transaction committed.
    COMMITTED = "committed"
    #: The block failed or was cancelled; no statement runs, the transaction is rolled back
    #: (its locks are released) and the connection is clean: its pool may hand it out again.
    ROLLED_BACK = "rolled_back"
    #: The connection could not be made clean within ``cancel_timeout`` (the cancel request
    #: failed, the server did not answer, the driver had closed it): it is closed, and its pool
    #: replaces it. A statement still running on the server stops at its ``statement_timeout``
    #: (when the token has a deadline) or when the server next writes to the closed socket.
    DISCARDED = "discarded"


Driver: TypeAlias = Literal["asyncpg", "psycopg", "psycopg-sync", "sqlalchemy"]


def driver_of(conn: object) -> Driver:
    """Which driver ``conn`` belongs to, without importing one that is not loaded."""
    sqlalchemy = sys.modules.get("sqlalchemy.ext.asyncio")
    if sqlalchemy is not None and isinstance(conn, sqlalchemy.AsyncSession):
        return "sqlalchemy"
    asyncpg = sys.modules.get("asyncpg")
    if asyncpg is not None and isinstance(conn, asyncpg.Connection):  # pool proxies too
        return "asyncpg"
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(conn, psycopg.AsyncConnection):
        return "psycopg"
    if psycopg is not None and isinstance(conn, psycopg.Connection):
        return "psycopg-sync"
    raise TypeError(
        "transaction() takes an asyncpg connection (or pool connection), a psycopg 3 "
        f"connection or a SQLAlchemy AsyncSession, not {type(conn).__name__}"
    )


def _timeout_ms(token: CancellationToken) -> int | None:
    """The token's remaining time as a ``statement_timeout`` in ms (never 0: that is "off")."""
    if token.deadline == math.inf:
        return None
    return max(1, math.ceil((token.deadline - time.monotonic()) * 1000))


@final
class PostgresTransaction:
    """A transaction tied to a token; made by :func:`transaction`.

    Use it once, with ``async with`` (asyncpg, ``psycopg.AsyncConnection``) or ``with`` (a sync
    ``psycopg.Connection`` in a worker thread).

    .. versionadded:: 0.1
    """

    __slots__ = (
        "_cm",
        "_conn",
        "_driver",
        "cancel_timeout",
        "error",
        "outcome",
        "statement_timeout",
        "token",
    )

    def __init__(self, conn: object, token: CancellationToken, cancel_timeout: float) -> None:
        self._conn: Any = conn
        self._driver = driver_of(conn)
        self._cm: Any = None
        #: The token the transaction follows.
        self.token = token
        #: The most seconds the cancel, the rollback and the release may take together.
        self.cancel_timeout = cancel_timeout
        #: The ``statement_timeout`` set at BEGIN, in ms, for each statement (None: no deadline).
        self.statement_timeout: int | None = None
        #: Set on exit: what became of the transaction and its connection.
        self.outcome: TransactionOutcome | None = None
        #: Why the connection was discarded (the cancel's or the rollback's error), if it was.
        self.error: BaseException | None = None

    # -- the two ways in -------------------------------------------------------------------

    async def __aenter__(self) -> PostgresTransaction:
        if self._driver == "psycopg-sync":
            raise TypeError("a sync psycopg.Connection takes 'with transaction(conn)'")
        if self._cm is not None:
            raise RuntimeError("a PostgresTransaction can only be entered once")
        if self._driver == "sqlalchemy":
            from ._sqlalchemy import session_transaction

            self._cm = session_transaction(self, self._conn)
        else:
            self._cm = self._asyncpg() if self._driver == "asyncpg" else self._psycopg()
        return await self._cm.__aenter__()  # type: ignore[no-any-return]

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return bool(await self._cm.__aexit__(exc_type, exc, tb))

    def __enter__(self) -> PostgresTransaction:
        if self._driver != "psycopg-sync":
            raise TypeError("an async connection takes 'async with transaction(conn)'")
        if self._cm is not None:
            raise RuntimeError("a PostgresTransaction can only be entered once")
        self._cm = self._sync()
        return self._cm.__enter__()  # type: ignore[no-any-return]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return bool(self._cm.__exit__(exc_type, exc, tb))

    # -- asyncpg -------------------------------------------------------------------------------

    @asynccontextmanager
    async def _asyncpg(self) -> AsyncIterator[PostgresTransaction]:
        # asyncpg sends its cancel request itself, from a task of its own, when the awaiting task
        # is cancelled; the next statement (our rollback) waits for the server's answer to it.
        conn = self._conn
        set_timeout = begin(self)
        tx = conn.transaction()
        with anyio.CancelScope(shield=True), anyio.fail_after(self.cancel_timeout):
            await tx.start()  # cut short, it would leave the connection in an unknown state
            if set_timeout is not None:
                await conn.execute(set_timeout)
        committing = False
        try:
            with self.token.scope():
                yield self
            self.token.raise_if_cancelled()  # cancelled, not interrupted: never commit
            committing = True
            with anyio.CancelScope(shield=True):  # cut short, it would leave an unknown state
                await tx.commit()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._settle_asyncpg(tx, committing)
            stopped = stopped_by(self.token, exc)
            if stopped is exc:
                raise
            raise stopped from exc
        self.outcome = TransactionOutcome.COMMITTED

    async def _settle_asyncpg(self, tx: Any, committed: bool) -> None:
        conn = self._conn
        try:
            with anyio.fail_after(self.cancel_timeout):
                if not committed:
                    await tx.rollback()
                _check_clean(conn.is_closed() or conn.is_in_transaction())
        except Exception as error:  # a failed cancel (asyncpg#1310's raw ConnectionError), ...
            conn.terminate()
            discarded(self, error, "the cancel or the rollback failed or timed out")
            return
        self.outcome = TransactionOutcome.ROLLED_BACK

    # -- psycopg (asyncio) -------------------------------------------------------------------

    @asynccontextmanager
    async def _psycopg(self) -> AsyncIterator[PostgresTransaction]:
        # psycopg cancels the statement itself when its task is cancelled once; an anyio cancel
        # scope cancels again while it waits for the server, and psycopg then closes the
        # connection with the statement still running. So nothing interrupts a statement: the
        # block is shielded (an enclosing scope's cancellation, the token's own TokenScope
        # included, waits for it to end), and a watcher sends the cancel request and interrupts
        # the block only once the statement has ended (psycopg's lock is free), or after
        # cancel_timeout.
        conn = self._conn
        set_timeout = begin(self)
        key = conn.pgconn.get_cancel()  # still usable after psycopg closed the connection
        tx = conn.transaction()
        with anyio.CancelScope(shield=True), anyio.fail_after(self.cancel_timeout):
            await tx.__aenter__()  # cut short, it would leave the connection in an unknown state
            if set_timeout is not None:
                await conn.execute(set_timeout)
        try:
            with anyio.CancelScope(shield=True) as scope:  # cancelled by the watcher only
                watcher = asyncio.get_running_loop().create_task(self._watch(scope))
                try:
                    yield self
                finally:
                    if not self.token.cancelled:
                        watcher.cancel()  # else let it end: a cancel request cut short may
                        # still reach the server, late, and cancel the next statement
                    with anyio.CancelScope(shield=True):
                        await asyncio.wait([watcher])
            self.token.raise_if_cancelled()  # whether or not it interrupted the block
            with anyio.CancelScope(shield=True):  # cut short, psycopg would close the connection
                await tx.__aexit__(None, None, None)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._settle_psycopg(tx, key, exc)
            stopped = stopped_by(self.token, exc)
            if stopped is exc:
                raise
            raise stopped from exc
        self.outcome = TransactionOutcome.COMMITTED

    async def _watch(self, scope: anyio.CancelScope) -> None:
        conn = self._conn
        await self.token.wait()
        try:
            with anyio.fail_after(self.cancel_timeout):
                if conn.info.transaction_status == _psycopg_active():
                    await conn.cancel_safe(timeout=self.cancel_timeout)
                    async with conn.lock:  # held by the statement until it has ended
                        pass
        except Exception as error:  # the cancel request failed or the statement went on
            self.error = error
            logger.warning("postgres: the cancel request failed (token %r): %r", self.token, error)
        finally:
            scope.cancel()

    async def _settle_psycopg(self, tx: Any, key: Any, exc: BaseException) -> None:
        conn = self._conn
        try:
            with anyio.fail_after(self.cancel_timeout):
                if not conn.closed:
                    await tx.__aexit__(type(exc), exc, exc.__traceback__)
                _check_clean(conn.closed or conn.info.transaction_status != _psycopg_idle())
        except Exception as settle_error:
            error: BaseException = settle_error
            closed_by_driver = conn.closed
            await conn.close()
            if closed_by_driver:  # its statement may still run: stop it with the saved key
                with anyio.move_on_after(self.cancel_timeout):
                    try:
                        await anyio.to_thread.run_sync(key.cancel, abandon_on_cancel=True)
                    except Exception as cancel_error:
                        error = self.error = self.error or cancel_error
            discarded(self, self.error or error, "the cancel or the rollback failed or timed out")
            return
        self.outcome = TransactionOutcome.ROLLED_BACK

    # -- psycopg (sync, in a worker thread) --------------------------------------------------

    @contextmanager
    def _sync(self) -> Iterator[PostgresTransaction]:
        conn = self._conn
        set_timeout = begin(self)
        canceller = _ThreadCanceller(self)
        handle = self.token.on_cancel(lambda _: canceller.start())  # BEGIN is watched too
        try:
            try:
                with conn.transaction():
                    if set_timeout is not None:
                        conn.execute(set_timeout)
                    try:
                        yield self
                        self.token.raise_if_cancelled()  # cancelled between statements
                    except BaseException:
                        canceller.settle()  # the rollback: no cancel request, but bounded
                        raise
                    handle.unregister()
                    canceller.stop()  # the commit is never interrupted
            finally:
                handle.unregister()
                canceller.stop()
        except BaseException as exc:
            if conn.closed or conn.info.transaction_status != _psycopg_idle():
                conn.close()
                discarded(self, self.error or exc, "the cancel or the rollback failed")
            else:
                self.outcome = TransactionOutcome.ROLLED_BACK
            stopped = stopped_by(self.token, exc)
            if canceller.interrupted and self.token.reason and isinstance(exc, Exception):
                stopped = OperationCancelled(self.token.reason)
            if stopped is exc:
                raise
            raise stopped from exc
        self.outcome = TransactionOutcome.COMMITTED


@final
class _ThreadCanceller:
    """Stops the statements of a sync psycopg transaction once its token is cancelled.

    From the cancellation until the block ends, a thread of its own (the token may be cancelled
    in an event loop's thread: never block it) watches the connection: a statement in flight,
    or one started later, gets the cancel request; one still running ``cancel_timeout`` after
    its cancel request (the request failed, the server did not answer) has its socket shut
    down, which wakes the worker thread blocked on it (the connection is then discarded).
    """

    __slots__ = ("conn", "ended", "interrupted", "lock", "settling", "thread", "tx")

    #: Seconds between two looks at the connection, from the cancellation to the block's end.
    POLL = 0.005

    def __init__(self, tx: PostgresTransaction) -> None:
        self.tx = tx
        self.conn: Any = tx._conn
        self.ended = threading.Event()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        self.settling = False
        #: Whether the socket was shut down (the block's error is then ours).
        self.interrupted = False

    def start(self) -> None:
        with self.lock:  # stop() either sees the started thread, or start() sees it ended
            if self.ended.is_set():
                return
            thread = threading.Thread(target=self._run, name="cancelkit-pg-cancel", daemon=True)
            thread.start()
            self.thread = thread

    def settle(self) -> None:
        """Send no more cancel requests; bound the statement still running (the rollback).

        A statement still running ``cancel_timeout`` from now has its socket shut down.
        """
        with self.lock:
            self.settling = True

    def stop(self) -> None:
        with self.lock:
            self.ended.set()
            thread = self.thread
        if thread is not None:
            thread.join()  # bounded: cancel_safe() by cancel_timeout, the rest by POLL

    def _run(self) -> None:
        give_up: float | None = None  # cancel_timeout after the statement's cancel request
        settling = False
        while not self.ended.is_set():
            with self.lock:  # settle() and stop() wait for a cancel request being sent
                if self.ended.is_set():
                    return
                if self.settling and not settling:  # the rollback's bound starts now
                    settling, give_up = True, time.monotonic() + self.tx.cancel_timeout
                if self.conn.pgconn.transaction_status != _psycopg_active():
                    if not settling:
                        give_up = None  # between statements: the next one is cancelled too
                elif give_up is None:
                    give_up = time.monotonic() + self.tx.cancel_timeout
                    self._cancel()
                elif time.monotonic() > give_up:
                    self._shut_down()
                    return
            self.ended.wait(self.POLL)

    def _cancel(self) -> None:
        try:
            self.conn.cancel_safe(timeout=self.tx.cancel_timeout)
        except Exception as error:
            self.tx.error = error
            logger.warning(
                "postgres: the cancel request failed (token %r): %r", self.tx.token, error
            )

    def _shut_down(self) -> None:
        try:
            fd = self.conn.pgconn.socket
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)  # the worker's wait for the server returns
        except Exception as error:  # the connection closed meanwhile
            self.tx.error = self.tx.error or error
        self.interrupted = True


# -- shared by every driver (module functions: _sqlalchemy.py uses them too) -----------------


def begin(tx: PostgresTransaction) -> str | None:
    """Check the token; return the ``SET LOCAL`` to run first, if it has a deadline."""
    tx.token.raise_if_cancelled()
    tx.statement_timeout = _timeout_ms(tx.token)
    if tx.statement_timeout is None:
        return None
    return f"SET LOCAL statement_timeout = {tx.statement_timeout}"


def stopped_by(token: CancellationToken, exc: BaseException) -> BaseException:
    """The exception a block ends with: ours for a statement our token stopped.

    The server's "canceling statement" error is found on the exception, on what it wraps
    (SQLAlchemy's ``orig``) or on its cause (the driver's error a wrapper was raised from).
    """
    reason = token.reason
    seen: BaseException | None = exc
    for _ in range(3):
        if reason is None or seen is None:
            break
        if getattr(seen, "sqlstate", None) == _QUERY_CANCELED:
            return OperationCancelled(reason)
        seen = getattr(seen, "orig", None) or seen.__cause__
    return exc


def discarded(tx: PostgresTransaction, error: BaseException | None, what: str) -> None:
    tx.outcome = TransactionOutcome.DISCARDED
    tx.error = error
    logger.warning(
        "postgres: %s; connection discarded (token %r)%s",
        what,
        tx.token,
        f": {error!r}" if error is not None else "",
    )


def _check_clean(dirty: bool) -> None:
    if dirty:
        raise RuntimeError("the connection is closed or still in a transaction")


def _psycopg_active() -> object:
    from psycopg.pq import TransactionStatus

    return TransactionStatus.ACTIVE


def _psycopg_idle() -> object:
    from psycopg.pq import TransactionStatus

    return TransactionStatus.IDLE


def transaction(
    conn: object,
    *,
    token: CancellationToken | None = None,
    cancel_timeout: float = 5.0,
) -> PostgresTransaction:
    """Run a block in a transaction that stops on the server when ``token`` is cancelled.

    Works with connections as your code gets them: ``asyncpg.connect()``, an asyncpg pool's
    ``acquire()``, ``psycopg.AsyncConnection.connect()``, a ``psycopg_pool`` connection, and a
    sync ``psycopg.Connection`` used with ``with`` in a worker thread, and SQLAlchemy's
    ``AsyncSession`` (asyncpg or psycopg dialect; the session's transaction, committed at the
    end). Inside an existing transaction it becomes a savepoint (its ``statement_timeout`` then
    lasts until the outer transaction ends).

    The ``statement_timeout`` is the token's time left at BEGIN, and Postgres applies it to each
    statement from that statement's start: the server alone (the client process dead) bounds a
    transaction of N statements by N times that budget, not by the deadline.

    Args:
        conn: an ``asyncpg.Connection`` or pool connection, a ``psycopg.AsyncConnection``, a
            sync ``psycopg.Connection`` or a SQLAlchemy ``AsyncSession`` (checked when called).
        token: the token to follow; :func:`~cancelkit.current_token` when omitted.
        cancel_timeout: the most seconds the cancel request, the wait for the statement to
            end and the rollback may take before the connection is discarded instead.

    Returns:
        The context manager; it yields itself, and its ``outcome`` is set on exit.

    Raises:
        TypeError: if ``conn`` is not an asyncpg or psycopg 3 connection or an ``AsyncSession``.
        RuntimeError: if no token is given and there is no current token.
        ValueError: if ``cancel_timeout`` is not a positive number.
        OperationCancelled: (from the block) when the token stopped the work.

    .. versionadded:: 0.1
    """
    if token is None:
        token = current_token()
        if token is None:
            raise RuntimeError("transaction() needs a token: pass token= or run inside a scope")
    if not cancel_timeout > 0:
        raise ValueError(f"cancel_timeout must be a positive number, not {cancel_timeout!r}")
    return PostgresTransaction(conn, token, cancel_timeout)
