"""RedisStatusStore: the statuses of background operations, readable from every worker.

Keys (``P`` is the prefix; ``N`` an owner-scoped name, ``-:<id>`` or ``<len>:<owner>:<id>``):

- ``P:o:s:N`` — one status: ``"<r|e> <worker> <run> <json>"`` (``r`` running, ``e`` ended;
  ``run`` tells one run of an id from the next). A running status is first written to live
  ``lease`` (a start whose answer never came back, as in a pause, leaves nothing for longer),
  then confirmed to ``lease + retention`` once the write answered, and refreshed by its
  worker's heartbeat; an ended one lives ``retention``.
- ``P:o:a:<worker>`` — the worker is alive; TTL ``lease``, refreshed every ``heartbeat``. A
  running status whose worker has no such key reads as ``lost``.
- ``P:o:z`` — the ended statuses by end time, trimmed to ``max_retained`` (and by time).

Standalone Redis or Valkey, or a Redis Cluster: there ``P`` is ``{P}`` (unless the prefix has a
hash tag of its own), so that every key of the store is in one slot, as its scripts need (they
name the keys of the statuses they trim). The client is the backend's (``_connection.py``).
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import time
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, final

import anyio

from .._exceptions import RedisUnavailable, RegistryFull
from .._status import OperationError, OperationState, OperationStatus
from ._connection import Connection, Down, close_quietly, leaf, redact

__all__ = ["RedisStatusStore"]

logger = logging.getLogger("cancelkit.redis")

_PREFIX = re.compile(r"[^\s]{1,64}")
_TAGGED = re.compile(r"{[^}]+}")  # a hash tag: the cluster hashes only what it encloses

# KEYS: status, ended set, this worker's alive key, the owner's running set, the running set.
# ARGV: value, ttl ms, "r"/"e", run, max retained, now ms, name, lease ms, status key prefix,
#       retention ms, max running per owner (0: none), max running (0: none), limits on (1/0),
#       "1" for the first running write of a run (a start) else "0".
# Returns 1 (written), 0 (ignored: a late running write of an ended run), 2 (ignored: the run
# is no longer the id's current one: another worker started the id again after this run's
# worker was lost), -1 / -2 (refused: the owner's / the fleet's limit of running
# operations). Only a start replaces another run's status.
_PUT = """
local old = redis.call('GET', KEYS[1])
local now = tonumber(ARGV[6])
local run = old and string.match(old, '^%S+ %S+ (%S+) ')
if run and run ~= ARGV[4] and ARGV[14] ~= '1' then return 2 end
if ARGV[3] == 'r' then
  if run == ARGV[4] and string.sub(old, 1, 2) == 'e ' then return 0 end
  if ARGV[13] == '1' then
    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
    redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
    if not redis.call('ZSCORE', KEYS[4], ARGV[7]) then
      local per_owner, total = tonumber(ARGV[11]), tonumber(ARGV[12])
      if per_owner > 0 and redis.call('ZCARD', KEYS[4]) >= per_owner then return -1 end
      if total > 0 and redis.call('ZCARD', KEYS[5]) >= total then return -2 end
    end
    local expiry = now + tonumber(ARGV[8])
    redis.call('ZADD', KEYS[4], expiry, ARGV[7])
    redis.call('PEXPIRE', KEYS[4], ARGV[8])
    redis.call('ZADD', KEYS[5], expiry, ARGV[7])
    redis.call('PEXPIRE', KEYS[5], ARGV[8])
  end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[7])
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[8])
  return 1
end
if ARGV[13] == '1' then
  redis.call('ZREM', KEYS[4], ARGV[7])
  redis.call('ZREM', KEYS[5], ARGV[7])
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[7])
local dropped = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[10]))
local extra = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[5])
if extra > 0 then
  for _, name in ipairs(redis.call('ZRANGE', KEYS[2], 0, extra - 1)) do
    table.insert(dropped, name)
  end
end
for _, name in ipairs(dropped) do
  if name ~= ARGV[7] then
    local key = ARGV[9] .. name
    local value = redis.call('GET', key)
    if value and string.sub(value, 1, 2) == 'e ' then redis.call('DEL', key) end
  end
  redis.call('ZREM', KEYS[2], name)
