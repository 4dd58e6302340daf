"""The LatestOnly side of the Redis backend: admission by policy, sequence numbers, turns."""

from __future__ import annotations

import time
from typing import Any, final

import anyio

from .._exceptions import RedisUnavailable
from .._policy import Policy, check_known
from .._reason import CancelKind, CancelReason
from ..backends import Acquired, Admission, Deliver, MemoryBackend
from ._codec import deliver
from ._config import Keys, Settings
from ._connection import Connection, Down

__all__ = ["Slots", "commit_claim", "is_current", "resync"]

_CHUNK = 500  # entries per resync script call


@final
class _Claim:
    __slots__ = (
        "committed",
        "deliver",
        "generation",
        "holder",
        "key",
        "limit",
        "local",
        "lost",
        "mirrored",
        "running",
        "superseded",
        "synced",
        "turn",
        "when_busy",
    )

    def __init__(self, key: str, holder: str, deliver: Deliver, limit: int, when_busy: str) -> None:
        self.key = key
        self.holder = holder
        self.deliver = deliver
        self.limit = limit  # how many bodies of the key may run at once
        self.when_busy = when_busy  # its policy's (a resync tells Redis, if it lost the key)
        self.generation = 0
        self.local: int | None = None  # its generation in the fallback, if made while down
        self.running = False  # its body may start (Redis let it, or the fallback did)
        self.mirrored = False  # Redis let it run, and it is in the fallback's view too
        self.superseded = False
        self.lost = False  # stopped to make room: a handover waits for its exit
        self.committed = False  # past its commit point: a cancel no longer stops it
        self.synced = False
        self.turn: anyio.Event | None = None


