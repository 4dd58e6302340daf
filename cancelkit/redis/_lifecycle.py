"""Starting and stopping one worker of the Redis backend: its id, its connection, its tasks."""

from __future__ import annotations

import logging
import secrets
from contextlib import AsyncExitStack, suppress
from typing import Any, final

import anyio
from anyio.abc import TaskGroup

from .._exceptions import RedisUnavailable
from ._config import Keys, Settings
from ._connection import Connection, leaf, redact
from ._listener import Listener

__all__ = ["Lifecycle"]

logger = logging.getLogger("cancelkit.redis")


@final
class Lifecycle:
    """One run of a worker: a fresh worker id, the connection, the listener's tasks."""

    __slots__ = ("_conn", "_keys", "_listener", "_scripts", "_settings", "_stack", "_task_group")

    def __init__(
        self,
        conn: Connection,
        keys: Keys,
        settings: Settings,
        listener: Listener,
        scripts: dict[str, Any],
    ) -> None:
        self._conn = conn
        self._keys = keys
        self._settings = settings
        self._listener = listener
        self._scripts = scripts
        self._stack: AsyncExitStack | None = None
        self._task_group: TaskGroup | None = None

    async def start(self) -> None:
        """Connect, subscribe and start the heartbeat (see ``RedisBackend.__aenter__``).

        Like any call, a failing start is tried again (every ``retry_delay``) within
        ``timeout``: a connection killed during the first ping or subscribe does not fail a
        start while the server is up. A configuration error (``ValueError``: a cluster URL
        naming a database other than 0) is raised at once, as itself.
        """
        if self._stack is not None:
            raise RuntimeError("this RedisBackend is already running")
        give_up = anyio.current_time() + self._settings.timeout
        while True:
            try:
                await self._start_once()
            except (RedisUnavailable, ValueError) as exc:
                if isinstance(exc, ValueError) or anyio.current_time() >= give_up:
                    raise
            else:
                return
            await anyio.sleep(self._settings.retry_delay)

    async def _start_once(self) -> None:
        self._keys.worker = secrets.token_urlsafe(9)  # made here, after any fork: one per process
        stack = AsyncExitStack()
        try:
            await self._conn.open(stack, self._scripts)
            if self._conn.cluster:
                self._keys.use_cluster(self._settings.slot_groups)
            self._task_group = await stack.enter_async_context(anyio.create_task_group())
            await self._task_group.start(self._listener.read)
        except BaseException as exc:
            self._conn.close()
            self._task_group = None
            self._keys.worker = ""
            with suppress(Exception):  # what a half-made start leaves is not the caller's
                await stack.aclose()
            if isinstance(exc, (RedisUnavailable, ValueError)):
                raise
            if isinstance(exc, Exception):
                raise RedisUnavailable(
                    f"cannot reach Redis at {redact(self._settings.url)}: {leaf(exc)}"
                ) from exc
            raise
        self._task_group.start_soon(self._listener.beat)
        self._task_group.start_soon(self._listener.poll)
        self._task_group.start_soon(self._conn.clean, self._settings.retry_delay)
        self._stack = stack
        logger.debug("RedisBackend worker %s started", self._keys.worker)

    async def stop(self) -> None:
        """Stop the background tasks and disconnect (entries left in Redis expire)."""
        stack, self._stack = self._stack, None
        if stack is None:
            return
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()
        try:
            await stack.aclose()
        except Exception as exc:  # a connection's error as it closed: nothing to do about it
            logger.debug("RedisBackend worker %s stopped: %s", self._keys.worker, leaf(exc))
        finally:
            self._conn.close()
            self._task_group = None
            self._keys.worker = ""
