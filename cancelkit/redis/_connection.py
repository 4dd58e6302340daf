"""Talking to Redis: the pool, the client, running scripts, and whether Redis is up."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, contextmanager
from contextvars import ContextVar
from typing import Any, NoReturn, final
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.lowlevel
import coredis
import coredis.exceptions
from coredis.commands import Script
from coredis.retry import NoRetryPolicy

from .._exceptions import RedisUnavailable
from ._cluster import (
    CLUSTER_ERRORS,
    cluster_client,
    cluster_scripts,
    is_cluster,
    load_scripts,
    report_error,
)

__all__ = ["REDIS_ERRORS", "Connection", "Down", "close_quietly", "leaf", "redact"]

logger = logging.getLogger("cancelkit.redis")

#: Pause between attempts of one call (the call as a whole is bounded by ``timeout``).
_RETRY_PAUSE = 0.01

#: Error replies that say the server cannot serve the call *now*; anything else the server
#: answers (a script bug, WRONGTYPE from a foreign key under our prefix, NOPERM) is not
#: retried. Either way the caller gets the documented "Redis unavailable" outcome.
_TRANSIENT = (
    "BUSY",
    "LOADING",
    "READONLY",
    "OOM",
    "MASTERDOWN",
    "TRYAGAIN",
    "NOREPLICAS",
    "CLUSTERDOWN",
    "NOSCRIPT",
    "MISCONF",
    "UNBLOCKED",
    "EXECABORT",
)


def _transient(exc: Exception) -> bool:
    if isinstance(
        exc, (coredis.exceptions.ReadOnlyError, coredis.exceptions.NoScriptError, *CLUSTER_ERRORS)
    ):
        return True
    if isinstance(
        exc, coredis.exceptions.AuthenticationError | coredis.exceptions.AuthorizationError
    ):
        return False
    if isinstance(exc, coredis.exceptions.ResponseError):
        return str(exc).startswith(_TRANSIENT)
    return True  # lost connections, timeouts, closed or broken streams, OS errors


def _refused(exc: Exception) -> bool:
    """Whether ``exc`` is a script's own refusal of its arguments (``cancelkit: ...``)."""
    return isinstance(exc, coredis.exceptions.ResponseError) and str(exc).startswith("cancelkit: ")


#: What a Redis call raises when the server cannot be reached (or, on a cluster, while a slot
#: moves or its shard fails over).
REDIS_ERRORS = (coredis.exceptions.ConnectionError, TimeoutError, OSError, *CLUSTER_ERRORS)


class Down(Exception):
    """Internal: a Redis call failed within its time bound (already logged and counted).

    Whether the call took effect on the server is unknown.
    """


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


async def close_quietly(stack: AsyncExitStack, what: str) -> None:
    """Close ``stack``; a connection's error as it closes is logged, never raised."""
    try:
        await stack.aclose()
    except Exception as exc:  # nothing to do about it: the connection is gone either way
        logger.debug("%s stopped: %s", what, leaf(exc))
    except BaseExceptionGroup as group:  # a cancellation, with what the closing raised
        cancelled, rest = group.split(anyio.get_cancelled_exc_class())
        if rest is not None:
            logger.debug("%s stopped: %s", what, leaf(rest))
        if cancelled is None:
            raise
        raise cancelled from None


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


_made: ContextVar[list[coredis.BaseConnection] | None] = ContextVar("_made", default=None)


@contextmanager
def _collect_made() -> Iterator[list[coredis.BaseConnection]]:
    made: list[coredis.BaseConnection] = []
    token = _made.set(made)
    try:
        yield made
    finally:
        _made.reset(token)


