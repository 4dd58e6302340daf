"""TokenRegistry: track work by id and cancel it by id, owner-scoped, with tombstones."""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import final

from ._reason import CancelKind, CancelReason
from ._token import CancellationToken, TokenScope
from .backends import (
    Backend,
    CancelOutcome,
    MemoryBackend,
    OperationExists,
    RegistryFull,
    new_holder_id,
)

__all__ = ["RegistryStatistics", "TokenRegistry", "TrackedOperation"]

_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"  # also used to validate ids in HTTP adapters
_ID = re.compile(_ID_PATTERN)
_OWNER = re.compile(r"[^\s]{1,256}")


def _check(id: object, owner: object) -> None:
    if not isinstance(id, str):
        raise TypeError(f"operation id must be a str, not {type(id).__name__}")
    if not _ID.fullmatch(id):
        raise ValueError(
            f"invalid operation id {id[:140]!r}: use 1 to 128 characters from A-Z a-z 0-9 . _ : -"
        )
    if owner is not None and not (
        isinstance(owner, str) and _OWNER.fullmatch(owner) and owner.isprintable()
    ):
        raise ValueError(
            f"invalid owner {owner!r}: use None or 1 to 256 printable characters, no whitespace"
        )


@final
@dataclass(frozen=True, slots=True)
class TrackedOperation:
    """A running operation, as yielded by :meth:`TokenRegistry.track`.

    Attributes:
        id: the operation's id (given, or a random one of 128 bits).
        owner: the owner it was tracked for.
        token: the token that stops it; the tracked block runs inside ``token.scope()``.

    .. versionadded:: 0.1
    """

    id: str
    owner: str | None
    token: CancellationToken


@final
@dataclass(frozen=True, slots=True)
class RegistryStatistics:
    """A snapshot of a :class:`TokenRegistry`, from :meth:`TokenRegistry.statistics`.

    Attributes:
        live: operations being tracked now.
        tracked: operations tracked since the registry was made.
        cancelled: of the finished operations, how many ended cancelled, by reason kind.

    .. versionadded:: 0.1
    """

    live: int
    tracked: int
    cancelled: Mapping[CancelKind, int]