def _local_generation(last: int) -> int:
    return max(last + 1, time.time_ns() // 1000)


@final
class Slots:
    """This worker's latest-only claims, and the scripts that share them with the fleet.

    While Redis is unreachable (``fail_open``), claims made meanwhile follow this worker's
    own semantics, kept in a private :class:`~cancelkit.backends.MemoryBackend`; the resync
    re-asserts them once Redis is back (Redis's view wins).
    """

    __slots__ = (
        "_by_holder",
        "_by_key",
        "_conn",
        "_keys",
        "_last_generation",
        "_local",
        "_settings",
        "deliveries",
    )

    def __init__(self, conn: Connection, keys: Keys, settings: Settings) -> None:
        self._conn = conn
        self._keys = keys
        self._settings = settings
        self._by_holder: dict[str, _Claim] = {}
        self._by_key: dict[str, dict[str, _Claim]] = {}  # key -> local claims, oldest first
        self._local = MemoryBackend(seq_ttl=settings.seq_ttl, max_seq_keys=settings.max_seq_keys)
        self._last_generation = 0
        self.deliveries = 0

    def __len__(self) -> int:
        return len(self._by_holder)

    async def acquire(
        self,
        key: str,
        holder: str,
        callback: Deliver,
        *,
        policy: Policy,
        limit: int,
        seq: int | None,
    ) -> Acquired:
        """See :meth:`RedisBackend.acquire <cancelkit.redis.RedisBackend.acquire>`.

        The claim is recorded locally first. If the script's effect is unknown (the caller
        was cancelled while it ran, or it failed with ``fail_open=False``), an idempotent
        release is queued at once; a claim that release misses (the script ran after it)
        is pruned once its lease deadline passes: it blocks the key for at most one lease.
        """
        self._conn.client  # noqa: B018 - raises if not running
        check_known(policy)  # the script refuses it too (a ValueError from its error reply)
        claim = _Claim(key, holder, callback, limit, policy.when_busy)
        self._by_holder[holder] = claim  # recorded first
        self._by_key.setdefault(key, {})[holder] = claim
        k, settings = self._keys, self._settings
        try:
            result = await self._conn.run(
                "ACQUIRE",
                [k("k", key), k("q", key), k.generations(key), k.alive(key), k.sequences(key)],
                [
                    k.worker,
                    holder,
                    f"{policy.when_busy} {policy.when_full}",
                    str(limit),
                    str(policy.max_waiting),
                    "" if seq is None else str(seq),
                    settings.lease_ms,
                    k.channel_prefix(key),
                    str(max(86_400_000, 4 * int(settings.lease_ms))),
                    k.alive_prefix(key),
                    settings.state_ms,
                    k.inbox_prefix,
                ],
            )
        except Down:
            if not settings.fail_open:
                self._abandon(claim)
                raise RedisUnavailable("Redis is unreachable; not starting new work") from None
            return await self._acquire_locally(claim, policy=policy, limit=limit, seq=seq)
        except BaseException:
            self._abandon(claim)
            raise
        admission = Admission(str(result[0]))
        if admission is Admission.STALE:
            self._forget(claim)
            return Acquired(admission, source=str(result[2]), seq=int(result[3]))
        if admission is not Admission.RUNNING and admission is not Admission.WAITING:
            self._forget(claim)
            return Acquired(admission)
        claim.generation = int(result[1])
        claim.running = admission is Admission.RUNNING
        self._last_generation = max(self._last_generation, claim.generation)
        claim.synced = True
        self._dispatch(result[2:])  # the claims it superseded or let run
        if claim.running:
            _make_room(self, claim)
        return Acquired(admission, claim.generation)

    def _dispatch(self, lines: list[Any]) -> None:
        """Act on a script's message lines.

        This worker's (``s H NEW``, ``t H``) here; other workers' (``>W ...``, only when keys
        are spread over slot groups: published already) queued for their inboxes (written in
        the background: the caller does not wait for the bounded path).
        """
        for line in map(str, lines):
            if line.startswith(">"):
                self._conn.defer(*self._keys.message(line, self._settings.lease_ms))
                continue
            kind, _, rest = line.partition(" ")
            other, _, source = rest.partition(" ")
            if kind == "s":
                self.on_superseded(other, source)
            else:
                self.on_turn(other)

    async def _acquire_locally(
        self, claim: _Claim, *, policy: Policy, limit: int, seq: int | None
    ) -> Acquired:
        # One view of this worker's claims on the key: those Redis let run before the outage
        # join the fallback first (oldest first), so the policy holds over them too and never
        # more than ``limit`` bodies of the key run here, outage or not.
        for other in list(self._by_key.get(claim.key, {}).values()):
            if other.running and other.local is None and not (other.mirrored or other.superseded):
                other.mirrored = True
                await self._local.acquire(
                    claim.key,
                    other.holder,
                    self._deliverer(other),
                    policy=policy,
                    limit=limit,
                    seq=None,
                )
        acquired = await self._local.acquire(
            claim.key,
            claim.holder,
            self._deliverer(claim),
            policy=policy,
            limit=limit,
            seq=seq,
        )
        if acquired.admission is not Admission.RUNNING and acquired.admission is not (
            Admission.WAITING
        ):
            self._forget(claim)
            return acquired
        claim.local = acquired.generation
        claim.generation = self._last_generation = _local_generation(self._last_generation)
        claim.running = acquired.admission is Admission.RUNNING
        claim.synced = True
        return Acquired(acquired.admission, claim.generation)

    def _deliverer(self, claim: _Claim) -> Deliver:
        def deliver(reason: CancelReason) -> None:
            self._deliver(claim, reason)

        return deliver

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

    async def release(self, key: str, holder: str) -> CancelReason | None:
        """See :meth:`RedisBackend.release <cancelkit.redis.RedisBackend.release>`."""
        claim = self._by_holder.get(holder)
        if claim is None or claim.key != key:
            return None
        self._forget(claim)
        if claim.local is not None or claim.mirrored:
            await self._local.release(key, holder)
        if not self._conn.running:
            return None
        with anyio.CancelScope(shield=True):
            return await self._release_remote(key, holder)
        return None  # pragma: no cover - a shield swallows nothing

    def _abandon(self, claim: _Claim) -> None:
        """Forget a claim whose script may have run; release it in the background."""
        self._forget(claim)
        if self._conn.running:
            self._conn.defer(*self._release_call(claim.key, claim.holder))

    def _release_call(self, key: str, holder: str) -> tuple[str, list[str], list[str]]:
        k, settings = self._keys, self._settings
        return (
            "RELEASE",
            [k("k", key), k("q", key), k.sequences(key), k("x", f"{k.worker} {holder}", key)],
            [
                k.worker,
                holder,
                k.channel_prefix(key),
                k.alive_prefix(key),
                settings.lease_ms,
                settings.seq_ms,
                str(k.share(settings.max_seq_keys)),  # per slot group: its share
                settings.state_ms,
            ],
        )

    async def _release_remote(self, key: str, holder: str) -> CancelReason | None:
        """Release on the server (or later); the supersede it had, if the server says."""
        lines = await self._conn.run_or_defer(*self._release_call(key, holder))
        if lines is None:  # queued: released in the background
            return None
        self._dispatch(lines[1:])  # turns: waiters of other workers may run now
        return _superseded(str(lines[0]))

    async def wait_turn(self, key: str, holder: str, *, handover: bool) -> None:
        """See :meth:`RedisBackend.wait_turn <cancelkit.redis.RedisBackend.wait_turn>`."""
        self._conn.client  # noqa: B018 - raises if not running
        k = self._keys
        while (claim := self._by_holder.get(holder)) is not None and claim.key == key:
            if claim.local is not None:  # made while Redis was down: this worker's order
                await self._local.wait_turn(key, holder, handover=handover)
                claim.running = True
                _make_room(self, claim)  # (the fallback knows nothing of claims Redis let in)
                return
            claim.turn = event = anyio.Event()
            try:
                result = await self._conn.run(
                    "TURN",
                    [k("k", key), k("q", key)],
                    [
                        k.worker,
                        holder,
                        k.alive_prefix(key),
                        k.channel_prefix(key),
                        "1" if handover else "0",
                    ],
                )
                self._dispatch(result[1:])
                if result[0]:
                    claim.running = True
                    _make_room(self, claim)
                    if not (handover and _leaving(self, claim)):
                        return
            except Down:
                if not self._settings.fail_open:
                    raise RedisUnavailable("Redis is unreachable; cannot wait for a turn") from None
                if _first_in_line(self, claim):
                    claim.running = True
                    return
            with anyio.move_on_after(self._settings.heartbeat):
                await event.wait()

    def _deliver(self, claim: _Claim, reason: CancelReason) -> None:
        """Cancel the claim's body; a repeat (resync, inbox and pub/sub) is not counted."""
        if not claim.superseded:
            claim.superseded = True
            self.deliveries += 1
        deliver(claim.deliver, reason)

    # -- messages and resync -------------------------------------------------------------

    def on_superseded(self, holder: str, source: str) -> None:
        """An ``s H NEW`` line: the holder's key belongs to ``source`` now."""
        claim = self._by_holder.get(holder)
        if claim is not None:
            self._deliver(claim, CancelReason(CancelKind.SUPERSEDED, source=source))

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


def _make_room(slots: Slots, new: _Claim) -> None:
    """``new`` may run: never more than its ``limit`` bodies of its key run in this worker.

    Other running claims of the key here may have lost their place: Redis never knew those
    made on this worker's own state while it was unreachable, and forgot those whose lease
    ran out meanwhile. Redis's view wins: the ones it never knew stop first (oldest first),
    then the oldest it let run, until ``limit`` run - ``new`` itself if others hold the
    places. A claim past its commit point runs to its end and keeps its place. They stop
    before ``new``'s body starts (a resync would stop them only later), and a handover
    waits for their exit. Claims made on local state are ordered by this worker's clock and
    the others by the server's: the two are never compared.
    """
    mine = slots._by_key.get(new.key, {}).values()
    running = sorted((c for c in mine if c.running and not c.superseded), key=_place)
    newest = running[-1].holder if running else new.holder
    excess = len(running) - new.limit
    for old in running:
        if excess <= 0:
            break
        if not old.committed:
            old.lost = True
            slots._deliver(old, CancelReason(CancelKind.SUPERSEDED, _LOST_PLACE, source=newest))
            excess -= 1


def _place(claim: _Claim) -> tuple[bool, int]:
    """Claims that lose their place first sort first: local ones, then by generation."""
    return (claim.local is None, claim.generation)


def _leaving(slots: Slots, claim: _Claim) -> bool:
    """Whether claims of the key stopped to make room have yet to exit (and release)."""
    return any(c.lost for c in slots._by_key.get(claim.key, {}).values() if c is not claim)


def _first_in_line(slots: Slots, claim: _Claim) -> bool:
    """Whether a claim waiting in Redis's queue may start while Redis is unreachable.

    On this worker's own knowledge: fewer than ``limit`` of the key run here, and no claim
    of the worker waits ahead of it in Redis's queue.
    """
    mine = slots._by_key.get(claim.key, {}).values()
    if sum(c.running and not c.superseded for c in mine) >= claim.limit:
        return False
    queued = [c for c in mine if c.synced and c.local is None and not (c.running or c.superseded)]
    return bool(queued) and min(queued, key=_place) is claim  # (none: it was just superseded)


_LOST_PLACE = (
    "lost its place: after Redis was unreachable its worker ran more claims of its key than "
    "allowed; those Redis never knew or forgot stop first, then the oldest (a claim past its "
    "commit point keeps its place)"
)


async def resync(slots: Slots, *, force: bool = False) -> list[str]:
    """Refresh TTLs, re-assert lost claims; return the lines of claims superseded meanwhile.

    (The heartbeat's and the reconnect's, for :class:`Slots`; see ``SYNC_CLAIMS``.)
    """
    k = slots._keys
    groups: dict[str, list[_Claim]] = {}
    for claim in slots._by_holder.values():
        if claim.synced:  # one script per slot group (its keys share a slot)
            groups.setdefault(k.base(claim.key), []).append(claim)
    lines: list[str] = []
    for group in groups.values():
        for start in range(0, len(group), _CHUNK):
            lines += await _resync_chunk(slots, group[start : start + _CHUNK], force=force)
    return lines


async def _resync_chunk(slots: Slots, chunk: list[_Claim], *, force: bool) -> list[str]:
    k, settings = slots._keys, slots._settings
    keys = [k.alive(chunk[0].key)]
    args = [
        k.worker,
        settings.lease_ms,
        settings.state_ms,
        k.channel_prefix(chunk[0].key),
        k.inbox_prefix,
    ]
    for claim in chunk:  # a claim cancelled here already is never re-asserted
        keys += [k("k", claim.key), k("q", claim.key)]
        live = "0" if claim.superseded else "r" if claim.running else "w"
        args += [claim.holder, str(claim.generation), live, str(claim.limit), claim.when_busy]
    result = await slots._conn.run("SYNC_CLAIMS", keys, args, force=force)
    for claim in chunk:  # released while the script ran: clean up again
        if claim.holder not in slots._by_holder:
            await slots._release_remote(claim.key, claim.holder)
    lines = []
    for line in map(str, result):
        if line.startswith(">"):  # another worker's claim it superseded: its inbox
            slots._conn.defer(*k.message(line, settings.lease_ms))
        else:
            lines.append(line)
    return lines


def _superseded(state: str) -> CancelReason | None:
    """The ``SUPERSEDED`` reason of a claim whose state on the server is ``s NEW``."""
    if state.startswith("s "):
        return CancelReason(CancelKind.SUPERSEDED, source=state[2:])
    return None


async def commit_claim(slots: Slots, key: str, holder: str) -> CancelReason | None:
    """See :meth:`RedisBackend.commit_claim <cancelkit.redis.RedisBackend.commit_claim>`."""
    claim = slots._by_holder.get(holder)
    if claim is None or claim.key != key:
        return CancelReason(CancelKind.SUPERSEDED, "the claim is no longer recorded")
    if claim.local is not None:  # made while Redis was unreachable: this worker decides
        reason = await slots._local.commit_claim(key, holder)
        claim.committed = reason is None
        return reason
    k = slots._keys
    try:
        result = await slots._conn.run("COMMIT_CLAIM", [k("k", key)], [k.worker, holder])
    except Down:
        if not slots._settings.fail_open:
            raise RedisUnavailable("Redis is unreachable; cannot decide the commit") from None
        if claim.superseded:  # (fail_open: as far as this worker knows)
            return CancelReason(CancelKind.SUPERSEDED, "superseded while Redis was unreachable")
        claim.committed = True
        return None
    if result[0] == 1:
        source = str(result[1])
        if not source:
            return CancelReason(CancelKind.SUPERSEDED, "the claim lost its place on the key")
        return CancelReason(CancelKind.SUPERSEDED, source=source)
    claim.committed = True
    return None


async def is_current(slots: Slots, key: str, generation: int) -> bool:
    """See :meth:`RedisBackend.is_current <cancelkit.redis.RedisBackend.is_current>`."""
    k = slots._keys
    try:
        return bool(
            await slots._conn.run("IS_CURRENT", [k("k", key), k("q", key)], [str(generation)])
        )
    except Down:
        pass
    if not slots._settings.fail_open:
        raise RedisUnavailable("Redis is unreachable; the generation is unknown")
    for claim in slots._by_key.get(key, {}).values():
        if claim.generation == generation:
            if claim.local is not None:
                return await slots._local.is_current(key, claim.local)
            return not claim.superseded
    return False
