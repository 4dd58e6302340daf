"""The TokenRegistry side of the Redis backend: register, unregister, cancel by id."""

from __future__ import annotations

import logging
import secrets
from typing import final

import anyio

from .._exceptions import OperationExists, RedisUnavailable, RegistryFull
from .._reason import CancelKind, CancelReason
from ..backends import CancelOutcome, Deliver
from ._codec import deliver, dump, load
from ._config import Keys, Settings
from ._connection import Connection, Down

__all__ = ["Registrations"]

logger = logging.getLogger("cancelkit.redis")

_CHUNK = 500  # entries per resync script call


@final
class _Reg:
    __slots__ = ("cancelled", "committed", "deliver", "holder", "id", "name", "synced")

    def __init__(self, id: str, name: str, holder: str, deliver: Deliver) -> None:
        self.id = id
        self.name = name
        self.holder = holder
        self.deliver = deliver
        self.synced = False  # whether the heartbeat re-asserts it (set once it is recorded)
        self.cancelled = False  # whether a cancellation was delivered (repeats are not counted)
        self.committed = False  # passed its commit point (the resync re-records it if needed)


def taken_over(holder: str) -> CancelReason:
    """The reason a run ends with once another worker runs its id (``holder``: ``"W H"``).

    There is no kind for it: the fleet asked for the id to run elsewhere, so it is
    :attr:`~cancelkit.CancelKind.REQUESTED`, its source the worker that runs it now.
    """
    return CancelReason(
        CancelKind.REQUESTED,
        "the operation was started again by another worker after its lease lapsed",
        source=holder.partition(" ")[0] or None,
    )


def _name(id: str, owner: str | None) -> str:
    return f"-:{id}" if owner is None else f"{len(owner)}:{owner}:{id}"


