"""BackgroundOperations: work started by a request that outlives it, stopped by id later.

The name says what the object is — the application's background operations, as one owned
collection (like a task group) — rather than what it does (an ``OperationRunner`` would also
fit a one-off helper that runs a single call). Its parts reuse the vocabulary of the rest of
cancelkit: an *operation* has an id and an owner, as in :class:`~cancelkit.TokenRegistry`;
it is cancelled with a :class:`~cancelkit.CancelReason`; refusals are
:exc:`~cancelkit.RegistryFull` and :exc:`~cancelkit.OperationExists`.

.. versionadded:: 0.1
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, TypeVarTuple, Unpack, final

import anyio
from anyio.abc import TaskGroup

from ._exceptions import OperationCancelled, OperationExists, RegistryFull
from ._reason import CancelKind, CancelReason
from ._registry import TokenRegistry, TrackedOperation, _check
from ._status import (
    OperationError,
    OperationState,
    OperationStatus,
    Progress,
    _check_json,
    _cut,
    _progress,
)
from ._stopping import on_stop_signal
from ._token import CancellationToken
from .backends import CancelOutcome, MemoryStatusStore, StatusStore

__all__ = ["BackgroundOperations", "OperationsStatistics"]

logger = logging.getLogger("cancelkit.operations")

PosArgsT = TypeVarTuple("PosArgsT")


def _keep_json(value: object) -> Any:
    """The default ``result=``: keep a JSON-serializable return value, drop anything else."""
    try:
        _check_json(value)
    except (TypeError, ValueError):
        logger.debug("an operation's result of type %s is not JSON; kept None", type(value))
        return None
    return value


def _check_seconds(*, grace: float, cleanup_timeout: float, poll_interval: float) -> None:
    for name, value in (("grace", grace), ("cleanup_timeout", cleanup_timeout)):
        if not 0 <= value < math.inf:
            raise ValueError(f"{name} must be seconds >= 0, not {value!r}")
    if not 0 < poll_interval < math.inf:
        raise ValueError(f"poll_interval must be seconds > 0, not {poll_interval!r}")


@final
@dataclass(frozen=True, slots=True)
class OperationsStatistics:
    """A snapshot of a :class:`BackgroundOperations`, from its ``statistics()``.

    Attributes:
        running: operations of this process started and not yet ended.
        started: operations started since it was made (refusals not counted).
        completed: of the ended ones, how many completed.
        failed: how many failed.
        cancelled: how many were cancelled, by the kind of the root reason.
        refused: starts refused by a limit (:exc:`~cancelkit.RegistryFull`).

    .. versionadded:: 0.1
    """

    running: int
    started: int
    completed: int
    failed: int
    cancelled: Mapping[CancelKind, int]
    refused: int


_current: ContextVar[_Run | None] = ContextVar("cancelkit_operation", default=None)

_SHUTDOWN = "the application is shutting down"


@final
class _Run:
    """One operation of this process, from its reservation by start() to its end."""

    __slots__ = ("begun", "done", "id", "op", "owner", "refusal", "status", "token", "writing")

    def __init__(self, id: str, owner: str | None) -> None:
        self.id = id
        self.owner = owner
        self.token: CancellationToken | None = None
        self.op: TrackedOperation | None = None
        self.status: OperationStatus | None = None
        self.done = anyio.Event()
        self.begun = anyio.Event()  # set once it began, ended before it began, or was refused
        self.refusal: BaseException | None = None  # why the start was refused, for start()
        self.writing = False  # a progress write is in flight (later reports coalesce into it)

    async def execute(
        self, ops: BackgroundOperations, func: Callable[..., Awaitable[Any]], args: tuple[Any, ...]
    ) -> None:
        """Register, write ``running``, tell start() it began, run ``func``, write the end.

        It runs in the operations' task group from the first step, so the caller of start()
        can be cancelled at any moment without interrupting it: the start either completes
        (and the operation runs) or is refused (and leaves nothing); start() reads which.
        """
        store, runs = ops._store, ops._runs
        status = OperationStatus(
            self.id, self.owner, OperationState.RUNNING, time.time(), worker=store.worker
        )
        final: OperationStatus
        began = False
        context = _current.set(self)
        try:
            async with ops._registry.track(self.id, owner=self.owner) as op:
                self.token, self.op = op.token, op
                if runs.shutdown is not None:  # it registered after the shutdown cancelled
                    op.token.cancel(runs.shutdown)
                self.status = status
                await store.put(status)
                began = True
                runs.started += 1
                self.begun.set()
                value = await func(*args)
        except OperationCancelled as exc:  # by id, at shutdown, or by a tombstone before it began
            final = self._ended(status, OperationState.CANCELLED, reason=exc.reason)
        except anyio.get_cancelled_exc_class():
            if not began:  # the task group was cancelled before the operation began
                self._refuse(runs, OperationCancelled(CancelReason(CancelKind.SHUTDOWN, _SHUTDOWN)))
                raise
            # the task group itself was cancelled (shutdown, after cleanup_timeout)
            reason = None if self.token is None else self.token.reason
            if reason is None:
                reason = CancelReason(CancelKind.SHUTDOWN, _SHUTDOWN)
            final = self._ended(status, OperationState.CANCELLED, reason=reason)
            with anyio.CancelScope(shield=True):
                await self._finish(ops, final)
            raise
        except Exception as exc:
            if not began:  # OperationExists, RegistryFull, the store's error: for start()
                self._refuse(runs, exc)
                return
            logger.exception("background operation %r failed", self.id)
            final = self._failed(status, exc)
        else:
            final = self._completed(ops, status, value)
        finally:
            _current.reset(context)
        await self._finish(ops, final)

    def _refuse(self, runs: _Runs, exc: BaseException) -> None:
        """The start was refused: give the place back and hand ``exc`` to start()."""
        self.refusal = exc
        runs.forget(self)
        self.begun.set()

    def _completed(
        self, ops: BackgroundOperations, status: OperationStatus, value: Any
    ) -> OperationStatus:
        """The completed status, or a failed one if ``result=`` fails or keeps a non-JSON value."""
        try:
            kept = ops._result(value)
        except Exception as exc:
            logger.exception("result= failed for background operation %r", self.id)
            return self._failed(status, exc)
        try:
            _check_json(kept)
        except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
            logger.exception("result= kept a value that is not JSON for operation %r", self.id)
            error = OperationError(
                "ResultNotJSON",
                _cut(f"the operation's result (as kept by result=) is not JSON: {exc}"),
            )
            return self._ended(status, OperationState.FAILED, error=error)
        return self._ended(status, OperationState.COMPLETED, result=kept)

    def _failed(self, status: OperationStatus, exc: Exception) -> OperationStatus:
        error = OperationError(type(exc).__name__, _cut(str(exc)))
        return self._ended(status, OperationState.FAILED, error=error)

    def _ended(
        self, status: OperationStatus, state: OperationState, **fields: Any
    ) -> OperationStatus:
        progress = None if self.status is None else self.status.progress
        return replace(status, state=state, ended_at=time.time(), progress=progress, **fields)

    async def _finish(self, ops: BackgroundOperations, final: OperationStatus) -> None:
        self.status = final
        ops._runs.count(final)
        try:
            with anyio.CancelScope(shield=True):
                await ops._store.put(final)
        except Exception:
            logger.exception("could not write the final status of operation %r", self.id)
        finally:
            ops._runs.forget(self)
            self.begun.set()  # cancelled before it began (a tombstone): start() returns the id

    async def report(self, store: StatusStore, progress: Progress) -> None:
        """Record ``progress``; write it unless a write is in flight (that one writes it)."""
        assert self.status is not None
        self.status = replace(self.status, progress=progress)
        if self.writing:
            return  # the write in flight picks up the newest status when it is done
        self.writing = True
        try:
            written: OperationStatus | None = None
            while (status := self.status) is not written and not status.state.ended:
                await store.put(status)
                written = status
        except Exception as exc:  # a lost progress report must not end the operation
            logger.warning("progress of operation %r not written: %s", self.id, exc)
        finally:
            self.writing = False


@final
class _Runs:
    """The operations running in this process: limits, the idle wait, counters."""

    __slots__ = (
        "by_name",
        "cancelled",
        "completed",
        "failed",
        "idle",
        "max_running",
        "max_running_per_owner",
        "per_owner",
        "refused",
        "shutdown",
        "started",
    )

    def __init__(self, max_running: int, max_running_per_owner: int | None) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, not {max_running!r}")
        if max_running_per_owner is not None and max_running_per_owner < 1:
            raise ValueError(
                f"max_running_per_owner must be None or >= 1, not {max_running_per_owner!r}"
            )
        self.max_running = max_running
        self.max_running_per_owner = max_running_per_owner
        self.by_name: dict[tuple[str | None, str], _Run] = {}
        self.per_owner: dict[str | None, int] = {}
        self.idle: anyio.Event | None = None
        self.shutdown: CancelReason | None = None  # set once running operations were cancelled
        self.started = self.completed = self.failed = self.refused = 0
        self.cancelled = dict.fromkeys(CancelKind, 0)

    def reserve(self, id: str, owner: str | None) -> _Run:
        """Take a place for a new operation, or refuse it (nothing recorded then)."""
        if (owner, id) in self.by_name:
            raise OperationExists(id)
        if len(self.by_name) >= self.max_running:
            self.refused += 1
            raise RegistryFull("max_running", self.max_running)
        per_owner = self.per_owner.get(owner, 0)
        if self.max_running_per_owner is not None and per_owner >= self.max_running_per_owner:
            self.refused += 1
            raise RegistryFull("max_running_per_owner", self.max_running_per_owner)
        run = self.by_name[(owner, id)] = _Run(id, owner)
        self.per_owner[owner] = per_owner + 1
        return run

    def get(self, id: str, owner: str | None) -> _Run | None:
        return self.by_name.get((owner, id))

    def forget(self, run: _Run) -> None:
        """Give the place back (once; later calls do nothing) and wake the waiters."""
        name = (run.owner, run.id)
        if self.by_name.get(name) is not run:
            return
        del self.by_name[name]
        left = self.per_owner[run.owner] - 1
        if left:
            self.per_owner[run.owner] = left
        else:
            del self.per_owner[run.owner]
        run.done.set()
        if not self.by_name and self.idle is not None:
            self.idle.set()

    def count(self, final: OperationStatus) -> None:
        if final.state is OperationState.COMPLETED:
            self.completed += 1
        elif final.state is OperationState.FAILED:
            self.failed += 1
        elif final.reason is not None:
            self.cancelled[final.reason.root.kind] += 1

    async def drain(self, grace: float, cleanup_timeout: float) -> None:
        """Wait ``grace`` for the end, cancel with reason shutdown, wait ``cleanup_timeout``."""
        if self.by_name:
            with anyio.move_on_after(grace):
                await self.wait_idle()
        if self.by_name:
            self.cancel_all(CancelReason(CancelKind.SHUTDOWN, _SHUTDOWN))
            with anyio.move_on_after(cleanup_timeout):
                await self.wait_idle()
        if self.by_name:
            logger.warning(
                "%d background operation(s) still running %.1f s after the shutdown "
                "cancellation; cancelling their task group",
                len(self.by_name),
                cleanup_timeout,
            )

    async def wait_idle(self) -> None:
        while self.by_name:
            self.idle = idle = anyio.Event()
            await idle.wait()

    def cancel_all(self, reason: CancelReason) -> None:
        """Cancel every running operation; one still registering cancels itself."""
        self.shutdown = reason
        for run in list(self.by_name.values()):
            if run.token is not None:
                run.token.cancel(reason)

    def statistics(self) -> OperationsStatistics:
        return OperationsStatistics(
            running=len(self.by_name),
            started=self.started,
            completed=self.completed,
            failed=self.failed,
            cancelled={kind: n for kind, n in self.cancelled.items() if n},
            refused=self.refused,
        )

    def __len__(self) -> int:
        return len(self.by_name)


@final
class BackgroundOperations:
    """Runs work that outlives the request that started it, cancellable by id from anywhere.

    Enter it in the application's lifespan; it owns the task group the operations run in::

        operations = BackgroundOperations()

        @asynccontextmanager
        async def lifespan(app):
            async with operations:  # on exit: grace, then cancel with reason "shutdown"
                yield

        id = await operations.start(export, query, owner=user)   # returns once it runs
        status = await operations.status(id, owner=user)          # running, completed...
        outcome = await operations.cancel(id, owner=user)         # from any request

    Each operation runs under a token tracked in ``registry`` (``async with
    registry.track(id, owner=owner)``), so cancel by id, cancel-before-start tombstones and
    owner scoping work as they do for requests, on the memory and the Redis backend. Its
    status is written to ``store`` when it starts, when it reports progress and when it ends.

    Args:
        registry: where the operations are tracked (a new one with a memory backend if
            omitted). Use a Redis-backed one, and a Redis status store, to cancel and read
            operations from every worker.
        store: where statuses are kept (a new :class:`MemoryStatusStore` if omitted).
        max_running: the most operations this process runs at once.
        max_running_per_owner: the most operations one owner runs at once in this process
            (``None``: no per-owner limit).
        grace: seconds that running operations get to finish on exit before they are
            cancelled with reason ``shutdown``.
        cleanup_timeout: seconds that cancelled operations then get for their cleanup,
            after which the task group is cancelled outright; exit waits no longer
            (unless an operation shields itself from cancellation).
        result: turns a completed operation's return value into what its status keeps; by
            default a JSON-serializable value, else ``None``. What it returns must be JSON
            (no NaN or infinity, no lone surrogate): otherwise the operation ends ``failed``
            with an error of type ``ResultNotJSON`` that says why.
        poll_interval: seconds between reads of the store while :meth:`wait` waits for an
            operation that runs in another process.

    Raises:
        ValueError: if an option is out of range.

    .. versionadded:: 0.1
    """

    __slots__ = (
        "_cleanup_timeout",
        "_closing",
        "_grace",
        "_poll_interval",
        "_registry",
        "_result",
        "_runs",
        "_store",
        "_task_group",
        "_unhook",
        "_waits",
    )

    def __init__(
        self,
        *,
        registry: TokenRegistry | None = None,
        store: StatusStore | None = None,
        max_running: int = 1_000,
        max_running_per_owner: int | None = None,
        grace: float = 5.0,
        cleanup_timeout: float = 5.0,
        result: Callable[[Any], Any] = _keep_json,
        poll_interval: float = 0.05,
    ) -> None:
        _check_seconds(grace=grace, cleanup_timeout=cleanup_timeout, poll_interval=poll_interval)
        if not callable(result):
            raise TypeError(f"result must be callable, not {type(result).__name__}")
        self._registry = TokenRegistry() if registry is None else registry
        self._store: StatusStore = MemoryStatusStore() if store is None else store
        self._runs = _Runs(max_running, max_running_per_owner)
        self._grace = float(grace)
        self._cleanup_timeout = float(cleanup_timeout)
        self._result = result
        self._poll_interval = float(poll_interval)
        self._task_group: TaskGroup | None = None
        self._closing = False
        self._waits: set[anyio.CancelScope] | None = set()  # None: shutting down, none wait
        self._unhook: Callable[[], None] = _nothing

    @property
    def registry(self) -> TokenRegistry:
        """The registry the operations are tracked in."""
        return self._registry

    @property
    def store(self) -> StatusStore:
        """The status store."""
        return self._store

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> BackgroundOperations:
        """Enter the store and open the task group the operations run in.

        Raises:
            RuntimeError: if it is already running.
        """
        await _enter(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Shut down, bounded: first refuse new operations.

        Then wait ``grace`` seconds for the running ones, cancel the rest with reason
        ``shutdown``, wait ``cleanup_timeout`` seconds for their cleanup, and stop the task
        group and the store.
        """
        task_group = self._task_group
        if task_group is None:
            return
        self._closing = True
        self._unhook()
        _stop_waiting(self)
        try:
            with anyio.CancelScope(shield=True):  # a shutdown is bounded by its own timeouts
                await self._runs.drain(self._grace, self._cleanup_timeout)
            task_group.cancel_scope.cancel()
            await task_group.__aexit__(None, None, None)
        finally:
            self._task_group = None
            await self._store.__aexit__(exc_type, exc, tb)

    # -- starting ----------------------------------------------------------------------

    async def start(
        self,
        func: Callable[[Unpack[PosArgsT]], Awaitable[Any]],
        *args: *PosArgsT,
        id: str | None = None,
        owner: str | None = None,
    ) -> str:
        """Start ``func(*args)`` as a background operation and return its id.

        It returns as soon as the operation is registered and its ``running`` status is
        written (or, when a cancel for this id arrived first, once its ``cancelled`` status is
        written: the function then never runs). The operation runs in this object's task
        group, not in the caller's: the caller's cancellation does not stop it.

        A start is never half done: it all runs in the task group, so a caller cancelled
        while start() waits gets its cancellation at once and the operation still starts and
        runs, readable by id. A refused start (the exceptions below) leaves no status behind.

        Args:
            func: an async function; its return value becomes the status's ``result``.
            *args: positional arguments for ``func``.
            id: the operation id (1 to 128 characters from ``A-Z a-z 0-9 . _ : -``); a random
                one of 128 bits when omitted. A client-chosen id lets the client cancel
                before it has the answer to the start.
            owner: who may see and cancel it (a user or tenant id); ``None`` is a namespace too.

        Returns:
            The operation id.

        Raises:
            ValueError: for an invalid id or owner.
            OperationExists: if ``id`` runs already for ``owner``.
            RegistryFull: if ``max_running`` (``limit="max_running"``) or
                ``max_running_per_owner`` operations run already, or the registry is full.
            OperationCancelled: with reason ``shutdown`` once the application is shutting
                down (FastAPI answers ``503``).
            RuntimeError: if it is not running (enter it first, in the lifespan).
        """
        if id is None:
            id = secrets.token_urlsafe(16)
        _check(id, owner)
        task_group = _open_task_group(self)
        run = self._runs.reserve(id, owner)  # now: the limits hold across concurrent starts
        try:
            task_group.start_soon(run.execute, self, func, args, name=f"operation {id}")
        except BaseException:
            self._runs.forget(run)
            raise
        await run.begun.wait()  # the caller's cancellation stops this wait, not the operation
        if run.refusal is not None:
            raise run.refusal
        return id

    async def report(
        self, done: float, total: float | None = None, message: str | None = None
    ) -> None:
        """Report the progress of the operation this is called from; it shows in its status.

        Reports made while an earlier one is still being written are coalesced: the store
        gets the newest, never more than one write at a time per operation.

        Args:
            done: how much is done.
            total: how much there is in all, if known.
            message: a short note.

        Raises:
            ValueError: if ``done`` or ``total`` is not a finite number (inf, NaN).
            RuntimeError: outside a background operation of this object.
        """
        progress = _progress(done, total, message)
        await _run_here(self, "report").report(self._store, progress)

    async def commit(self) -> None:
        """Pass the commit point of the calling operation (:meth:`TrackedOperation.commit`).

        Call it just before the irreversible step: a later cancel answers ``COMMITTED``.

        Raises:
            OperationCancelled: if it was cancelled first (it ends ``cancelled``).
            BackendUnavailable: if the backend cannot decide (nothing changed).
            RuntimeError: outside a background operation of this object.
        """
        op = _run_here(self, "commit").op
        assert op is not None  # the function runs inside its tracked operation
        await op.commit()

    # -- reading and cancelling --------------------------------------------------------

    async def status(self, id: str, *, owner: str | None = None) -> OperationStatus | None:
        """Return the status of operation ``id`` of ``owner``, or ``None`` if there is none.

        ``None`` also for another owner's operation, and once the store dropped the status.

        Raises:
            ValueError: for an invalid id or owner.
        """
        _check(id, owner)
        run = self._runs.get(id, owner)
        if run is not None and run.status is not None:
            return run.status  # the freshest view: it runs here
        return await self._store.get(id, owner)

    async def wait(self, id: str, *, owner: str | None = None) -> OperationStatus | None:
        """Wait for operation ``id`` to end and return its status.

        Bound it with your own scope (``with anyio.move_on_after(10):``), as the FastAPI
        router's ``?wait=`` does. It ends early once the process gets SIGTERM or SIGINT (in
        the main thread) or this object shuts down: a long-poll never holds up a server
        that waits for its open requests before its shutdown begins (uvicorn).

        Returns:
            The ended status (as it is, if the wait ended early), or ``None`` if there is
            none for this owner.

        Raises:
            ValueError: for an invalid id or owner.
        """
        _check(id, owner)
        with anyio.CancelScope() as scope:
            return await _wait_for_end(self, id, owner, scope)
        return await self.status(id, owner=owner)  # shutting down: the status as it is

    async def cancel(
        self, id: str, *, owner: str | None = None, reason: CancelReason | None = None
    ) -> CancelOutcome:
        """Cancel operation ``id`` of ``owner``, wherever it runs, even before it started.

        Returns:
            :attr:`~cancelkit.CancelOutcome.CANCELLED` if it was running,
            :attr:`~cancelkit.CancelOutcome.PENDING` if it has not registered yet (it will
            start already cancelled), :attr:`~cancelkit.CancelOutcome.NOT_FOUND` if it has
            ended (or is lost, or is another owner's).

        Raises:
            ValueError: for an invalid id or owner.
            RegistryFull: if a tombstone is needed and the backend's limit is reached.
        """
        status = await self.status(id, owner=owner)
        if status is not None and status.state.ended:
            return CancelOutcome.NOT_FOUND  # no tombstone for an id whose run is over
        return await self._registry.cancel(id, owner=owner, reason=reason)

    def operations(self, *, owner: str | None = None) -> list[OperationStatus]:
        """Return the statuses of ``owner``'s operations running in this process."""
        runs = self._runs.by_name.values()
        return [run.status for run in runs if run.owner == owner and run.status is not None]

    def statistics(self) -> OperationsStatistics:
        """Return a snapshot of this object's counters."""
        return self._runs.statistics()

    def __repr__(self) -> str:
        state = "stopped" if self._task_group is None else "closing" if self._closing else "up"
        return f"<BackgroundOperations {state} running={len(self._runs)} store={self._store!r}>"


