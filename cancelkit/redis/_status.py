"""RedisStatusStore: the statuses of background operations, readable from every worker.

Keys (``P`` is the prefix; ``N`` an owner-scoped name, ``-:<id>`` or ``<len>:<owner>:<id>``):

- ``P:o:s:N`` — one status: ``"<r|e> <worker> <run> <json>"`` (``r`` running, ``e`` ended;
  ``run`` tells one run of an id from the next). A running status lives ``lease + retention``
  and is refreshed by its worker's heartbeat; an ended one lives ``retention``.
- ``P:o:a:<worker>`` — the worker is alive; TTL ``lease``, refreshed every ``heartbeat``. A
  running status whose worker has no such key reads as ``lost``.
- ``P:o:z`` — the ended statuses by end time, trimmed to ``max_retained`` (and by time).

Standalone Redis or Valkey (the scripts name the keys of the statuses they trim).
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
import coredis
import coredis.exceptions
from anyio.abc import TaskGroup
from coredis.commands import Script
from coredis.retry import ConstantRetryPolicy

from .._operations import OperationError, OperationState, OperationStatus
from ._connection import RedisUnavailable, _Pool, leaf, redact

__all__ = ["RedisStatusStore"]

logger = logging.getLogger("cancelkit.redis")

_PREFIX = re.compile(r"[^\s]{1,64}")

# KEYS: status, ended set, this worker's alive key.
# ARGV: value, ttl ms, "r"/"e", run, max retained, now ms, name, lease ms, status key prefix,
#       retention ms.
_PUT = """
local old = redis.call('GET', KEYS[1])
if ARGV[3] == 'r' then
  if old and string.sub(old, 1, 2) == 'e ' then
    local _, _, run = string.find(old, '^e %S+ (%S+) ')
    if run == ARGV[4] then return 0 end
  end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[7])
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[8])
  return 1
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local now = tonumber(ARGV[6])
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

# KEYS: alive key, then the statuses of this worker's running operations.
# ARGV: lease ms, running ttl ms, this worker.
_BEAT = """
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
for i = 2, #KEYS do
  local value = redis.call('GET', KEYS[i])
  if value and string.sub(value, 1, 3 + #ARGV[3]) == 'r ' .. ARGV[3] .. ' ' then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
  end
end
return 1
"""


def _name(id: str, owner: str | None) -> str:
    return f"-:{id}" if owner is None else f"{len(owner)}:{owner}:{id}"


