"""TokenRegistry: track work by id and cancel it by id, owner-scoped, with tombstones."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import final

from . import _events
from ._exceptions import OperationCancelled, OperationExists, RegistryFull
from ._reason import CancelKind, CancelReason
from ._token import (
    CancellationToken,
    TokenScope,
    commit_token,
    held_token,
    settled_reason,
    uncommit_token,
)
from .backends import (
    Backend,
    CancelOutcome,
    MemoryBackend,
    new_holder_id,
)

__all__ = ["RegistryStatistics", "TokenRegistry", "TrackedOperation"]

# also used to validate ids in HTTP adapters: 1 to 128 of these characters, but not "." or
# "..", which are path segments (a Location with them points elsewhere)
_ID_PATTERN = r"^(?:[A-Za-z0-9._:-]{3,128}|[A-Za-z0-9_:-][A-Za-z0-9._:-]?|\.[A-Za-z0-9_:-])$"
_ID = re.compile(_ID_PATTERN)
_OWNER = re.compile(r"[^\s]{1,256}")


def _check(id: object, owner: object) -> None:
    if not isinstance(id, str):
        raise TypeError(f"operation id must be a str, not {type(id).__name__}")
    if not _ID.fullmatch(id):
        raise ValueError(
            f"invalid operation id {id[:140]!r}: use 1 to 128 characters from A-Z a-z 0-9 . _ : -"
            ", not '.' or '..' (path segments)"
        )
    if owner is not None and not (
        isinstance(owner, str) and _OWNER.fullmatch(owner) and owner.isprintable()
    ):
        raise ValueError(
            f"invalid owner {owner!r}: use None or 1 to 256 printable characters, no whitespace"
        )


@final
class TrackedOperation:
    """A running operation, as yielded by :meth:`TokenRegistry.track` and ``hold()``.

    Attributes:
        id: the operation's id (given, or a random one of 128 bits).
        owner: the owner it was tracked for.
        token: the token that stops it; the tracked block runs inside ``token.scope()``.

    .. versionadded:: 0.1
    """

    __slots__ = ("_hold", "id", "owner", "token")

    id: str
    owner: str | None
    token: CancellationToken
    _hold: _Hold

    def __init__(self) -> None:
        raise TypeError("TrackedOperation cannot be created directly; use registry.track(id)")

    async def commit(self) -> None:
        """Pass the commit point: from now on a cancel answers ``COMMITTED`` and stops nothing.

        Call it just before the operation's irreversible step (charge the card, send the
        email). The backend decides, atomically and across workers, whether the cancel or the
        commit came first: exactly one wins. If a cancel won (by id, a tombstone, its
        deadline, its parent), this raises :exc:`~cancelkit.OperationCancelled` with its
        reason and the operation stops as cancelled; otherwise nothing cancelkit does
        interrupts it any more: :meth:`TokenRegistry.cancel` answers
        :attr:`~cancelkit.CancelOutcome.COMMITTED`, the token's deadline is lifted, and the
        cancelkit scopes around the caller (a request's disconnect scope too) stop
        interrupting. Idempotent. Call it from the operation's own task.

        Raises:
            OperationCancelled: if the operation was cancelled first.
            BackendUnavailable: if the backend cannot decide (Redis unreachable with
                ``fail_open=False``); nothing is committed or cancelled then.

        .. versionadded:: 0.1
        """
        await self._hold.commit()

    def __repr__(self) -> str:
        state = "committed" if self.token.committed else repr(self.token)
        owner = "" if self.owner is None else f" owner={self.owner!r}"
        return f"<TrackedOperation {self.id!r}{owner} {state}>"


@final
@dataclass(frozen=True, slots=True)
class RegistryStatistics:
    """A snapshot of a :class:`TokenRegistry`, from :meth:`TokenRegistry.statistics`.

    Attributes:
        running: operations entered and not yet exited (registered, or registering).
        tracked: operations entered since the registry was made.
        cancelled: of the finished operations, how many ended cancelled, by reason kind.

    .. versionadded:: 0.1
    """

    running: int
    tracked: int
    cancelled: Mapping[CancelKind, int]


@final
class TokenRegistry:
    """Tracks running operations by id so that other requests can cancel them.

    ``async with registry.track(id) as op:`` runs a block that ``await registry.cancel(id)``
    stops from anywhere, even when the cancel arrives before the block started (a tombstone
    makes it start already cancelled). Ids live in per-owner namespaces: what one owner
    tracks is invisible to every other owner, and one owner's load cannot use up another
    owner's budget (``max_running_per_owner`` here, ``max_tombstones_per_owner`` in the
    backend).

    Args:
        backend: where registrations and tombstones live; a new
            :class:`~cancelkit.backends.MemoryBackend` if omitted (configure tombstone TTL and
            limits there).
        max_running: the most operations this registry runs at once, over all owners.
        max_running_per_owner: the most operations one owner (``None`` is one owner too)
            runs at once in this registry; ``None``: only ``max_running`` applies.

    Raises:
        ValueError: if a limit is below 1.

    .. versionchanged:: 0.1
        ``max_live`` is now ``max_running``; ``max_running_per_owner`` is new.

    .. versionadded:: 0.1
    """

    __slots__ = (
        "_backend",
        "_cancelled",
        "_count",
        "_max_per_owner",
        "_max_running",
        "_running",
        "_tracked",
    )

    def __init__(
        self,
        *,
        backend: Backend | None = None,
        max_running: int = 100_000,
        max_running_per_owner: int | None = None,
    ) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, not {max_running!r}")
        if max_running_per_owner is not None and max_running_per_owner < 1:
            raise ValueError(
                f"max_running_per_owner must be >= 1 or None, not {max_running_per_owner!r}"
            )
        self._backend: Backend = MemoryBackend() if backend is None else backend
        self._max_running = max_running
        self._max_per_owner = max_running_per_owner
        # owner -> id -> operation: no (owner, id) tuple per operation, a count per owner free
        self._running: dict[str | None, dict[str, TrackedOperation]] = {}
        self._count = 0  # operations in self._running
        self._tracked = 0
        self._cancelled = dict.fromkeys(CancelKind, 0)

    @property
    def backend(self) -> Backend:
        """The backend in use."""
        return self._backend

    def hold(
        self,
        id: str | None = None,
        *,
        owner: str | None = None,
        parent: CancellationToken | None = None,
    ) -> AbstractAsyncContextManager[TrackedOperation]:
        """Register the block as operation ``id`` of ``owner`` without interrupting it.

        The block is *signalled*, not interrupted: a cancel only cancels ``op.token``, which
        the block checks (``op.token.raise_if_cancelled()``) or scopes itself
        (``with op.token.scope():`` around the part that may be interrupted). An operation
        cancelled before it started never enters the block. The registration is always
        removed on exit. :meth:`track` is this plus the interruption.

        Args:
            id: the operation id, 1 to 128 characters from ``A-Z a-z 0-9 . _ : -``; a random
                one of 128 bits when omitted.
            owner: the owner namespace (a user or tenant id); ``None`` is a namespace too.
            parent: a token (an application's shutdown token) that cancels the operation
                too; the link is released on exit.

        Returns:
            An async context manager that yields the :class:`TrackedOperation`.

        Raises:
            ValueError: for an invalid id or owner.
            OperationExists: for an id already tracked for this owner.
            RegistryFull: when ``max_running`` or ``max_running_per_owner`` is reached
                (``limit`` names which).
            OperationCancelled: when the operation was cancelled before it started.

        .. versionadded:: 0.1
        """
        if id is None:
            id = secrets.token_urlsafe(16)
        _check(id, owner)
        return _Hold(self, id, owner, parent)

    def track(
        self,
        id: str | None = None,
        *,
        owner: str | None = None,
        parent: CancellationToken | None = None,
    ) -> AbstractAsyncContextManager[TrackedOperation]:
        """Track the block as operation ``id`` of ``owner`` while it runs, interruptibly.

        :meth:`hold` with the block inside ``op.token.scope()``: a cancel interrupts the
        block's awaits and surfaces as :exc:`~cancelkit.OperationCancelled`. The registration
        is always removed on exit (normal, error, or an outer cancellation, which propagates
        as itself). Arguments and errors as for :meth:`hold`.

        Returns:
            An async context manager that yields the :class:`TrackedOperation`.

        Raises:
            OperationCancelled: when the operation was cancelled (before or while running).

        .. versionchanged:: 0.1
            The ``interrupt=False`` flag is gone: use :meth:`hold`.
        """
        if id is None:
            id = secrets.token_urlsafe(16)
        _check(id, owner)
        return _Track(self, id, owner, parent)

    async def cancel(
        self, id: str, *, owner: str | None = None, reason: CancelReason | None = None
    ) -> CancelOutcome:
        """Cancel operation ``id`` of ``owner``, running or not started yet.

        Args:
            id: the operation id.
            owner: the owner namespace; an id tracked for another owner looks absent.
            reason: why; :attr:`~cancelkit.CancelKind.REQUESTED` when omitted.

        Returns:
            :attr:`~cancelkit.CancelOutcome.CANCELLED` if it was running,
            :attr:`~cancelkit.CancelOutcome.PENDING` if a tombstone now waits for it, or
            :attr:`~cancelkit.CancelOutcome.NOT_FOUND` if it finished recently.

        Raises:
            ValueError: for an invalid id or owner.
            TypeError: if ``reason`` is not a :class:`~cancelkit.CancelReason`.
            RegistryFull: if a tombstone is needed and the backend's limit for this owner
                (``max_tombstones_per_owner``) or for all (``max_tombstones``) is reached.
        """
        _check(id, owner)
        if reason is None:
            reason = CancelReason(CancelKind.REQUESTED)
        elif not isinstance(reason, CancelReason):
            raise TypeError(f"reason must be a CancelReason or None, not {type(reason).__name__}")
        return await self._backend.cancel(id, owner, reason)

    def operations(self, *, owner: str | None = None) -> list[TrackedOperation]:
        """Return the operations of ``owner`` that this registry is running now."""
        return list(self._running.get(owner, {}).values())

    def statistics(self) -> RegistryStatistics:
        """Return a snapshot of this registry's counters."""
        return RegistryStatistics(
            running=self._count,
            tracked=self._tracked,
            cancelled={kind: n for kind, n in self._cancelled.items() if n},
        )

    def __repr__(self) -> str:
        return (
            f"<TokenRegistry running={self._count} "
            f"max_running={self._max_running} backend={self._backend!r}>"
        )

    # -- the bookkeeping of _Hold ------------------------------------------------------

    def _add(self, op: TrackedOperation) -> None:
        ops = self._running.get(op.owner)
        if ops is None:
            if self._count >= self._max_running:
                raise RegistryFull("max_running", self._max_running)
            ops = self._running[op.owner] = {}
        elif op.id in ops:
            raise OperationExists(op.id)
        limit = self._max_per_owner
        if limit is not None and len(ops) >= limit:
            raise RegistryFull("max_running_per_owner", limit)
        if self._count >= self._max_running:
            raise RegistryFull("max_running", self._max_running)
        ops[op.id] = op
        self._count += 1
        self._tracked += 1

    def _remove(self, op: TrackedOperation) -> None:
        ops = self._running[op.owner]
        del ops[op.id]
        self._count -= 1
        if not ops:
            del self._running[op.owner]
        reason = op.token.reason
        if reason is not None:
            self._cancelled[reason.kind] += 1


class _Hold:
    """One ``async with registry.hold(...)`` (a class, not a generator: it is lighter).

    It is also the ``deliver`` callable handed to the backend (no bound method per operation).
    """

    __slots__ = ("_holder", "_op", "_registry", "_started")

    def __init__(
        self,
        registry: TokenRegistry,
        id: str,
        owner: str | None,
        parent: CancellationToken | None,
    ) -> None:
        self._started = time.monotonic() if _events.listeners else None
        self._registry = registry
        op: TrackedOperation = object.__new__(TrackedOperation)
        op.id, op.owner, op.token, op._hold = id, owner, held_token(id, parent), self
        self._op = op
        self._holder = ""

    def __call__(self, reason: CancelReason) -> None:
        self._op.token.cancel(reason)

    async def __aenter__(self) -> TrackedOperation:
        registry, op = self._registry, self._op
        try:
            registry._add(op)
        except (OperationExists, RegistryFull) as exc:
            self._refused(exc)
            raise
        self._holder = new_holder_id()
        try:
            tombstone = await registry._backend.register(op.id, op.owner, self._holder, self)
            if tombstone is not None:
                op.token.cancel(tombstone)
            self._start()
        except (OperationExists, RegistryFull) as exc:
            await self._finish()
            self._refused(exc)
            raise
        except BaseException:
            await self._finish()
            raise
        return op

    def _refused(self, exc: OperationExists | RegistryFull) -> None:
        if _events.listeners:
            op, kind = self._op, "exists" if isinstance(exc, OperationExists) else "full"
            _events.report("operation", op.token, op.id, op.owner, what="refused", kind=kind)

    def _start(self) -> None:
        self._op.token.raise_if_cancelled()  # tombstoned: the block never starts

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        await self._finish()
        if exc_type is None:
            self._completed()
        return False

    async def commit(self) -> None:
        """See :meth:`TrackedOperation.commit`."""
        op = self._op
        token = op.token
        if token.committed:
            return
        frames = commit_token(token)  # no local cancel can slip in during the round trip
        try:
            reason = await self._registry._backend.commit(op.id, op.owner, self._holder)
        except BaseException:
            uncommit_token(token, frames, None)
            raise
        if reason is not None:  # a cancel came first on the server; its delivery was late
            uncommit_token(token, frames, reason)
            raise OperationCancelled(settled_reason(token) or reason)
        if _events.listeners:
            _events.report(
                "operation", token, op.id, op.owner, what="committed", started=self._started
            )

    def _completed(self) -> None:
        """The block returned: the answer is its cancellation's if a cancel won before."""
        token = self._op.token
        reason = settled_reason(token)  # (no deadline poll: a body that returned in time did)
        if reason is not None and not token.committed:
            raise OperationCancelled(reason)

    async def _finish(self) -> None:
        registry, op = self._registry, self._op
        token = op.token
        token.close()  # release the link to the parent now, not when garbage-collected
        try:
            # always completes; the cancel recorded for this holder, if the delivery was late
            reason = await registry._backend.unregister(op.id, op.owner, self._holder)
            if reason is not None:
                token.cancel(reason)  # (nothing if committed or cancelled already)
        finally:
            registry._remove(op)
        if _events.listeners:
            _events.report("operation", token, op.id, op.owner, started=self._started)


@final
class _Track(_Hold):
    """One ``async with registry.track(...)``: a hold whose block runs in ``token.scope()``."""

    __slots__ = ("_scope",)

    def __init__(
        self,
        registry: TokenRegistry,
        id: str,
        owner: str | None,
        parent: CancellationToken | None,
    ) -> None:
        super().__init__(registry, id, owner, parent)
        self._scope: TokenScope | None = None

    def _start(self) -> None:
        scope = self._op.token.scope()
        scope.__enter__()  # raises at once if tombstoned: the block never starts
        self._scope = scope

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._scope is not None
        try:
            suppressed = self._scope.__exit__(exc_type, exc, tb)
        finally:
            await self._finish()
        if exc_type is None:
            self._completed()
        return suppressed