def _run_here(ops: BackgroundOperations, what: str) -> _Run:
    """The operation of ``ops`` that the caller runs in, or RuntimeError naming ``what``."""
    run = _current.get()
    if run is None or ops._runs.get(run.id, run.owner) is not run:
        raise RuntimeError(f"{what}() must be called from a running background operation")
    return run


async def _wait_for_end(
    ops: BackgroundOperations, id: str, owner: str | None, scope: anyio.CancelScope
) -> OperationStatus | None:
    """:meth:`BackgroundOperations.wait`: on its end here, or reading the store elsewhere.

    ``scope`` is cancelled when the shutdown begins (at once if it has).
    """
    waits = ops._waits
    if waits is None:
        scope.cancel()
        await anyio.lowlevel.checkpoint()
    else:
        waits.add(scope)
    try:
        status = None
        while True:
            if (run := ops._runs.get(id, owner)) is not None:
                await run.done.wait()  # it runs here (perhaps still starting: no status yet)
            elif status is not None:  # it runs in another process: read again in a moment
                await anyio.sleep(ops._poll_interval)
            status = await ops.status(id, owner=owner)
            if status is None or status.state.ended:
                return status
    finally:
        if waits is not None:
            waits.discard(scope)


async def _enter(ops: BackgroundOperations) -> None:
    """:meth:`BackgroundOperations.__aenter__`: the store, the task group, the stop signal."""
    if ops._task_group is not None:
        raise RuntimeError("these BackgroundOperations are already running")
    await ops._store.__aenter__()
    task_group = anyio.create_task_group()
    try:
        await task_group.__aenter__()
    except BaseException as exc:
        await ops._store.__aexit__(type(exc), exc, exc.__traceback__)
        raise
    ops._task_group = task_group
    ops._closing = False
    ops._waits = set()
    ops._runs.shutdown = None
    ops._unhook = on_stop_signal(lambda: _stop_waiting(ops))


def _stop_waiting(ops: BackgroundOperations) -> None:
    """End every :meth:`~BackgroundOperations.wait`, now and until the next start."""
    waits, ops._waits = ops._waits, None
    for scope in waits or ():
        scope.cancel()


def _nothing() -> None:
    return None


def _open_task_group(ops: BackgroundOperations) -> TaskGroup:
    """The task group new operations start in; refuses them before and after the lifespan."""
    if ops._task_group is None:
        raise RuntimeError(
            "BackgroundOperations is not running: enter it first (`async with "
            "operations:`, for example in the application's lifespan)"
        )
    if ops._closing:
        raise OperationCancelled(
            CancelReason(CancelKind.SHUTDOWN, "shutting down: no new operations")
        )
    return ops._task_group