end
redis.call('ZADD', KEYS[2], now, ARGV[7])
-- the index lives as long as the newest ended status it names (every key has a TTL)
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""

# KEYS: status. ARGV: alive key prefix. Returns nil, or {value, 1 if its worker is gone}.
_GET = """
local value = redis.call('GET', KEYS[1])
if not value then return nil end
if string.sub(value, 1, 2) == 'r ' then
  local _, _, worker = string.find(value, '^r (%S+) ')
  if redis.call('EXISTS', ARGV[1] .. worker) == 0 then return {value, 1} end
end
return {value, 0}
"""

# KEYS: alive key, the running set, then per running operation: its status, its owner's set.
# ARGV: lease ms, running ttl ms, this worker, expiry (now + lease, ms), limits on (1/0),
#       then per operation its name and its running value. A running status of this worker is
#       refreshed; a missing one (Redis restarted empty, or lost it in a failover) is written
#       again, for one lease (the next beat refreshes it if the operation still runs here).
_BEAT = """
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
local mine = 'r ' .. ARGV[3] .. ' '
local n = 4
for i = 3, #KEYS, 2 do
  n = n + 2
  local value = redis.call('GET', KEYS[i])
  local ours = true
  if not value then
    redis.call('SET', KEYS[i], ARGV[n + 1], 'PX', ARGV[1])
  elseif string.sub(value, 1, #mine) == mine then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
  else
    ours = false
  end
  if ours and ARGV[5] == '1' then
    redis.call('ZADD', KEYS[i + 1], ARGV[4], ARGV[n])
    redis.call('PEXPIRE', KEYS[i + 1], ARGV[1])
    redis.call('ZADD', KEYS[2], ARGV[4], ARGV[n])
    redis.call('PEXPIRE', KEYS[2], ARGV[1])
  end
end
return 1
"""


def _name(id: str, owner: str | None) -> str:
    return f"-:{id}" if owner is None else f"{len(owner)}:{owner}:{id}"


def _run_marker(status: OperationStatus) -> str:
    return f"{status.worker or '-'}/{status.started_at!r}"


async def _open(store: RedisStatusStore) -> None:
    """Connect (a single server or a cluster), write the first beat, start the heartbeat.

    One attempt (``__aenter__`` retries it within ``timeout``, as any call). The client stack
    is the backend's (:class:`Connection`): the same pool, error model and cluster support.
    """
    stack, conn = AsyncExitStack(), store._conn
    try:
        await conn.open(stack, {"put": _PUT, "get": _GET, "beat": _BEAT})  # (bounded)
        conn.up = True
        if conn.cluster and not _TAGGED.search(store._prefix):
            store._keys = "{" + store._prefix + "}"  # every key of the store in one slot
        await store._beat_once()
        task_group = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(task_group.cancel_scope.cancel)  # runs before the group exits
        task_group.start_soon(_beat, store)
    except BaseException as exc:
        await conn.abandon(stack, exc)
    store._stack = stack


async def _call(store: RedisStatusStore, script: str, keys: list[str], args: list[str]) -> Any:
    """Run one script (retried within ``timeout`` like every call); else RedisUnavailable."""
    conn = store._conn
    if not conn.running:
        raise RuntimeError(
            "RedisStatusStore is not running: enter it first (BackgroundOperations "
            "enters its store)"
        )
    try:
        result = await conn.run(script, keys, args)
    except Down as exc:
        cause = exc.__cause__ or exc
        raise RedisUnavailable(
            f"Redis at {redact(store._url)} did not answer: {leaf(cause)}"
        ) from cause
    conn.up = True  # a failure marked it down (one attempt per call); this one answered
    return result


#: The default lease: a status reads lost only once the registration of its operation in a
#: RedisBackend with default settings (lease 10 s) has expired too, so a lost id can be
#: started again at once.
_DEFAULT_LEASE = 12.0


