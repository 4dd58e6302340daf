"""Starting and stopping one worker of the Redis backend: its id, its connection, its tasks."""

from __future__ import annotations

import logging
import secrets
from contextlib import AsyncExitStack
from typing import Any, final

import anyio
from anyio.abc import TaskGroup

from ._config import Keys, Settings
from ._connection import Connection, close_quietly
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
        await self._conn.start(self._start_once, pause=self._settings.retry_delay)

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
            self._task_group = None
            self._keys.worker = ""
            await self._conn.abandon(stack, exc)
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
            await close_quietly(stack, f"RedisBackend worker {self._keys.worker}")
        finally:
            self._conn.close()
            self._task_group = None
            self._keys.worker = ""