@final
class Registrations:
    """This worker's registrations, and the scripts that share them with the fleet."""

    __slots__ = ("_by_holder", "_by_name", "_conn", "_keys", "_settings", "deliveries")

    def __init__(self, conn: Connection, keys: Keys, settings: Settings) -> None:
        self._conn = conn
        self._keys = keys
        self._settings = settings
        self._by_holder: dict[str, _Reg] = {}
        self._by_name: dict[str, str] = {}  # owner-scoped operation name -> holder
        self.deliveries = 0

    def __len__(self) -> int:
        return len(self._by_holder)

    def _reg_keys(self, reg_name: str, id: str) -> list[str]:
        k = self._keys  # every key of an operation id lives in the id's slot group
        return [
            k("r", reg_name, id),
            k("t", reg_name, id),
            k("f", reg_name, id),
            k.tombstones(id),
            k("i", id),
        ]

    async def register(
        self, id: str, owner: str | None, holder: str, callback: Deliver
    ) -> CancelReason | None:
        """See :meth:`RedisBackend.register <cancelkit.redis.RedisBackend.register>`.

        The registration is recorded locally first. If the script's effect is unknown (the
        caller was cancelled while it ran, or it failed with ``fail_open=False``), an
        idempotent unregister is queued at once; a registration it misses (the script ran
        after it) expires within one lease, as nothing refreshes it.
        """
        self._conn.client  # noqa: B018 - raises if not running
        name = _name(id, owner)
        if name in self._by_name:
            raise OperationExists(id)
        reg = self._by_holder[holder] = _Reg(id, name, holder, callback)  # record first
        self._by_name[name] = holder
        settings = self._settings
        try:
            result = await self._conn.run(
                "REGISTER",
                self._reg_keys(name, id),
                [self._keys.me(holder), settings.lease_ms, settings.tombstone_ms],
            )
        except Down:
            if not settings.fail_open:
                self._abandon(reg)
                raise RedisUnavailable("Redis is unreachable; not starting new work") from None
            reg.synced = True  # asserted by the resync once Redis is back
            return None
        except BaseException:
            self._abandon(reg)
            raise
        if result[0] == -1:
            self._forget(reg)
            raise OperationExists(id)
        if result[0] == 1:  # tombstoned: nothing was recorded, the start is refused
            self._forget(reg)
            return load(str(result[1]))
        reg.synced = True
        return None

    def _forget(self, reg: _Reg) -> None:
        self._by_holder.pop(reg.holder, None)
        if self._by_name.get(reg.name) == reg.holder:
            del self._by_name[reg.name]

    def _abandon(self, reg: _Reg) -> None:
        """Forget a registration whose script may have run; unregister it in the background."""
        self._forget(reg)
        if self._conn.running:
            self._conn.defer(*self._unregister_call(reg))

    def _unregister_call(self, reg: _Reg) -> tuple[str, list[str], list[str]]:
        k = self._keys
        return (
            "UNREGISTER",
            [
                k("r", reg.name, reg.id),
                k("f", reg.name, reg.id),
                k("i", reg.id),
                k("t", reg.name, reg.id),
            ],
            [k.me(reg.holder), self._settings.tombstone_ms],
        )

    async def unregister(self, holder: str) -> CancelReason | None:
        """See :meth:`RedisBackend.unregister <cancelkit.redis.RedisBackend.unregister>`."""
        reg = self._by_holder.get(holder)
        if reg is None:
            return None
        self._forget(reg)
        if not self._conn.running:
            return None
        with anyio.CancelScope(shield=True):
            return await self._unregister_remote(reg)
        return None  # pragma: no cover - a shield swallows nothing

    async def _unregister_remote(self, reg: _Reg) -> CancelReason | None:
        """Unregister on the server (or later); the reason of a cancel that won, if it says."""
        text = await self._conn.run_or_defer(*self._unregister_call(reg))
        return load(str(text)) if text else None

    async def commit(self, holder: str) -> CancelReason | None:
        """See :meth:`RedisBackend.commit <cancelkit.redis.RedisBackend.commit>`."""
        reg = self._by_holder.get(holder)
        if reg is None:
            return CancelReason(CancelKind.REQUESTED, "the operation is no longer registered")
        k, settings = self._keys, self._settings
        try:
            result = await self._conn.run(
                "COMMIT",
                [k("r", reg.name, reg.id), k("t", reg.name, reg.id), k("i", reg.id)],
                [k.me(holder), settings.lease_ms],
            )
        except Down:
            if not settings.fail_open:
                raise RedisUnavailable("Redis is unreachable; cannot decide the commit") from None
            reg.committed = True  # decided here; the resync records it once Redis is back
            return None
        if result[0] == 1:
            return load(str(result[1]))
        if result[0] == 2:
            return taken_over(str(result[1]))
        reg.committed = True
        return None

    async def cancel(self, id: str, owner: str | None, reason: CancelReason) -> CancelOutcome:
        """See :meth:`RedisBackend.cancel <cancelkit.redis.RedisBackend.cancel>`."""
        self._conn.client  # noqa: B018 - raises if not running
        name = _name(id, owner)
        settings, k = self._settings, self._keys
        # the limits are checked per slot group (each group gets its share; see Keys)
        per_owner = str(k.share(settings.max_tombstones_per_owner))  # None: one owner ("-")
        tombstones = k.tombstones(id)
        owner_set = f"{tombstones}:-" if owner is None else f"{tombstones}:{len(owner)}:{owner}"
        call = k("co", secrets.token_urlsafe(12), id)  # a retry of this call answers the same
        try:
            result = await self._conn.run(
                "CANCEL",
                [*self._reg_keys(name, id), owner_set, call],
                [
                    dump(reason),
                    settings.tombstone_ms,
                    str(k.share(settings.max_tombstones)),
                    k.channel_prefix(id),
                    k.worker,
                    per_owner,
                    k.inbox_prefix,
                    settings.lease_ms,
                ],
            )
        except Down:
            holder = self._by_name.get(name)
            if holder is None:
                raise RedisUnavailable(
                    f"Redis is unreachable and operation {id!r} does not run in this worker"
                ) from None
            local = self._by_holder[holder]
            if local.committed:
                return CancelOutcome.COMMITTED
            self._deliver(local, reason)
            return CancelOutcome.CANCELLED
        outcome = str(result[0])
        if outcome == "cancelled":
            worker, holder, text = str(result[1]), str(result[2]), str(result[3])
            if worker == k.worker:
                if reg := self._by_holder.get(holder):
                    self._deliver(reg, load(text))
            elif k.spread:  # published; the inbox is in the worker's group: written in the
                # background (the caller does not wait for the bounded path)
                self._conn.defer(*k.message(f">{worker} c {holder} {text}", settings.lease_ms))
            return CancelOutcome.CANCELLED
        if outcome == "full":
            limit = str(result[1])
            value = getattr(settings, limit)
            raise RegistryFull(limit, value)
        return CancelOutcome(outcome)

    def _deliver(self, reg: _Reg, reason: CancelReason) -> None:
        """Cancel the registration's token; a repeat (resync, inbox, pub/sub) is not counted."""
        if not reg.cancelled:
            reg.cancelled = True
            self.deliveries += 1
        deliver(reg.deliver, reason)

    # -- messages and resync -------------------------------------------------------------

    def on_cancel(self, holder: str, reason: str) -> None:
        """A ``c H REASON`` line: cancel the holder if it is still registered here."""
        reg = self._by_holder.get(holder)
        if reg is not None:
            self._deliver(reg, load(reason))

    def on_lost(self, holder: str, new: str) -> None:
        """An ``l H [W H2]`` line: another run holds the id now; cancel this one at once."""
        reg = self._by_holder.get(holder)
        if reg is not None and not reg.cancelled:
            logger.warning(
                "operation %r was started again elsewhere (%s) after its lease lapsed; "
                "cancelling this worker's copy",
                reg.id,
                new or "and has ended there",
            )
            self._deliver(reg, taken_over(new))

    async def resync(self, *, force: bool = False) -> list[str]:
        """Refresh liveness and TTLs, re-assert lost registrations; return the missed lines.

        Always runs at least one script (it refreshes this worker's liveness key).
        """
        k = self._keys
        groups: dict[str, list[_Reg]] = {}
        for reg in self._by_holder.values():
            if reg.synced:  # one script per slot group (its keys share a slot)
                groups.setdefault(k.base(reg.id), []).append(reg)
        chunks = [
            group[start : start + _CHUNK]
            for group in groups.values()
            for start in range(0, len(group), _CHUNK)
        ]
        lines: list[str] = []
        for chunk in chunks or [[]]:
            entity = chunk[0].id if chunk else k.worker
            keys = [k.alive(entity), k.tombstones(entity)]
            args = [k.worker, self._settings.lease_ms]
            for reg in chunk:
                keys += [k(kind, reg.name, reg.id) for kind in ("r", "t", "f")]
                args += [reg.holder, k("i", reg.id), "1" if reg.committed else "0"]
            result = await self._conn.run("SYNC_REGISTRATIONS", keys, args, force=force)
            lines += map(str, result)
            for reg in chunk:  # unregistered while the script ran: clean up again
                if reg.holder not in self._by_holder:
                    await self._unregister_remote(reg)
        return lines