def _validate(
    prefix: str,
    lease: float | None,
    max_retained: int,
    limits: dict[str, int | None],
    **seconds: float,
) -> float:
    """Check the options; return the lease (12 s, or three heartbeats if longer, by default)."""
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(f"prefix must be 1 to 64 characters without whitespace: {prefix!r}")
    for option, value in seconds.items():
        if not 0 < value < math.inf:
            raise ValueError(f"{option} must be seconds > 0, not {value!r}")
    if lease is None:  # the RedisBackend's default lease (10 s) plus two heartbeats
        lease = max(3 * seconds["heartbeat"], _DEFAULT_LEASE)
    if not 2 * seconds["heartbeat"] <= lease < math.inf:
        raise ValueError(f"lease must be seconds >= 2 * heartbeat, not {lease!r}")
    if max_retained < 1:
        raise ValueError(f"max_retained must be >= 1, not {max_retained!r}")
    for option, limit in limits.items():
        if limit is not None and limit < 1:
            raise ValueError(f"{option} must be None or >= 1, not {limit!r}")
    return lease


def _owner_set(prefix: str, owner: str | None) -> str:
    """The key of the set of ``owner``'s running operations."""
    return f"{prefix}:o:r:{'-' if owner is None else f'{len(owner)}:{owner}'}"


