"""RedisBackend: the state of TokenRegistry and LatestOnly shared across workers and hosts.

Install the extra (``pip install cancelkit[redis]``); the client is
`coredis <https://coredis.readthedocs.io>`_, which runs on asyncio and on trio.

The parts: :mod:`._config` (options, key names), :mod:`._connection` (pool, client, up/down),
:mod:`._scripts` and :mod:`._slot_scripts` (the Lua), :mod:`._registrations` (TokenRegistry
side), :mod:`._slots` (LatestOnly side), :mod:`._listener` (pub/sub, resync, heartbeat); this
module composes them.

.. versionadded:: 0.1
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import TracebackType
from typing import final

from .._policy import Policy
from .._reason import CancelReason
from ..backends import Acquired, CancelOutcome, Deliver
from . import _scripts, _slot_scripts
from ._config import Keys, Settings
from ._connection import Connection, redact
from ._lifecycle import Lifecycle
from ._listener import Listener
from ._registrations import Registrations
from ._slots import Slots, commit_claim, is_current

__all__ = ["RedisBackend", "RedisBackendStatistics"]

logger = logging.getLogger("cancelkit.redis")

_SCRIPTS = {
    name: getattr(module, name) for module in (_scripts, _slot_scripts) for name in module.__all__
}


@final
@dataclass(frozen=True, slots=True)
class RedisBackendStatistics:
    """A snapshot of a :class:`RedisBackend`, from :meth:`RedisBackend.statistics`.

    Attributes:
        worker: this worker's id (made when the backend started; ``None`` before).
        connected: whether Redis is reachable (as far as the backend knows).
        registrations: registrations held by this worker.
        claims: latest-only claims held by this worker.
        messages_received: cancel, supersede and turn messages received over pub/sub.
        inbox_lines: messages read from this worker's inbox (each message is sent both
            ways; the inbox is the path that does not depend on pub/sub surviving).
        deliveries: local holders cancelled through the backend, each counted once however
            many paths (pub/sub, inbox, resync, directly) delivered its cancellation.
        resyncs: heartbeats and reconnects that re-read the state of the local entries.
        reconnects: times the pub/sub subscription was re-established.
        failures: times Redis became unreachable (each logged once).

    .. versionadded:: 0.1
    """

    worker: str | None
    connected: bool
    registrations: int
    claims: int
    messages_received: int
    deliveries: int
    resyncs: int
    reconnects: int
    failures: int
    inbox_lines: int = 0


@final
class RedisBackend:
    """Keeps registrations, tombstones and latest-only keys in Redis, for a fleet of workers.

    Give one instance to :class:`~cancelkit.TokenRegistry` and :class:`~cancelkit.LatestOnly`
    (``backend=``) in every worker process: a newer claim on a key cancels the older one
    wherever it runs, and ``registry.cancel(id)`` stops the operation on whichever worker
    tracks it, even if it registers a moment later. The backend must run while it is used::

        backend = RedisBackend("redis://localhost:6379/0", prefix="myapp")

        @asynccontextmanager
        async def lifespan(app):
            async with backend:  # each worker process gets its own identity here
                yield

    Every key it writes starts with ``prefix`` and has a TTL: a lease refreshed every
    ``heartbeat`` seconds for live entries, so a crashed worker leaves nothing behind, and a
    holder that a cancelled caller may have left on the server blocks its key or id for at
    most one lease. Each cancellation is published (the fast path) and pushed to the target
    worker's inbox, which the worker reads every ``poll_interval`` seconds and after every
    reconnect: while Redis answers, a cancel reaches its worker within ``poll_interval`` plus
    a round trip even if pub/sub connections are lost. Every heartbeat also re-reads the
    state of this worker's entries and delivers anything still missed.

    Every failure of a Redis call (no answer, a lost connection, an error reply such as BUSY,
    READONLY, OOM or NOSCRIPT) is retried within ``timeout``; then it counts as Redis being
    unreachable: logged once, and the backend keeps trying to reconnect every
    ``retry_delay`` seconds; once back it re-asserts this worker's entries (Redis's view wins
    on conflicts). No raw client error reaches a caller, and none ends the backend's
    background tasks. While Redis is unreachable, with ``fail_open=True`` (the default) work
    goes on with this worker's local semantics (claims supersede claims of the same worker;
    cancels reach operations of this worker); with ``fail_open=False`` new registrations and
    claims raise :exc:`RedisUnavailable`. A cancel of an operation not running in this worker
    raises :exc:`RedisUnavailable` in both modes.

    Standalone Redis or Valkey, or Redis Cluster (>= 7): the backend asks the URL's node and,
    on a cluster, uses the cluster client, spreads the prefix's keys over ``slot_groups``
    hash tags (each operation id and each latest-only key in one slot; a prefix with braces,
    or ``slot_groups=1``, keeps them all in one slot) and wakes workers with sharded pub/sub;
    after a failover it reconnects and resyncs (see the "Many hosts" section of the Redis
    guide for the key layout, the recovery time and what can be lost).

    Args:
        url: the server, ``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for
            TLS, ``unix://`` for a socket).
        prefix: the start of every key and channel, so applications can share a server;
            1 to 64 characters, no whitespace.
        fail_open: what to do while Redis is unreachable (see above).
        timeout: the bound, in seconds, on every Redis call (and on connecting at start).
        heartbeat: seconds between heartbeats (TTL refresh and resync).
        lease: the TTL, in seconds, of live entries; at least twice ``heartbeat``; five
            heartbeats by default.
        retry_delay: seconds between reconnection attempts (constant, never growing).
        tombstone_ttl: seconds a tombstone (and a finished-marker) lives.
        max_tombstones: the most unexpired tombstones across the fleet; a cancel that needs
            one more raises :exc:`~cancelkit.RegistryFull`. On a cluster with several slot
            groups, each group holds its share (see ``slot_groups``).
        max_tombstones_per_owner: the most unexpired tombstones of one owner (``None``
            counts as one owner, as in :class:`~cancelkit.backends.MemoryBackend`); checked
            atomically with the cancel, so one tenant cannot use up the fleet's tombstones.
        poll_interval: seconds between reads of this worker's inbox (the bound on delivery
            when pub/sub loses a message).
        seq_ttl: seconds the newest sequence number of a latest-only key is remembered after
            its last claim was released (a stale claim arriving later still never runs).
        max_seq_keys: the most released keys whose sequence number is remembered, across
            the fleet; past it, the oldest is forgotten first.
        slot_groups: on a Redis Cluster, how many hash slots the keys of ``prefix`` spread
            over (1 to 1024; ignored on a single server). ``max_tombstones``,
            ``max_tombstones_per_owner`` and ``max_seq_keys`` then hold per group, each
            group taking an even share; 1 keeps every key in one slot (exact limits, one
            shard). It must be the same in every worker.

    Raises:
        ValueError: if an option is out of range, or ``url`` is not a Redis URL (the message
            names the problem: no host, a scheme other than ``redis``, ``rediss`` or
            ``unix``, a database that is not a number...).

    .. versionadded:: 0.1
    """

    __slots__ = (
        "_conn",
        "_keys",
        "_life",
        "_listener",
        "_registrations",
        "_settings",
        "_slots",
    )

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "cancelkit",
        fail_open: bool = True,
        timeout: float = 1.0,
        heartbeat: float = 2.0,
        lease: float | None = None,
        retry_delay: float = 0.1,
        tombstone_ttl: float = 60.0,
        max_tombstones: int = 10_000,
        max_tombstones_per_owner: int = 1_000,
        poll_interval: float = 0.05,
        seq_ttl: float = 60.0,
        max_seq_keys: int = 10_000,
        slot_groups: int = 16,
    ) -> None:
        """Configure the backend; nothing connects until it is entered."""
        settings = self._settings = Settings.validate(
            url,
            prefix=prefix,
            fail_open=fail_open,
            timeout=timeout,
            heartbeat=heartbeat,
            lease=lease,
            retry_delay=retry_delay,
            tombstone_ttl=tombstone_ttl,
            max_tombstones=max_tombstones,
            max_tombstones_per_owner=max_tombstones_per_owner,
            poll_interval=poll_interval,
            seq_ttl=seq_ttl,
            max_seq_keys=max_seq_keys,
            slot_groups=slot_groups,
        )
        self._keys = Keys(prefix)
        self._conn = Connection(url, timeout=settings.timeout, fail_open=fail_open)
        self._registrations = Registrations(self._conn, self._keys, settings)
        self._slots = Slots(self._conn, self._keys, settings)
        self._listener = Listener(
            self._conn, self._keys, settings, self._registrations, self._slots
        )
        self._life = Lifecycle(self._conn, self._keys, settings, self._listener, _SCRIPTS)

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def worker(self) -> str | None:
        """This worker's id while the backend runs (a new one at every start), else ``None``."""
        return self._keys.worker or None

    async def __aenter__(self) -> RedisBackend:
        """Connect, subscribe and start the heartbeat.

        A failure on the way (a connection killed during the first ping or subscribe) is
        retried, as any call, within ``timeout``.

        Raises:
            RedisUnavailable: if Redis does not answer within ``timeout``.
            ValueError: for a cluster URL naming a database other than 0.
            RuntimeError: if the backend is already running.
        """
        await self._life.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        """Stop the background tasks and disconnect (entries left in Redis expire)."""
        await self._life.stop()

    # -- TokenRegistry -----------------------------------------------------------------

    async def register(
        self, id: str, owner: str | None, holder: str, deliver: Deliver
    ) -> CancelReason | None:
        """See :meth:`Backend.register <cancelkit.backends.Backend.register>`.

        Raises:
            OperationExists: if the operation is registered already (by any worker).
            RedisUnavailable: with ``fail_open=False``, while Redis is unreachable.
        """
        return await self._registrations.register(id, owner, holder, deliver)

    async def unregister(self, id: str, owner: str | None, holder: str) -> CancelReason | None:
        """See :meth:`Backend.unregister <cancelkit.backends.Backend.unregister>`."""
        return await self._registrations.unregister(holder)

    async def commit(self, id: str, owner: str | None, holder: str) -> CancelReason | None:
        """See :meth:`Backend.commit <cancelkit.backends.Backend.commit>`.

        Raises:
            RedisUnavailable: with ``fail_open=False``, while Redis is unreachable.
        """
        return await self._registrations.commit(holder)

    async def cancel(self, id: str, owner: str | None, reason: CancelReason) -> CancelOutcome:
        """See :meth:`Backend.cancel <cancelkit.backends.Backend.cancel>`.

        Raises:
            RegistryFull: if a tombstone is needed and ``max_tombstones`` are live.
            RedisUnavailable: while Redis is unreachable, unless the operation runs in this
                worker.
        """
        return await self._registrations.cancel(id, owner, reason)

    # -- LatestOnly --------------------------------------------------------------------

    async def acquire(
        self,
        key: str,
        holder: str,
        deliver: Deliver,
        *,
        policy: Policy,
        limit: int,
        seq: int | None,
    ) -> Acquired:
        """See :meth:`Backend.acquire <cancelkit.backends.Backend.acquire>`.

        Raises:
            RedisUnavailable: with ``fail_open=False``, while Redis is unreachable.
        """
        return await self._slots.acquire(key, holder, deliver, policy=policy, limit=limit, seq=seq)

    async def release(self, key: str, holder: str) -> CancelReason | None:
        """See :meth:`Backend.release <cancelkit.backends.Backend.release>`."""
        return await self._slots.release(key, holder)

    async def commit_claim(self, key: str, holder: str) -> CancelReason | None:
        """See :meth:`Backend.commit_claim <cancelkit.backends.Backend.commit_claim>`.

        Raises:
            RedisUnavailable: with ``fail_open=False``, while Redis is unreachable.
        """
        return await commit_claim(self._slots, key, holder)

    async def wait_turn(self, key: str, holder: str, *, handover: bool) -> None:
        """See :meth:`Backend.wait_turn <cancelkit.backends.Backend.wait_turn>`.

        Raises:
            RedisUnavailable: with ``fail_open=False``, while Redis is unreachable.
        """
        await self._slots.wait_turn(key, holder, handover=handover)

    async def is_current(self, key: str, generation: int) -> bool:
        """See :meth:`Backend.is_current <cancelkit.backends.Backend.is_current>`.

        Raises:
            RedisUnavailable: with ``fail_open=False``, while Redis is unreachable.
        """
        return await is_current(self._slots, key, generation)

    # -- introspection -----------------------------------------------------------------

    def statistics(self) -> RedisBackendStatistics:
        """Return a snapshot of this worker's view."""
        listener = self._listener
        return RedisBackendStatistics(
            worker=self.worker,
            connected=self._conn.up,
            registrations=len(self._registrations),
            claims=len(self._slots),
            messages_received=listener.messages,
            deliveries=self._registrations.deliveries + self._slots.deliveries,
            resyncs=listener.resyncs,
            reconnects=listener.reconnects,
            failures=self._conn.failures,
            inbox_lines=listener.inbox_lines,
        )

    def __repr__(self) -> str:
        """Show the server (password hidden), prefix, worker id, state and local entries."""
        conn, settings = self._conn, self._settings
        state = "stopped" if not conn.running else ("up" if conn.up else "down")
        return (
            f"<RedisBackend {redact(settings.url)} prefix={settings.prefix!r} "
            f"worker={self.worker} {state} registrations={len(self._registrations)} "
            f"claims={len(self._slots)} fail_open={settings.fail_open}>"
        )