@final
class TokenRegistry:
    """Tracks running operations by id so that other requests can cancel them.

    ``async with registry.track(id) as op:`` runs a block that ``await registry.cancel(id)``
    stops from anywhere, even when the cancel arrives before the block started (a tombstone
    makes it start already cancelled). Ids live in per-owner namespaces: what one owner
    tracks is invisible to every other owner.

    Args:
        backend: where registrations and tombstones live; a new
            :class:`~cancelkit.backends.MemoryBackend` if omitted (configure tombstone TTL and
            limit there).
        max_live: the most operations this registry tracks at once.

    Raises:
        ValueError: if ``max_live`` is below 1.

    .. versionadded:: 0.1
    """

    __slots__ = ("_backend", "_cancelled", "_live", "_max_live", "_tracked")

    def __init__(self, *, backend: Backend | None = None, max_live: int = 100_000) -> None:
        if max_live < 1:
            raise ValueError(f"max_live must be >= 1, not {max_live!r}")
        self._backend: Backend = MemoryBackend() if backend is None else backend
        self._max_live = max_live
        self._live: dict[tuple[str | None, str], TrackedOperation] = {}
        self._tracked = 0
        self._cancelled = dict.fromkeys(CancelKind, 0)

    @property
    def backend(self) -> Backend:
        """The backend in use."""
        return self._backend

    def track(
        self,
        id: str | None = None,
        *,
        owner: str | None = None,
        parent: CancellationToken | None = None,
        interrupt: bool = True,
    ) -> AbstractAsyncContextManager[TrackedOperation]:
        """Track the block as operation ``id`` of ``owner`` while it runs.

        The block runs inside the operation's ``token.scope()``: a cancel interrupts it with
        :exc:`~cancelkit.OperationCancelled`. The registration is always removed on exit
        (normal, error, or an outer cancellation, which propagates as itself).

        Args:
            id: the operation id, 1 to 128 characters from ``A-Z a-z 0-9 . _ : -``; a random
                one of 128 bits when omitted.
            owner: the owner namespace (a user or tenant id); ``None`` is a namespace too.
            parent: a token (an application's shutdown token) that cancels the operation
                too; the link is released on exit.
            interrupt: run the block inside ``op.token.scope()`` (the default). With
                ``False`` the block is not interrupted (it checks or scopes ``op.token``
                itself); a tombstoned operation still never starts it.

        Returns:
            An async context manager that yields the :class:`TrackedOperation`.

        Raises:
            ValueError: for an invalid id or owner.
            OperationExists: for an id already tracked for this owner (a ValueError too).
            RegistryFull: when ``max_live`` operations are already tracked.
            OperationCancelled: when the operation was cancelled (before or while running).
        """
        if id is None:
            id = secrets.token_urlsafe(16)
        _check(id, owner)
        return _Tracking(self, id, owner, parent, interrupt)

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
            RegistryFull: if a tombstone is needed and the backend's limit is reached.
        """
        _check(id, owner)
        if reason is None:
            reason = CancelReason(CancelKind.REQUESTED)
        elif not isinstance(reason, CancelReason):
            raise TypeError(f"reason must be a CancelReason or None, not {type(reason).__name__}")
        return await self._backend.cancel(id, owner, reason)

    def operations(self, *, owner: str | None = None) -> list[TrackedOperation]:
        """Return the operations of ``owner`` that this registry is tracking now."""
        return [op for op in self._live.values() if op.owner == owner]

    def statistics(self) -> RegistryStatistics:
        """Return a snapshot of this registry's counters."""
        return RegistryStatistics(
            live=len(self._live),
            tracked=self._tracked,
            cancelled={kind: n for kind, n in self._cancelled.items() if n},
        )

    def __repr__(self) -> str:
        return (
            f"<TokenRegistry live={len(self._live)} max_live={self._max_live} "
            f"backend={self._backend!r}>"
        )


@final
class _Tracking:
    """One ``async with registry.track(...)`` (a class, not a generator: it is lighter)."""

    __slots__ = ("_holder", "_interrupt", "_op", "_registry", "_scope")

    def __init__(
        self,
        registry: TokenRegistry,
        id: str,
        owner: str | None,
        parent: CancellationToken | None,
        interrupt: bool,
    ) -> None:
        self._registry = registry
        token = CancellationToken(name=id) if parent is None else parent.child(name=id)
        self._op = TrackedOperation(id, owner, token)
        self._interrupt = interrupt
        self._holder = new_holder_id()
        self._scope: TokenScope | None = None

    async def __aenter__(self) -> TrackedOperation:
        registry, op = self._registry, self._op
        name = (op.owner, op.id)
        if name in registry._live:
            raise OperationExists(op.id)
        if len(registry._live) >= registry._max_live:
            raise RegistryFull("max_live", registry._max_live)
        registry._live[name] = op
        registry._tracked += 1
        try:
            tombstone = await registry._backend.register(
                op.id, op.owner, self._holder, op.token.cancel
            )
            if tombstone is not None:
                op.token.cancel(tombstone)
            if self._interrupt:
                scope = op.token.scope()
                scope.__enter__()  # raises at once if tombstoned: the block never starts
                self._scope = scope
            else:
                op.token.raise_if_cancelled()  # tombstoned: the block never starts
        except BaseException:
            await self._finish()
            raise
        return op

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        try:
            return self._scope is not None and self._scope.__exit__(exc_type, exc, tb)
        finally:
            await self._finish()

    async def _finish(self) -> None:
        registry, op = self._registry, self._op
        del registry._live[(op.owner, op.id)]
        op.token.close()  # release the link to the parent now, not when garbage-collected
        reason = op.token.reason
        if reason is not None:
            registry._cancelled[reason.kind] += 1
        await registry._backend.unregister(op.id, op.owner, self._holder)  # always completes
