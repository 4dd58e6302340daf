"""RedisBackend: the state of TokenRegistry and LatestOnly shared across workers and hosts.

Install the extra (``pip install cancelkit[redis]``); the client is
`coredis <https://coredis.readthedocs.io>`_, which runs on asyncio and on trio.

.. versionadded:: 0.1
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import time
from collections import deque
from collections.abc import Sequence
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Any, final
from urllib.parse import urlsplit, urlunsplit

import anyio
import coredis
import coredis.exceptions
from anyio.abc import TaskGroup, TaskStatus
from coredis.commands import Script
from coredis.retry import ConstantRetryPolicy, NoRetryPolicy

from . import _redis_scripts as lua
from ._reason import CancelKind, CancelReason
from .backends import Acquired, CancelOutcome, Deliver, OperationExists, RegistryFull

__all__ = ["RedisBackend", "RedisBackendStatistics", "RedisUnavailable"]

logger = logging.getLogger("cancelkit.redis")

_PREFIX = re.compile(r"[^\s]{1,64}")
_REDIS_ERRORS = (coredis.exceptions.ConnectionError, TimeoutError, OSError)


class RedisUnavailable(Exception):
    """Redis cannot be reached (at start, or for an operation that needs it).

    Raised by ``async with RedisBackend(...)`` when the server does not answer, by
    :meth:`TokenRegistry.cancel <cancelkit.TokenRegistry.cancel>` for an operation that is not
    running in this worker while Redis is unreachable, and, with ``fail_open=False``, by new
    registrations and claims while Redis is unreachable.

    .. versionadded:: 0.1
    """


_BUFFERS = tuple(
    f"_{name}_buffer_{end}"
    for name in ("write", "push_message", "streamed_message")
    for end in ("in", "out")
)


def _close_buffers(connection: object) -> None:
    for name in _BUFFERS:
        stream = getattr(connection, name, None)
        if stream is not None:
            stream.close()


class _Pool(coredis.ConnectionPool[coredis.BaseConnection]):
    """coredis's pool, made robust against the connection losses this backend lives with.

    coredis 6.9 loses a pool slot when a leased connection dies (a killed pub/sub connection,
    a restarted server) or when the caller is cancelled while a connection is being made;
    after ``max_connections`` such events every command waits forever. Here a dead connection
    gives its slot back, and making a connection is shielded (it is bounded by the connect
    timeout instead).
    """

    _making: set[coredis.BaseConnection]

    async def _construct_connection(self) -> coredis.BaseConnection:
        connection = await super()._construct_connection()
        self.__dict__.setdefault("_making", set()).add(connection)
        return connection

    async def get_connection(self, **kwargs: Any) -> coredis.BaseConnection:
        with anyio.CancelScope(shield=True):
            try:
                connection = await super().get_connection(**kwargs)
            except BaseException:
                # coredis leaves the buffers of a connection that failed to connect open
                for failed in self.__dict__.get("_making", ()):
                    if not failed.usable:
                        _close_buffers(failed)
                self.__dict__.get("_making", set()).clear()
                raise
        self.__dict__.get("_making", set()).discard(connection)
        return connection

    def release(self, connection: coredis.BaseConnection) -> None:
        super().release(connection)
        available = self._available_connections
        if not connection.usable and connection not in available and not available.full():
            available.append_nowait(None)


class _Down(Exception):
    """Internal: Redis did not answer (already logged and counted)."""


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
        deliveries: cancellations delivered to local holders (by message, resync or directly).
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


@final
class _Reg:
    __slots__ = ("deliver", "holder", "id", "name", "synced")

    def __init__(self, id: str, name: str, holder: str, deliver: Deliver) -> None:
        self.id = id
        self.name = name
        self.holder = holder
        self.deliver = deliver
        self.synced = False  # whether the heartbeat re-asserts it (set once it is recorded)


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


def _dump(reason: CancelReason) -> str:
    return json.dumps(_encode(reason), separators=(",", ":"))


def _encode(reason: CancelReason) -> dict[str, Any]:
    data: dict[str, Any] = {"k": reason.kind.value, "m": reason.message, "a": reason.at}
    if reason.source is not None:
        data["s"] = reason.source
    if reason.origin is not None:
        data["o"] = _encode(reason.origin)
    return data


def _load(text: str) -> CancelReason:
    return _decode(json.loads(text))


def _decode(data: dict[str, Any]) -> CancelReason:
    origin = data.get("o")
    return CancelReason(
        CancelKind(data["k"]),
        message=data["m"],
        source=data.get("s"),
        origin=None if origin is None else _decode(origin),
        at=data["a"],
    )


def _leaf(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def _local_generation(last: int) -> int:
    return max(last + 1, time.time_ns() // 1000)


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
    ``heartbeat`` seconds for live entries, so a crashed worker leaves nothing behind.
    Pub/sub carries the cancellations; because it drops messages while reconnecting, every
    re-subscribe and every heartbeat re-reads the state of this worker's entries and delivers
    what was lost.

    When Redis becomes unreachable, the failure is logged once, no call waits longer than
    ``timeout``, and the backend keeps trying to reconnect every ``retry_delay`` seconds;
    once back it re-asserts this worker's entries (Redis's view wins on conflicts). Meanwhile,
    with ``fail_open=True`` (the default) work goes on with this worker's local semantics
    (claims supersede claims of the same worker; cancels reach operations of this worker);
    with ``fail_open=False`` new registrations and claims raise :exc:`RedisUnavailable`.
    A cancel of an operation not running in this worker raises :exc:`RedisUnavailable` in
    both modes. Standalone Redis or Valkey (not Redis Cluster).

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
            one more raises :exc:`~cancelkit.RegistryFull`.

    Raises:
        ValueError: if an option is out of range.

    .. versionadded:: 0.1
    """

    __slots__ = (
        "_alive",
        "_channel",
        "_channel_prefix",
        "_claims",
        "_cleanup",
        "_client",
        "_deliveries",
        "_fail_open",
        "_failures",
        "_heartbeat",
        "_keys",
        "_last_generation",
        "_lease_ms",
        "_max",
        "_messages",
        "_names",
        "_owners",
        "_prefix",
        "_reader_scope",
        "_reconnects",
        "_regs",
        "_resyncs",
        "_retry_delay",
        "_scripts",
        "_stack",
        "_task_group",
        "_timeout",
        "_tomb_ms",
        "_up",
        "_url",
        "_worker",
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
    ) -> None:
        """Configure the backend; nothing connects until it is entered."""
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(f"prefix must be 1 to 64 characters without whitespace: {prefix!r}")
        for name, value in (
            ("timeout", timeout),
            ("heartbeat", heartbeat),
            ("retry_delay", retry_delay),
            ("tombstone_ttl", tombstone_ttl),
        ):
            if not 0 < value < math.inf:
                raise ValueError(f"{name} must be seconds > 0, not {value!r}")
        if lease is None:
            lease = 5 * heartbeat
        if not 2 * heartbeat <= lease < math.inf:
            raise ValueError(f"lease must be seconds >= 2 * heartbeat, not {lease!r}")
        if max_tombstones < 1:
            raise ValueError(f"max_tombstones must be an int >= 1, not {max_tombstones!r}")
        self._url = url
        self._prefix = prefix
        self._fail_open = fail_open
        self._timeout = float(timeout)
        self._heartbeat = float(heartbeat)
        self._lease_ms = str(math.ceil(lease * 1000))
        self._retry_delay = float(retry_delay)
        self._tomb_ms = str(math.ceil(tombstone_ttl * 1000))
        self._max = max_tombstones
        self._channel_prefix = f"{prefix}:w:"
        self._worker: str | None = None
        self._channel = self._alive = ""
        self._client: coredis.Redis[str] | None = None
        self._scripts: dict[str, Script[str]] = {}
        self._stack: AsyncExitStack | None = None
        self._task_group: TaskGroup | None = None
        self._reader_scope: anyio.CancelScope | None = None
        self._up = False
        self._regs: dict[str, _Reg] = {}  # holder -> registration
        self._names: dict[str, str] = {}  # operation name -> holder
        self._claims: dict[str, _Claim] = {}  # holder -> claim
        self._keys: dict[str, dict[str, _Claim]] = {}  # key -> this worker's claims, oldest first
        self._owners: dict[str, str] = {}  # key -> the holder that owns it (as far as we know)
        self._last_generation = 0
        self._cleanup: deque[tuple[str, list[str], list[str]]] = deque(maxlen=100_000)
        self._messages = self._deliveries = self._resyncs = self._reconnects = 0
        self._failures = 0

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def worker(self) -> str | None:
        """This worker's id while the backend runs (a new one at every start), else ``None``."""
        return self._worker

    async def __aenter__(self) -> RedisBackend:
        """Connect, subscribe and start the heartbeat.

        Raises:
            RedisUnavailable: if Redis does not answer within ``timeout``.
            RuntimeError: if the backend is already running.
        """
        if self._stack is not None:
            raise RuntimeError("this RedisBackend is already running")
        self._worker = secrets.token_urlsafe(9)  # made here, after any fork: one per process
        self._channel = self._channel_prefix + self._worker
        self._alive = f"{self._prefix}:a:{self._worker}"
        stack = AsyncExitStack()
        try:
            pool = _Pool.from_url(
                self._url,
                decode_responses=True,
                connect_timeout=self._timeout / 2,  # coredis gives up before fail_after
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
                name: client.register_script(getattr(lua, name)) for name in lua.__all__
            }
            self._task_group = await stack.enter_async_context(anyio.create_task_group())
            await self._task_group.start(self._reader)
        except BaseException as exc:
            self._client = self._task_group = None
            self._worker = None
            await stack.aclose()
            if isinstance(exc, RedisUnavailable):
                raise
            if isinstance(exc, (*_REDIS_ERRORS, coredis.exceptions.RedisError)):
                raise RedisUnavailable(
                    f"cannot reach Redis at {_redact(self._url)}: {_leaf(exc)}"
                ) from exc
            raise
        self._task_group.start_soon(self._beat)
        self._stack = stack
        logger.debug("RedisBackend worker %s started", self._worker)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        """Stop the background tasks and disconnect (entries left in Redis expire)."""
        stack, self._stack = self._stack, None
        if stack is None:
            return
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()
        try:
            await stack.aclose()
        finally:
            self._client = self._task_group = self._reader_scope = None
            self._up = False
            self._worker = None

    def _require(self) -> coredis.Redis[str]:
        if self._client is None:
            raise RuntimeError(
                "RedisBackend is not running: enter it first (`async with backend:`, for "
                "example in the application's lifespan)"
            )
        return self._client

    # -- talking to Redis --------------------------------------------------------------

    async def _run(
        self, script: str, keys: Sequence[str], args: Sequence[str], *, force: bool = False
    ) -> Any:
        self._require()
        if not (self._up or force):
            raise _Down
        try:
            with anyio.fail_after(self._timeout):
                return await self._scripts[script](keys=keys, args=args)
        except _REDIS_ERRORS as exc:
            self._mark_down(exc)
            raise _Down from exc

    def _mark_down(self, exc: BaseException) -> None:
        if self._up:
            self._up = False
            self._failures += 1
            mode = "running on local state" if self._fail_open else "refusing new work"
            logger.warning(
                "Redis at %s is unreachable (%s); %s until it is back",
                _redact(self._url),
                _leaf(exc),
                mode,
            )
        if self._reader_scope is not None:
            self._reader_scope.cancel()  # resubscribe (and resync) from scratch

    async def _reader(self, *, task_status: TaskStatus[None]) -> None:
        client = self._require()
        started = False
        while True:
            try:
                async with client.pubsub(
                    channels=[self._channel],
                    ignore_subscribe_messages=True,
                    retry_policy=NoRetryPolicy(),
                    subscription_timeout=self._timeout,
                    max_idle_seconds=self._heartbeat,
                ) as pubsub:
                    with anyio.CancelScope() as scope:
                        self._reader_scope = scope
                        await self._resync(force=True)  # after subscribing: nothing is missed
                        if not self._up:
                            if started:
                                logger.warning("Redis at %s is reachable again", _redact(self._url))
                            self._up = True
                        if not started:
                            started = True
                            task_status.started()
                        while True:
                            message = await pubsub.get_message()
                            if message is not None and message["type"] == "message":
                                self._messages += 1
                                self._on_line(str(message["data"]))
            except Exception as exc:
                if not started:
                    raise RedisUnavailable(
                        f"cannot subscribe at {_redact(self._url)}: {_leaf(exc)}"
                    ) from exc
                # A lost subscription alone is not an outage: commands may still work. The
                # resync after the next subscribe delivers what was published meanwhile.
                logger.debug("pub/sub connection lost (%s); resubscribing", _leaf(exc))
            finally:
                self._reader_scope = None
            self._reconnects += 1
            await anyio.sleep(self._retry_delay)

    async def _beat(self) -> None:
        while True:
            await anyio.sleep(self._heartbeat)
            for claim in self._claims.values():  # poll the handover waits: messages can be lost
                if claim.turn is not None:
                    claim.turn.set()
            if self._up:
                with suppress(_Down):
                    await self._resync()

    async def _resync(self, *, force: bool = False) -> None:
        """Refresh liveness and TTLs, re-assert lost entries, deliver lost cancellations."""
        self._resyncs += 1
        while self._cleanup:
            script, keys, args = self._cleanup[0]
            await self._run(script, keys, args, force=force)
            self._cleanup.popleft()
        entries: list[_Reg | _Claim] = [r for r in self._regs.values() if r.synced]
        entries += [c for c in self._claims.values() if c.synced]
        tz = f"{self._prefix}:tz"
        for start in range(0, max(len(entries), 1), 500):
            chunk = entries[start : start + 500]
            keys = [self._alive, tz]
            args = [str(self._worker), self._lease_ms]
            for entry in chunk:
                if isinstance(entry, _Reg):
                    keys += [self._key("r", entry.name), self._key("t", entry.name)]
                    args += ["r", entry.holder, self._key("i", entry.id)]
                else:
                    keys += [self._key("k", entry.key), self._key("q", entry.key)]
                    args += ["k", entry.holder, str(entry.generation)]
            lines = await self._run("SYNC", keys, args, force=force)
            for line in lines:
                self._on_line(str(line))
            for entry in chunk:  # released while the script ran: clean up again
                if isinstance(entry, _Reg) and entry.holder not in self._regs:
                    await self._unregister_remote(entry)
                elif isinstance(entry, _Claim) and entry.holder not in self._claims:
                    await self._release_remote(entry.key, entry.holder)

    def _on_line(self, line: str) -> None:
        kind, _, rest = line.partition(" ")
        holder, _, tail = rest.partition(" ")
        if kind == "c":
            reg = self._regs.get(holder)
            if reg is not None:
                self._deliver(reg.deliver, _load(tail))
        elif kind == "s":
            claim = self._claims.get(holder)
            if claim is not None:
                if self._owners.get(claim.key) == holder:
                    del self._owners[claim.key]
                self._deliver(claim.deliver, CancelReason(CancelKind.SUPERSEDED, source=tail))
        elif kind == "t":
            claim = self._claims.get(holder)
            if claim is not None and claim.turn is not None:
                claim.turn.set()
        elif kind == "l":
            logger.warning("registration %s was taken over by another worker", holder)

    def _deliver(self, deliver: Deliver, reason: CancelReason) -> None:
        self._deliveries += 1
        try:
            deliver(reason)
        except Exception:
            logger.exception("a deliver callback failed")

    def _key(self, kind: str, name: str) -> str:
        return f"{self._prefix}:{kind}:{name}"

    def _me(self, holder: str) -> str:
        return f"{self._worker} {holder}"

    @staticmethod
    def _name(id: str, owner: str | None) -> str:
        return f"-:{id}" if owner is None else f"{len(owner)}:{owner}:{id}"

    # -- TokenRegistry -----------------------------------------------------------------

    async def register(
        self, id: str, owner: str | None, holder: str, deliver: Deliver
    ) -> CancelReason | None:
        """See :meth:`Backend.register <cancelkit.backends.Backend.register>`.

        Raises:
            OperationExists: if the operation is registered already (by any worker).
            RedisUnavailable: with ``fail_open=False``, while Redis is unreachable.
        """
        self._require()
        name = self._name(id, owner)
        if name in self._names:
            raise OperationExists(id)
        reg = self._regs[holder] = _Reg(id, name, holder, deliver)  # record first
        self._names[name] = holder
        try:
            result = await self._run(
                "REGISTER",
                [
                    self._key("r", name),
                    self._key("t", name),
                    self._key("f", name),
                    self._tz,
                    self._key("i", id),
                ],
                [self._me(holder), self._lease_ms, self._tomb_ms],
            )
        except _Down:
            if not self._fail_open:
                self._forget_reg(reg)
                raise RedisUnavailable("Redis is unreachable; not starting new work") from None
            reg.synced = True  # asserted by the resync once Redis is back
            return None
        except BaseException:
            self._forget_reg(reg)
            raise
        if result[0] == -1:
            self._forget_reg(reg)
            raise ValueError(f"operation id {id!r} is already registered by another worker")
        reg.synced = True
        if result[0] == 1:  # tombstoned: recorded as cancelled until the caller unregisters
            return _load(str(result[1]))
        return None

    def _forget_reg(self, reg: _Reg) -> None:
        self._regs.pop(reg.holder, None)
        if self._names.get(reg.name) == reg.holder:
            del self._names[reg.name]

    @property
    def _tz(self) -> str:
        return f"{self._prefix}:tz"

    async def unregister(self, id: str, owner: str | None, holder: str) -> None:
        """See :meth:`Backend.unregister <cancelkit.backends.Backend.unregister>`."""
        reg = self._regs.get(holder)
        if reg is None:
            return
        self._forget_reg(reg)
        if self._client is not None:
            with anyio.CancelScope(shield=True):
                await self._unregister_remote(reg)

    async def _unregister_remote(self, reg: _Reg) -> None:
        keys = [self._key("r", reg.name), self._key("f", reg.name), self._key("i", reg.id)]
        args = [self._me(reg.holder), self._tomb_ms]
        try:
            await self._run("UNREGISTER", keys, args)
        except _Down:
            self._cleanup.append(("UNREGISTER", keys, args))

    async def cancel(self, id: str, owner: str | None, reason: CancelReason) -> CancelOutcome:
        """See :meth:`Backend.cancel <cancelkit.backends.Backend.cancel>`.

        Raises:
            RegistryFull: if a tombstone is needed and ``max_tombstones`` are live.
            RedisUnavailable: while Redis is unreachable, unless the operation runs in this
                worker.
        """
        self._require()
        name = self._name(id, owner)
        try:
            result = await self._run(
                "CANCEL",
                [
                    self._key("r", name),
                    self._key("t", name),
                    self._key("f", name),
                    self._tz,
                    self._key("i", id),
                ],
                [
                    _dump(reason),
                    self._tomb_ms,
                    str(self._max),
                    self._channel_prefix,
                    str(self._worker),
                ],
            )
        except _Down:
            holder = self._names.get(name)
            if holder is None:
                raise RedisUnavailable(
                    f"Redis is unreachable and operation {id!r} does not run in this worker"
                ) from None
            self._deliver(self._regs[holder].deliver, reason)
            return CancelOutcome.CANCELLED
        outcome = str(result[0])
        if outcome == "cancelled":
            if result[1] == self._worker and (reg := self._regs.get(str(result[2]))):
                self._deliver(reg.deliver, _load(str(result[3])))
            return CancelOutcome.CANCELLED
        if outcome == "full":
            raise RegistryFull("max_tombstones", self._max)
        return CancelOutcome(outcome)

    # -- LatestOnly --------------------------------------------------------------------

    async def acquire(
        self, key: str, holder: str, deliver: Deliver, *, replace: bool
    ) -> Acquired | None:
        """See :meth:`Backend.acquire <cancelkit.backends.Backend.acquire>`.

        Raises:
            RedisUnavailable: with ``fail_open=False``, while Redis is unreachable.
        """
        self._require()
        claim = self._claims[holder] = _Claim(key, holder, deliver)  # record first
        self._keys.setdefault(key, {})[holder] = claim
        try:
            result = await self._run(
                "ACQUIRE",
                [self._key("k", key), self._key("q", key), f"{self._prefix}:gen"],
                [
                    str(self._worker),
                    holder,
                    "1" if replace else "0",
                    self._lease_ms,
                    self._channel_prefix,
                    str(max(86_400_000, 4 * int(self._lease_ms))),
                ],
            )
        except _Down:
            if not self._fail_open:
                self._forget_claim(claim)
                raise RedisUnavailable("Redis is unreachable; not starting new work") from None
            return self._acquire_locally(claim, replace=replace)
        except BaseException:
            self._forget_claim(claim)
            raise
        if result[0] == 0:
            self._forget_claim(claim)
            return None
        claim.generation = int(result[1])
        self._last_generation = max(self._last_generation, claim.generation)
        previous = None
        if len(result) > 2:
            previous = str(result[3])
            if result[2] == self._worker and (old := self._claims.get(previous)):
                self._deliver(old.deliver, CancelReason(CancelKind.SUPERSEDED, source=holder))
        self._owners[key] = holder
        claim.synced = True
        return Acquired(claim.generation, previous)

    def _acquire_locally(self, claim: _Claim, *, replace: bool) -> Acquired | None:
        previous = self._owners.get(claim.key)
        if previous is not None and not replace:
            self._forget_claim(claim)
            return None
        claim.generation = self._last_generation = _local_generation(self._last_generation)
        self._owners[claim.key] = claim.holder
        claim.synced = True
        if previous is not None and (old := self._claims.get(previous)):
            self._deliver(old.deliver, CancelReason(CancelKind.SUPERSEDED, source=claim.holder))
        return Acquired(claim.generation, previous)

    def _forget_claim(self, claim: _Claim) -> None:
        self._claims.pop(claim.holder, None)
        local = self._keys.get(claim.key)
        if local is not None:
            local.pop(claim.holder, None)
            if not local:
                del self._keys[claim.key]
            else:
                for other in local.values():  # a local waiter may have its turn now
                    if other.turn is not None:
                        other.turn.set()
        if self._owners.get(claim.key) == claim.holder:
            del self._owners[claim.key]

    async def release(self, key: str, holder: str) -> None:
        """See :meth:`Backend.release <cancelkit.backends.Backend.release>`."""
        claim = self._claims.get(holder)
        if claim is None or claim.key != key:
            return
        self._forget_claim(claim)
        if self._client is not None:
            with anyio.CancelScope(shield=True):
                await self._release_remote(key, holder)

    async def _release_remote(self, key: str, holder: str) -> None:
        keys = [self._key("k", key), self._key("q", key)]
        args = [str(self._worker), holder, self._channel_prefix]
        try:
            await self._run("RELEASE", keys, args)
        except _Down:
            self._cleanup.append(("RELEASE", keys, args))

    async def wait_turn(self, key: str, holder: str) -> None:
        """See :meth:`Backend.wait_turn <cancelkit.backends.Backend.wait_turn>`.

        Raises:
            RedisUnavailable: with ``fail_open=False``, while Redis is unreachable.
        """
        self._require()
        while (claim := self._claims.get(holder)) is not None and claim.key == key:
            claim.turn = event = anyio.Event()
            try:
                if await self._run(
                    "TURN", [self._key("q", key)], [self._me(holder), f"{self._prefix}:a:"]
                ):
                    return
            except _Down:
                if not self._fail_open:
                    raise RedisUnavailable("Redis is unreachable; cannot wait for a turn") from None
                if next(iter(self._keys[key])) == holder:
                    return
            with anyio.move_on_after(self._heartbeat):
                await event.wait()

    async def generation(self, key: str) -> int | None:
        """See :meth:`Backend.generation <cancelkit.backends.Backend.generation>`.

        Raises:
            RedisUnavailable: with ``fail_open=False``, while Redis is unreachable.
        """
        client = self._require()
        if self._up:
            try:
                with anyio.fail_after(self._timeout):
                    value = await client.get(self._key("k", key))
            except _REDIS_ERRORS as exc:
                self._mark_down(exc)
            else:
                return None if value is None else int(value.rsplit(" ", 1)[1])
        if not self._fail_open:
            raise RedisUnavailable("Redis is unreachable; the generation is unknown")
        owner = self._owners.get(key)
        return None if owner is None else self._claims[owner].generation

    # -- introspection -----------------------------------------------------------------

    def statistics(self) -> RedisBackendStatistics:
        """Return a snapshot of this worker's view."""
        return RedisBackendStatistics(
            worker=self._worker,
            connected=self._up,
            registrations=len(self._regs),
            claims=len(self._claims),
            messages_received=self._messages,
            deliveries=self._deliveries,
            resyncs=self._resyncs,
            reconnects=self._reconnects,
            failures=self._failures,
        )

    def __repr__(self) -> str:
        """Show the server (password hidden), prefix, worker id, state and local entries."""
        state = "stopped" if self._client is None else ("up" if self._up else "down")
        return (
            f"<RedisBackend {_redact(self._url)} prefix={self._prefix!r} worker={self._worker} "
            f"{state} registrations={len(self._regs)} claims={len(self._claims)} "
            f"fail_open={self._fail_open}>"
        )