@final
class RedisStatusStore:
    """Keeps the statuses of background operations in Redis, for a fleet of workers.

    Give one to :class:`~cancelkit.BackgroundOperations` (``store=``) in every worker, with a
    :class:`~cancelkit.TokenRegistry` on a :class:`RedisBackend` (so cancels reach the
    worker that runs an operation)::

        backend = RedisBackend(url)
        operations = BackgroundOperations(
            registry=TokenRegistry(backend=backend), store=RedisStatusStore(url)
        )

        @asynccontextmanager
        async def lifespan(app):
            async with backend, operations:  # enters the store too
                yield

    Every worker reads every status (per owner). An operation runs in the worker that started
    it; that worker refreshes a liveness key every ``heartbeat`` seconds. When it stops
    (killed, crashed, cut off from Redis for longer than ``lease``), its running operations
    read as :attr:`~cancelkit.OperationState.LOST` at most ``lease`` seconds (12) later, kept
    ``retention`` seconds more; an ended status is kept ``retention`` seconds and at most
    ``max_retained`` of them across the fleet (the oldest go first).

    Args:
        url: the server, as for :class:`RedisBackend`.
        prefix: the start of every key; the same as the backend's is fine (the keys differ).
        timeout: the bound, in seconds, on every Redis call (and on connecting).
        heartbeat: seconds between refreshes of this worker's liveness and running statuses.
        lease: seconds after its last heartbeat that a worker counts as gone; at least twice
            ``heartbeat``; 12 by default (or 3 heartbeats). At least the backend's ``lease``
            plus 2 ``heartbeat``: then a ``lost`` id can be started again at once.
        retention: seconds an ended (or lost) status is kept.
        max_retained: the most ended statuses kept.
        max_running: the most operations running across the fleet (``None``: no fleet-wide
            limit; each worker's :class:`~cancelkit.BackgroundOperations` still has its own).
        max_running_per_owner: the most operations one owner runs across the fleet.

    Raises:
        ValueError: if an option is out of range.

    .. versionadded:: 0.1
    """

    __slots__ = (
        "_conn",
        "_down",
        "_entered",
        "_heartbeat",
        "_keys",
        "_lease_ms",
        "_local",
        "_max",
        "_max_running",
        "_max_running_per_owner",
        "_pending",
        "_prefix",
        "_retention_ms",
        "_running_ms",
        "_stack",
        "_timeout",
        "_url",
        "_worker",
    )

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "cancelkit",
        timeout: float = 1.0,
        heartbeat: float = 1.0,
        lease: float | None = None,
        retention: float = 3600.0,
        max_retained: int = 10_000,
        max_running: int | None = None,
        max_running_per_owner: int | None = None,
    ) -> None:
        """Configure the store; nothing connects until it is entered."""
        limits = {"max_running": max_running, "max_running_per_owner": max_running_per_owner}
        lease = _validate(
            prefix,
            lease,
            max_retained,
            limits,
            timeout=timeout,
            heartbeat=heartbeat,
            retention=retention,
        )
        self._max_running = max_running
        self._max_running_per_owner = max_running_per_owner
        self._conn = Connection(url, timeout=float(timeout), fail_open=False)
        self._url = url
        self._timeout = float(timeout)
        self._stack: AsyncExitStack | None = None
        self._prefix = prefix
        self._keys = prefix  # where the keys start: on a cluster, "{prefix}" (one slot)
        self._heartbeat = float(heartbeat)
        self._lease_ms = math.ceil(lease * 1000)
        self._retention_ms = math.ceil(retention * 1000)
        self._running_ms = self._lease_ms + self._retention_ms
        self._max = max_retained
        self._worker: str | None = None
        # this worker's running operations: status key -> (name, the owner's running set)
        self._local: dict[str, tuple[str, str, str]] = {}  # key -> name, owner set, value
        self._entered = 0  # nested entries (the application's and BackgroundOperations')
        # ended statuses whose write failed, retried by the heartbeat (the newest per key)
        self._pending: dict[str, tuple[list[str], list[str]]] = {}
        self._down = False  # a failure was logged; the next success logs the recovery

    @property
    def worker(self) -> str | None:
        """This worker's id in the store while it runs (a new one at every start)."""
        return self._worker

    def _key(self, name: str) -> str:
        return f"{self._keys}:o:s:{name}"

    @property
    def _alive(self) -> str:
        return f"{self._keys}:o:a:{self._worker}"

    async def __aenter__(self) -> RedisStatusStore:
        """Connect and start the heartbeat.

        It may be entered again while it runs (by :class:`~cancelkit.BackgroundOperations`
        inside an application that entered it to read statuses longer); the last exit stops it.

        Raises:
            RedisUnavailable: if Redis does not answer within ``timeout`` (a failed attempt,
                such as a connection killed during the first ping, is tried again within it).
        """
        if self._stack is not None:
            self._entered += 1
            return self
        self._worker = secrets.token_urlsafe(9)  # made here, after any fork
        try:  # a connection killed during the first ping does not fail it: retried
            await self._conn.start(lambda: _open(self))
        except BaseException:
            self._worker = None
            raise
        self._entered = 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the heartbeat and disconnect (running statuses left behind read as lost).

        Never raises what a closing connection raised (it is logged at debug level).
        """
        stack = self._stack
        if stack is None:
            return
        self._entered -= 1
        if self._entered:
            return
        self._stack = None
        try:
            await close_quietly(stack, f"RedisStatusStore worker {self._worker}")
        finally:
            self._conn.close()
            self._worker = None
            self._local.clear()

    @property
    def _limited(self) -> bool:
        return self._max_running is not None or self._max_running_per_owner is not None

    async def _beat_once(self, local: dict[str, tuple[str, str, str]] | None = None) -> None:
        keys = [self._alive, f"{self._keys}:o:r"]
        names = []
        for key, (name, owner_set, value) in (self._local if local is None else local).items():
            keys += [key, owner_set]
            names += [name, value]
        expiry = time.time_ns() // 1_000_000 + self._lease_ms
        args = [str(self._lease_ms), str(self._running_ms), str(self._worker), str(expiry)]
        args += ["1" if self._limited else "0", *names]
        await _call(self, "beat", keys, args)

    async def _confirm(self, key: str, name: str, owner_set: str, value: str) -> None:
        """Give a first running status its full TTL (the heartbeat does it if this fails)."""
        try:
            await self._beat_once({key: (name, owner_set, value)})
        except RedisUnavailable as exc:
            logger.debug("running status %s not confirmed yet (%s); the heartbeat will", key, exc)

    async def put(self, status: OperationStatus) -> None:
        """See :meth:`StatusStore.put <cancelkit.StatusStore.put>`.

        An ended status that cannot be written is kept (up to 10,000) and written by the
        heartbeat once Redis is back: an operation that ended in an outage does not read lost.
        A new running status lives ``lease`` until its write answered (a late one is gone a
        lease later). A write of a run that is not the id's current one changes nothing.

        Raises:
            RedisUnavailable: if Redis does not answer within ``timeout``.
            RegistryFull: for a new running status beyond ``max_running`` or
                ``max_running_per_owner`` (across the fleet); nothing was written.
        """
        name = _name(status.id, status.owner)
        key = self._key(name)
        running = not status.state.ended
        first = running and key not in self._local  # it lives one lease until confirmed
        run = _run_marker(status)
        text = json.dumps(status.to_json(), separators=(",", ":"))
        value = f"{'r' if running else 'e'} {status.worker or '-'} {run} {text}"
        owner_set = _owner_set(self._keys, status.owner)
        keys = [key, f"{self._keys}:o:z", self._alive, owner_set, f"{self._keys}:o:r"]
        args = [
            value,
            str(self._lease_ms if first else self._running_ms if running else self._retention_ms),
            "r" if running else "e",
            run,
            str(self._max),
            str(time.time_ns() // 1_000_000),
            name,
            str(self._lease_ms),
            self._key(""),
            str(self._retention_ms),
            str(self._max_running_per_owner or 0),
            str(self._max_running or 0),
            "1" if self._limited else "0",
            "1" if first else "0",
        ]
        if running:
            result = int(await _call(self, "put", keys, args))
            if result == 0:  # a late write of a run that ended
                self._local.pop(key, None)
                return
            if result == -1:
                raise RegistryFull("max_running_per_owner", self._max_running_per_owner or 0)
            if result == -2:
                raise RegistryFull("max_running", self._max_running or 0)
            self._local[key] = (name, owner_set, value)
            if first:
                await self._confirm(key, name, owner_set, value)
            return
        self._local.pop(key, None)
        self._pending.pop(key, None)  # this write supersedes an older failed one
        try:
            await _call(self, "put", keys, args)
        except RedisUnavailable:
            if len(self._pending) >= 10_000:  # bounded: the oldest failed write is dropped
                del self._pending[next(iter(self._pending))]
            self._pending[key] = (keys, args)  # the heartbeat writes it once Redis is back
            raise

    async def get(self, id: str, owner: str | None) -> OperationStatus | None:
        """See :meth:`StatusStore.get <cancelkit.StatusStore.get>`.

        A running status whose worker stopped answering comes back as ``lost``, with an
        :class:`~cancelkit.OperationError` of type ``WorkerLost`` saying so.

        Raises:
            RedisUnavailable: if Redis does not answer within ``timeout``.
        """
        result = await _call(self, "get", [self._key(_name(id, owner))], [f"{self._keys}:o:a:"])
        if result is None:
            return None
        value, gone = str(result[0]), int(result[1])
        status = OperationStatus.from_json(json.loads(value.split(" ", 3)[3]))
        if gone:
            status = OperationStatus(
                status.id,
                status.owner,
                OperationState.LOST,
                status.started_at,
                progress=status.progress,
                worker=status.worker,
                error=OperationError(
                    "WorkerLost",
                    f"worker {status.worker} stopped answering before the operation ended; "
                    "its outcome is unknown",
                ),
            )
        return status

    def __repr__(self) -> str:
        state = "stopped" if self._stack is None else "running"
        return (
            f"<RedisStatusStore {redact(self._url)} prefix={self._prefix!r} "
            f"worker={self._worker} {state} running={len(self._local)}>"
        )


async def _beat(store: RedisStatusStore) -> None:
    """The heartbeat: failed final writes first, then liveness and running statuses."""
    while True:
        await anyio.sleep(store._heartbeat)
        try:
            while store._pending:  # final statuses that could not be written, oldest first
                key = next(iter(store._pending))
                keys, args = store._pending[key]
                await _call(store, "put", keys, args)
                if store._pending.get(key) == (keys, args):
                    del store._pending[key]
            await store._beat_once()
        except RedisUnavailable as exc:
            if not store._down:
                store._down = True
                logger.warning(
                    "status heartbeat failed (%s); this worker's running operations read "
                    "as lost once the lease passes; retrying every %s s",
                    exc,
                    store._heartbeat,
                )
        else:
            if store._down:
                store._down = False
                logger.warning("status heartbeat works again")