class _Pool(coredis.ConnectionPool[coredis.BaseConnection]):
    """coredis's pool, made robust against the connection losses this backend lives with.

    coredis 6.9 loses a pool slot when a leased connection dies (a killed pub/sub connection,
    a restarted server) or when the caller is cancelled while a connection is being made;
    after ``max_connections`` such events every command waits forever. Here a dead connection
    gives its slot back, and making a connection is shielded (it is bounded by the connect
    timeout instead). coredis also leaves the buffers of a connection that failed to connect
    open; they are closed here, for the connection *this* caller made only (the connections
    other callers are still making, or using, are never touched).
    """

    async def _construct_connection(self) -> coredis.BaseConnection:
        connection = await super()._construct_connection()
        made = _made.get()
        if made is not None:
            made.append(connection)
        return connection

    async def get_connection(self, **kwargs: Any) -> coredis.BaseConnection:
        with anyio.CancelScope(shield=True), _collect_made() as made:
            try:
                connection = await super().get_connection(**kwargs)
            except BaseException:
                for failed in made:
                    if not failed.usable:
                        _close_buffers(failed)
                raise
        return connection

    def release(self, connection: coredis.BaseConnection) -> None:
        super().release(connection)
        available = self._available_connections
        if not connection.usable and connection not in available and not available.full():
            available.append_nowait(None)