def _run_marker(status: OperationStatus) -> str:
    return f"{status.worker or '-'}/{status.started_at!r}"


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
    read as :attr:`~cancelkit.OperationState.LOST` at most ``lease`` seconds later, kept
    ``retention`` seconds more; an ended status is kept ``retention`` seconds and at most
    ``max_retained`` of them across the fleet (the oldest go first).

    Args:
        url: the server, as for :class:`RedisBackend`.
        prefix: the start of every key; the same as the backend's is fine (the keys differ).
        timeout: the bound, in seconds, on every Redis call (and on connecting).
        heartbeat: seconds between refreshes of this worker's liveness and running statuses.
        lease: seconds after its last heartbeat that a worker counts as gone; at least twice
            ``heartbeat``; three heartbeats by default.
        retention: seconds an ended (or lost) status is kept.
        max_retained: the most ended statuses kept.

    Raises:
        ValueError: if an option is out of range.

    .. versionadded:: 0.2
    """

    __slots__ = (
        "_client",
        "_entered",
        "_heartbeat",
        "_lease_ms",
        "_local",
        "_max",
        "_prefix",
        "_retention_ms",
        "_running_ms",
        "_scripts",
        "_stack",
        "_task_group",
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
    ) -> None:
        """Configure the store; nothing connects until it is entered."""
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(f"prefix must be 1 to 64 characters without whitespace: {prefix!r}")
        for option, value in (
            ("timeout", timeout),
            ("heartbeat", heartbeat),
            ("retention", retention),
        ):
            if not 0 < value < math.inf:
                raise ValueError(f"{option} must be seconds > 0, not {value!r}")
        if lease is None:
            lease = 3 * heartbeat
        if not 2 * heartbeat <= lease < math.inf:
            raise ValueError(f"lease must be seconds >= 2 * heartbeat, not {lease!r}")
        if max_retained < 1:
            raise ValueError(f"max_retained must be >= 1, not {max_retained!r}")
        self._url = url
        self._prefix = prefix
        self._timeout = float(timeout)
        self._heartbeat = float(heartbeat)
        self._lease_ms = math.ceil(lease * 1000)
        self._retention_ms = math.ceil(retention * 1000)
        self._running_ms = self._lease_ms + self._retention_ms
        self._max = max_retained
        self._worker: str | None = None
        self._client: coredis.Redis[str] | None = None
        self._scripts: dict[str, Script[str]] = {}
        self._stack: AsyncExitStack | None = None
        self._task_group: TaskGroup | None = None
        self._local: dict[str, None] = {}  # status keys of this worker's running operations
        self._entered = 0  # nested entries (the application's and BackgroundOperations')

    @property
    def worker(self) -> str | None:
        """This worker's id in the store while it runs (a new one at every start)."""
        return self._worker

    def _key(self, name: str) -> str:
        return f"{self._prefix}:o:s:{name}"

    @property
    def _alive(self) -> str:
        return f"{self._prefix}:o:a:{self._worker}"

    async def __aenter__(self) -> RedisStatusStore:
        """Connect and start the heartbeat.

        It may be entered again while it runs (by :class:`~cancelkit.BackgroundOperations`
        inside an application that entered it to read statuses longer); the last exit stops it.

        Raises:
            RedisUnavailable: if Redis does not answer within ``timeout``.
        """
        if self._stack is not None:
            self._entered += 1
            return self
        self._worker = secrets.token_urlsafe(9)  # made here, after any fork
        stack = AsyncExitStack()
        try:
            pool = _Pool.from_url(
                self._url,
                decode_responses=True,
                connect_timeout=self._timeout / 2,
                stream_timeout=self._timeout,
                timeout=self._timeout,
            )
            client: coredis.Redis[str] = coredis.Redis(
                connection_pool=pool,
                decode_responses=True,
                retry_policy=ConstantRetryPolicy(
                    (coredis.exceptions.ConnectionError, TimeoutError), retries=1, delay=0.01
                ),
            )
            await stack.enter_async_context(client)
            with anyio.fail_after(self._timeout * 2):
                await client.ping()
            self._client = client
            self._scripts = {
                "put": client.register_script(_PUT),
                "get": client.register_script(_GET),
                "beat": client.register_script(_BEAT),
            }
            await self._beat_once()
            self._task_group = await stack.enter_async_context(anyio.create_task_group())
            self._task_group.start_soon(self._beat)
        except BaseException as exc:
            self._client = self._task_group = None
            self._worker = None
            await stack.aclose()
            if isinstance(exc, Exception):  # any failure to connect or to answer
                raise RedisUnavailable(
                    f"cannot reach Redis at {redact(self._url)}: {leaf(exc)}"
                ) from exc
            raise
        self._stack = stack
        self._entered = 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the heartbeat and disconnect (running statuses left behind read as lost)."""
        if self._stack is None:
            return
        self._entered -= 1
        if self._entered:
            return
        stack, self._stack = self._stack, None
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()
        try:
            await stack.aclose()
        finally:
            self._client = self._task_group = None
            self._worker = None
            self._local.clear()

    async def _beat(self) -> None:
        while True:
            await anyio.sleep(self._heartbeat)
            try:
                await self._beat_once()
            except RedisUnavailable as exc:
                logger.warning("status heartbeat failed: %s", exc)

    async def _beat_once(self) -> None:
        keys = [self._alive, *self._local]
        args = [str(self._lease_ms), str(self._running_ms), str(self._worker)]
        await self._call("beat", keys, args)

    async def _call(self, script: str, keys: list[str], args: list[str]) -> Any:
        if self._client is None:
            raise RuntimeError(
                "RedisStatusStore is not running: enter it first (BackgroundOperations "
                "enters its store)"
            )
        try:
            with anyio.fail_after(self._timeout):
                return await self._scripts[script](keys=keys, args=args)
        except Exception as exc:  # error replies (BUSY, OOM...) too: never raw, never fatal
            raise RedisUnavailable(
                f"Redis at {redact(self._url)} did not answer: {leaf(exc)}"
            ) from exc

    async def put(self, status: OperationStatus) -> None:
        """See :meth:`StatusStore.put <cancelkit.StatusStore.put>`.

        Raises:
            RedisUnavailable: if Redis does not answer within ``timeout``.
        """
        name = _name(status.id, status.owner)
        key = self._key(name)
        running = not status.state.ended
        run = _run_marker(status)
        text = json.dumps(status.to_json(), separators=(",", ":"))
        value = f"{'r' if running else 'e'} {status.worker or '-'} {run} {text}"
        if running:
            self._local[key] = None
        else:
            self._local.pop(key, None)
        await self._call(
            "put",
            [key, f"{self._prefix}:o:z", self._alive],
            [
                value,
                str(self._running_ms if running else self._retention_ms),
                "r" if running else "e",
                run,
                str(self._max),
                str(time.time_ns() // 1_000_000),
                name,
                str(self._lease_ms),
                self._key(""),
                str(self._retention_ms),
            ],
        )

    async def get(self, id: str, owner: str | None) -> OperationStatus | None:
        """See :meth:`StatusStore.get <cancelkit.StatusStore.get>`.

        A running status whose worker stopped answering comes back as ``lost``, with an
        :class:`~cancelkit.OperationError` of type ``WorkerLost`` saying so.

        Raises:
            RedisUnavailable: if Redis does not answer within ``timeout``.
        """
        result = await self._call("get", [self._key(_name(id, owner))], [f"{self._prefix}:o:a:"])
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
        """Show the server (password hidden), prefix, worker and local running statuses."""
        state = "stopped" if self._client is None else "running"
        return (
            f"<RedisStatusStore {redact(self._url)} prefix={self._prefix!r} "
            f"worker={self._worker} {state} running={len(self._local)}>"
        )
