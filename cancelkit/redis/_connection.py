"""Talking to Redis: the pool, the client, running scripts, and whether Redis is up."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from typing import Any, final
from urllib.parse import urlsplit, urlunsplit

import anyio
import coredis
import coredis.exceptions
from coredis.commands import Script
from coredis.retry import ConstantRetryPolicy

from ._cluster import (
    CLUSTER_ERRORS,
    cluster_client,
    cluster_scripts,
    is_cluster,
    load_scripts,
    report_error,
)

__all__ = ["REDIS_ERRORS", "Connection", "Down", "RedisUnavailable", "leaf", "redact"]

logger = logging.getLogger("cancelkit.redis")

#: What a Redis call raises when the server cannot be reached (or, on a cluster, while a slot
#: moves or its shard fails over).
REDIS_ERRORS = (coredis.exceptions.ConnectionError, TimeoutError, OSError, *CLUSTER_ERRORS)


class RedisUnavailable(Exception):
    """Redis cannot be reached (at start, or for an operation that needs it).

    Raised by ``async with RedisBackend(...)`` when the server does not answer, by
    :meth:`TokenRegistry.cancel <cancelkit.TokenRegistry.cancel>` for an operation that is not
    running in this worker while Redis is unreachable, and, with ``fail_open=False``, by new
    registrations and claims while Redis is unreachable.

    .. versionadded:: 0.1
    """


class Down(Exception):
    """Internal: Redis did not answer (already logged and counted)."""


def leaf(exc: BaseException) -> str:
    """The innermost first exception of a group, as ``Type: message``."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def redact(url: str) -> str:
    """The URL with its password hidden."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


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


@final
class Connection:
    """The client and the scripts; tracks whether Redis is up and retries lost cleanups.

    A call that cannot reach Redis marks it down (logged once), calls ``on_down`` (the listener
    resubscribes) and raises :exc:`Down`; the listener marks it up again once it has
    resubscribed and resynced.
    """

    __slots__ = (
        "_cleanup",
        "_client",
        "_fail_open",
        "_scripts",
        "_timeout",
        "_url",
        "cluster",
        "failures",
        "on_down",
        "up",
    )

    def __init__(self, url: str, *, timeout: float, fail_open: bool) -> None:
        self._url = url
        self._timeout = timeout
        self._fail_open = fail_open
        self._client: coredis.Redis[str] | coredis.RedisCluster[str] | None = None
        self._scripts: dict[str, Script[str]] = {}
        self._cleanup: deque[tuple[str, list[str], list[str]]] = deque(maxlen=100_000)
        self.up = False
        self.cluster = False  # known once open: whether the server is a Redis Cluster
        self.failures = 0
        self.on_down: Callable[[], None] | None = None

    @property
    def running(self) -> bool:
        """Whether the client exists (between :meth:`open` and :meth:`close`)."""
        return self._client is not None

    @property
    def client(self) -> coredis.Redis[str] | coredis.RedisCluster[str]:
        """The client; :exc:`RuntimeError` if the backend is not running."""
        if self._client is None:
            raise RuntimeError(
                "RedisBackend is not running: enter it first (`async with backend:`, for "
                "example in the application's lifespan)"
            )
        return self._client

    async def open(self, stack: AsyncExitStack, scripts: Mapping[str, str]) -> None:
        """Make the pool and the client (closed by ``stack``), ping, register ``scripts``."""
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
            cluster = await is_cluster(client, self._url)  # and ping
        chosen: coredis.Redis[str] | coredis.RedisCluster[str] = client
        if cluster:  # the node told us: use the cluster client (see ._cluster)
            chosen = cluster_client(self._url, timeout=self._timeout)
            # discovers the layout; each node's connect is bounded by the connect timeout
            await stack.enter_async_context(chosen)
            scripts = cluster_scripts(scripts)
            await load_scripts(chosen, scripts, within=self._timeout * 2)
        self._client = chosen
        self.cluster = cluster
        self._scripts = {name: chosen.register_script(text) for name, text in scripts.items()}

    def close(self) -> None:
        """Forget the client (its context was closed by the stack)."""
        self._client = None
        self._scripts = {}
        self.up = False

    async def run(
        self, script: str, keys: Sequence[str], args: Sequence[str], *, force: bool = False
    ) -> Any:
        """Run a script; :exc:`Down` if Redis is down (unless ``force``) or does not answer."""
        self.client  # noqa: B018 - raises if not running
        if not (self.up or force):
            raise Down
        try:
            with anyio.fail_after(self._timeout):
                return await self._scripts[script](keys=keys, args=args)
        except REDIS_ERRORS as exc:
            report_error(self.client, exc)
            self.mark_down(exc)
            raise Down from exc

    async def get(self, key: str) -> str | None:
        """GET a key; :exc:`Down` if Redis is down or does not answer."""
        client = self.client
        if not self.up:
            raise Down
        try:
            with anyio.fail_after(self._timeout):
                return await client.get(key)
        except REDIS_ERRORS as exc:
            self.mark_down(exc)
            raise Down from exc

    async def run_or_defer(self, script: str, keys: list[str], args: list[str]) -> None:
        """Run an idempotent cleanup script now, or at the next resync if Redis is down."""
        try:
            await self.run(script, keys, args)
        except Down:
            self._cleanup.append((script, keys, args))

    async def drain(self, *, force: bool = False) -> None:
        """Run the cleanups that failed earlier, oldest first (stops at the first failure)."""
        while self._cleanup:
            script, keys, args = self._cleanup[0]
            await self.run(script, keys, args, force=force)
            self._cleanup.popleft()

    def mark_down(self, exc: BaseException) -> None:
        """Record that Redis did not answer (logged once per outage)."""
        if self.up:
            self.up = False
            self.failures += 1
            mode = "running on local state" if self._fail_open else "refusing new work"
            logger.warning(
                "Redis at %s is unreachable (%s); %s until it is back",
                redact(self._url),
                leaf(exc),
                mode,
            )
        if self.on_down is not None:
            self.on_down()