@final
class Connection:
    """The client and the scripts; tracks whether Redis is up and retries lost cleanups.

    The error model: every failure of a call (an error reply such as BUSY, READONLY, OOM or
    NOSCRIPT, a lost or closed connection, a timeout) is retried every 10 ms while it can
    succeed, within ``timeout`` for the whole call (while Redis is marked down: one attempt,
    also bounded by ``timeout``). A call that still fails marks Redis down (logged once;
    on that change only, ``on_down``: the listener resubscribes) and raises :exc:`Down`,
    which the callers turn into :exc:`RedisUnavailable` or their fail-open path; the
    listener marks Redis up again once it has resubscribed and resynced. Every script is
    idempotent, so a retry of a call that did take effect changes nothing.

    Cleanups (releasing a holder) that cannot run now are queued and retried in the
    background, oldest first, until they succeed.
    """

    __slots__ = (
        "_cleanup",
        "_client",
        "_fail_open",
        "_scripts",
        "_timeout",
        "_url",
        "_wake",
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
        self._wake: anyio.Event | None = None  # made in open(): it needs the event loop
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
            retry_policy=NoRetryPolicy(),  # run() retries, within the call's time bound
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
        self._wake = anyio.Event()

    async def start(
        self, attempt: Callable[[], Awaitable[None]], *, pause: float = _RETRY_PAUSE
    ) -> None:
        """Run ``attempt`` (one try at a start: :meth:`open` and more) until it succeeds.

        Like any call: a :exc:`RedisUnavailable` is tried again every ``pause`` seconds
        within ``timeout``, so a connection killed during the first ping or subscribe does not
        fail a start while the server is up. Anything else (a configuration error) is raised
        at once, as itself.
        """
        give_up = anyio.current_time() + self._timeout
        while True:
            try:
                await attempt()
            except RedisUnavailable:
                if anyio.current_time() >= give_up:
                    raise
            else:
                return
            await anyio.sleep(pause)

    async def abandon(self, stack: AsyncExitStack, exc: BaseException) -> NoReturn:
        """After a failed start: close what it made, raise ``exc`` as a documented outcome.

        A configuration error (``ValueError``) and a cancellation stay themselves; any other
        failure is :exc:`RedisUnavailable`.
        """
        self.close()
        await close_quietly(stack, "a failed start")
        await anyio.lowlevel.checkpoint_if_cancelled()  # an outer cancellation wins
        if isinstance(exc, Exception) and not isinstance(exc, RedisUnavailable | ValueError):
            message = f"cannot reach Redis at {redact(self._url)}: {leaf(exc)}"
            raise RedisUnavailable(message) from exc
        raise exc

    def close(self) -> None:
        """Forget the client (its context was closed by the stack)."""
        self._client = None
        self._scripts = {}
        self.up = False

    async def run(
        self, script: str, keys: Sequence[str], args: Sequence[str], *, force: bool = False
    ) -> Any:
        """Run a script; :exc:`Down` if the call fails (see the class docs)."""
        self.client  # noqa: B018 - raises if not running
        return await self._call(
            lambda: self._scripts[script](keys=keys, args=args), retry=self.up or force
        )

    async def get(self, key: str) -> str | None:
        """GET a key; :exc:`Down` if the call fails."""
        client = self.client
        value: str | None = await self._call(lambda: client.get(key), retry=self.up)
        return value

    async def command(
        self,
        call: Callable[[coredis.Redis[str] | coredis.RedisCluster[str]], Any],
        *,
        force: bool = False,
    ) -> Any:
        """Run ``call(client)`` with the error model of :meth:`run`."""
        client = self.client
        return await self._call(lambda: call(client), retry=self.up or force)

    async def _call(self, attempt: Callable[[], Any], *, retry: bool) -> Any:
        # While Redis is marked down, one attempt only: an outage costs callers no more than
        # a refused connection, and a server that is back (or a connection kill that cost
        # the reader its subscription) is used at once.
        deadline = anyio.current_time() + self._timeout
        while True:
            try:
                with anyio.fail_after(max(deadline - anyio.current_time(), 0)):
                    return await attempt()
            except Exception as exc:  # every failure of a call is "Redis unavailable"
                if _refused(exc):  # but a script that refused its arguments is the caller's
                    raise ValueError(str(exc)) from None
                error = exc
                report_error(self.client, exc)  # a cluster reloads its layout after a few
            if (
                not retry
                or not _transient(error)
                or anyio.current_time() + _RETRY_PAUSE >= deadline
            ):
                break
            await anyio.sleep(_RETRY_PAUSE)
        self.mark_down(error)
        raise Down from error

    async def run_or_defer(self, script: str, keys: list[str], args: list[str]) -> Any:
        """Run an idempotent cleanup script now, or in the background if that fails.

        Returns the script's reply, or ``None`` when it failed (:exc:`Down`). A cancellation
        (a native ``Task.cancel()`` gets through a shield) queues it too, and propagates.
        """
        try:
            return await self.run(script, keys, args)
        except Down:
            self.defer(script, keys, args)
            return None
        except BaseException:
            self.defer(script, keys, args)
            raise

    def defer(self, script: str, keys: list[str], args: list[str]) -> None:
        """Queue an idempotent cleanup script, or an inbox write, for the background.

        Never blocks. A queued call that fails is retried until it succeeds; an inbox line
        that never arrives is found by its worker's resync, which re-reads the state.
        """
        self._cleanup.append((script, keys, args))
        if self._wake is not None:
            self._wake.set()

    async def drain(self, *, force: bool = False) -> None:
        """Run the queued cleanups, oldest first (:exc:`Down` at the first failure)."""
        while self._cleanup:
            call = self._cleanup.popleft()  # taken: the heartbeat and the cleaner may both drain
            try:
                await self.run(*call, force=force)
            except BaseException:
                self._cleanup.appendleft(call)
                raise

    async def clean(self, retry_delay: float) -> None:
        """Background task: drain the queued cleanups as soon as they are queued."""
        while True:
            self._wake = anyio.Event()
            if not self._cleanup:
                await self._wake.wait()
            if self._cleanup:
                try:
                    await self.drain()
                except Down:
                    pass  # the resync after the reconnect drains the rest
                except Exception:  # a bug: keep the task (and the application) alive
                    logger.exception("cleanup failed; retrying at the next heartbeat")
            await anyio.sleep(retry_delay)

    def mark_down(self, exc: BaseException) -> None:
        """Record that Redis did not answer (logged once per outage).

        ``on_down`` (the listener resubscribes) is called when Redis *becomes* unreachable,
        not at every failure while it is: the listener is then already recovering, and
        cancelling its recovery at every failed call (the cleaner retries every
        ``retry_delay``) would keep it from ever completing while connections churn.
        """
        if not self.up:
            return
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
