"""The LatestOnly side of the Redis backend: acquire, release, handover turns, generations."""

from __future__ import annotations

import time
from typing import final

import anyio

from .._reason import CancelKind, CancelReason
from ..backends import Acquired, Deliver
from ._codec import deliver
from ._config import Keys, Settings
from ._connection import Connection, Down, RedisUnavailable

__all__ = ["Slots"]

_CHUNK = 500  # entries per resync script call


@final
class _Claim:
    __slots__ = ("deliver", "generation", "holder", "key", "synced", "turn")

    def __init__(self, key: str, holder: str, deliver: Deliver) -> None:
        self.key = key
        self.holder = holder
        self.deliver = deliver
        self.generation = 0
        self.synced = False
        self.turn: anyio.Event | None = None


def _local_generation(last: int) -> int:
    return max(last + 1, time.time_ns() // 1000)


@final
class Slots:
    """This worker's latest-only claims, and the scripts that share them with the fleet."""

    __slots__ = (
        "_by_holder",
        "_by_key",
        "_conn",
        "_keys",
        "_last_generation",
        "_owners",
        "_settings",
        "deliveries",
    )

    def __init__(self, conn: Connection, keys: Keys, settings: Settings) -> None:
        self._conn = conn
        self._keys = keys
        self._settings = settings
        self._by_holder: dict[str, _Claim] = {}
        self._by_key: dict[str, dict[str, _Claim]] = {}  # key -> local claims, oldest first
        self._owners: dict[str, str] = {}  # key -> the holder that owns it (as far as we know)
        self._last_generation = 0
        self.deliveries = 0

    def __len__(self) -> int:
        return len(self._by_holder)

    async def acquire(
        self, key: str, holder: str, callback: Deliver, *, replace: bool
    ) -> Acquired | None:
        """See :meth:`RedisBackend.acquire <cancelkit.redis.RedisBackend.acquire>`.

        The claim is recorded locally first. If the script's effect is unknown (the caller
        was cancelled while it ran, or it failed with ``fail_open=False``), an idempotent
        release is queued at once; a claim it misses (the script ran after it) stops
        blocking the key within one lease (its owner key expires, its queue deadline passes).
        """
        self._conn.client  # noqa: B018 - raises if not running
        claim = self._by_holder[holder] = _Claim(key, holder, callback)  # record first
        self._by_key.setdefault(key, {})[holder] = claim
        k, lease_ms = self._keys, self._settings.lease_ms
        try:
            result = await self._conn.run(
                "ACQUIRE",
                [k("k", key), k("q", key), k.generations, k("qd", key)],
                [
                    k.worker,
                    holder,
                    "1" if replace else "0",
                    lease_ms,
                    k.channel_prefix,
                    str(max(86_400_000, 4 * int(lease_ms))),
                    k.inbox_prefix,
                ],
            )
        except Down:
            if not self._settings.fail_open:
                self._abandon(claim)
                raise RedisUnavailable("Redis is unreachable; not starting new work") from None
            return self._acquire_locally(claim, replace=replace)
        except BaseException:
            self._abandon(claim)
            raise
        if result[0] == 0:
            self._forget(claim)
            return None
        claim.generation = int(result[1])
        self._last_generation = max(self._last_generation, claim.generation)
        previous = None
        if len(result) > 2:
            previous = str(result[3])
            if result[2] == k.worker and (old := self._by_holder.get(previous)):
                self._deliver(old.deliver, CancelReason(CancelKind.SUPERSEDED, source=holder))
        self._owners[key] = holder
        claim.synced = True
        return Acquired(claim.generation, previous)

    def _acquire_locally(self, claim: _Claim, *, replace: bool) -> Acquired | None:
        previous = self._owners.get(claim.key)
        if previous is not None and not replace:
            self._forget(claim)
            return None
        claim.generation = self._last_generation = _local_generation(self._last_generation)
        self._owners[claim.key] = claim.holder
        claim.synced = True
        if previous is not None and (old := self._by_holder.get(previous)):
            self._deliver(old.deliver, CancelReason(CancelKind.SUPERSEDED, source=claim.holder))
        return Acquired(claim.generation, previous)

    def _forget(self, claim: _Claim) -> None:
        self._by_holder.pop(claim.holder, None)
        local = self._by_key.get(claim.key)
        if local is not None:
            local.pop(claim.holder, None)
            if not local:
                del self._by_key[claim.key]
            else:
                for other in local.values():  # a local waiter may have its turn now
                    if other.turn is not None:
                        other.turn.set()
        if self._owners.get(claim.key) == claim.holder:
            del self._owners[claim.key]

    def _abandon(self, claim: _Claim) -> None:
        """Forget a claim whose script may have run; release it in the background."""
        self._forget(claim)
        if self._conn.running:
            self._conn.defer(*self._release_call(claim.key, claim.holder))

    def _release_call(self, key: str, holder: str) -> tuple[str, list[str], list[str]]:
        k = self._keys
        return (
            "RELEASE",
            [k("k", key), k("q", key), k("qd", key)],
            [k.worker, holder, k.channel_prefix, k.inbox_prefix, self._settings.lease_ms],
        )

    async def release(self, key: str, holder: str) -> None:
        """See :meth:`RedisBackend.release <cancelkit.redis.RedisBackend.release>`."""
        claim = self._by_holder.get(holder)
        if claim is None or claim.key != key:
            return
        self._forget(claim)
        if self._conn.running:
            with anyio.CancelScope(shield=True):
                await self._release_remote(key, holder)

    async def _release_remote(self, key: str, holder: str) -> None:
        await self._conn.run_or_defer(*self._release_call(key, holder))

    async def wait_turn(self, key: str, holder: str) -> None:
        """See :meth:`RedisBackend.wait_turn <cancelkit.redis.RedisBackend.wait_turn>`."""
        self._conn.client  # noqa: B018 - raises if not running
        k = self._keys
        while (claim := self._by_holder.get(holder)) is not None and claim.key == key:
            claim.turn = event = anyio.Event()
            wait = self._settings.heartbeat
            try:
                result = await self._conn.run(
                    "TURN", [k("q", key), k("qd", key)], [k.me(holder), k.alive_prefix]
                )
            except Down:
                if not self._settings.fail_open:
                    raise RedisUnavailable("Redis is unreachable; cannot wait for a turn") from None
                if next(iter(self._by_key[key])) == holder:
                    return
            else:
                if result[0] == 1:
                    return
                wait = min(wait, int(result[1]) / 1000 + 0.001)  # until the head's lease ends
            with anyio.move_on_after(wait):
                await event.wait()

    async def generation(self, key: str) -> int | None:
        """See :meth:`RedisBackend.generation <cancelkit.redis.RedisBackend.generation>`."""
        try:
            value = await self._conn.get(self._keys("k", key))
        except Down:
            pass
        else:
            return None if value is None else int(value.rsplit(" ", 1)[1])
        if not self._settings.fail_open:
            raise RedisUnavailable("Redis is unreachable; the generation is unknown")
        owner = self._owners.get(key)
        return None if owner is None else self._by_holder[owner].generation

    def _deliver(self, callback: Deliver, reason: CancelReason) -> None:
        self.deliveries += 1
        deliver(callback, reason)

    # -- messages and resync -------------------------------------------------------------

    def on_superseded(self, holder: str, source: str) -> None:
        """An ``s H NEW`` line: the holder's key belongs to ``source`` now."""
        claim = self._by_holder.get(holder)
        if claim is not None:
            if self._owners.get(claim.key) == holder:
                del self._owners[claim.key]
            self._deliver(claim.deliver, CancelReason(CancelKind.SUPERSEDED, source=source))

    def on_turn(self, holder: str) -> None:
        """A ``t H`` line: the holder may have its turn (it checks)."""
        claim = self._by_holder.get(holder)
        if claim is not None and claim.turn is not None:
            claim.turn.set()

    def poke_turns(self) -> None:
        """Make every handover wait check again (messages can be lost)."""
        for claim in self._by_holder.values():
            if claim.turn is not None:
                claim.turn.set()

    async def resync(self, *, force: bool = False) -> list[str]:
        """Refresh TTLs, re-assert lost claims; return the lines of claims superseded meanwhile."""
        k = self._keys
        entries = [c for c in self._by_holder.values() if c.synced]
        lines: list[str] = []
        for start in range(0, len(entries), _CHUNK):
            chunk = entries[start : start + _CHUNK]
            keys = [k.alive]
            args = [k.worker, self._settings.lease_ms]
            for claim in chunk:
                keys += [k("k", claim.key), k("q", claim.key), k("qd", claim.key)]
                args += [claim.holder, str(claim.generation)]
            result = await self._conn.run("SYNC_CLAIMS", keys, args, force=force)
            lines += map(str, result)
            for claim in chunk:  # released while the script ran: clean up again
                if claim.holder not in self._by_holder:
                    await self._release_remote(claim.key, claim.holder)
        return lines
