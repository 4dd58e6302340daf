"""Stop the Postgres query, not just the task: a token tied to asyncpg or psycopg 3.

Install the extra for your driver (``pip install cancelkit[asyncpg]`` or
``cancelkit[psycopg]``); ``import cancelkit`` never imports a driver, only this module's
functions do, and only the one your connection belongs to.

``async with transaction(conn):`` runs a block in a transaction tied to a
:class:`~cancelkit.CancellationToken` (by default :func:`~cancelkit.current_token`):

- the transaction gets a server-side ``statement_timeout`` from the token's remaining deadline
  at BEGIN (``SET LOCAL``: it ends with the transaction, so a pooled connection never keeps it),
  so the server stops a query even when the client process dies: Postgres applies it to each
  statement from the statement's own start, so with the client dead a transaction of N
  statements is bounded by N times the time left at BEGIN;
- when the token is cancelled, the driver's cancel request is sent, shielded and bounded by
  ``cancel_timeout``, and the block raises :exc:`~cancelkit.OperationCancelled`;
- the transaction is then rolled back (its row locks are released), and the connection goes
  back to its pool clean, or, when that cannot be done in time (the cancel request failed, the
  server did not answer), it is closed so that the pool replaces it: never returned busy or
  ``idle in transaction``. A failing cancel raises nothing of its own: it is logged on the
  ``cancelkit`` logger and :attr:`PostgresTransaction.outcome` says what became of the
  connection.

``with transaction(conn):`` does the same for a sync ``psycopg.Connection`` in a worker thread
(:func:`anyio.to_thread.run_sync`, which carries :func:`~cancelkit.current_token` into the
thread): the way to reach Postgres from trio, where neither driver's async mode runs. A thread
cannot be interrupted, its socket can: a statement still running ``cancel_timeout`` after its
cancel request has its socket shut down (the connection is discarded); Python code between
statements runs on to the next statement or the block's end, which then raises.

.. versionadded:: 0.1
"""

from ._transaction import PostgresTransaction as PostgresTransaction
from ._transaction import TransactionOutcome as TransactionOutcome
from ._transaction import transaction as transaction

__all__ = ["PostgresTransaction", "TransactionOutcome", "transaction"]

for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
