"""The background side of the Redis backend: the pub/sub reader, the resync, the heartbeat."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import final

import anyio
from anyio.abc import TaskStatus

from .._exceptions import RedisUnavailable
from ._cluster import channel_groups, lost_subscription, report_error, subscription
from ._config import Keys, Settings
from ._connection import Connection, Down, leaf, redact
from ._registrations import Registrations
from ._slots import Slots
from ._slots import resync as resync_claims

__all__ = ["Listener"]

logger = logging.getLogger("cancelkit.redis")


@contextmanager
def _survive(loop: str) -> Iterator[None]:
    """Log an unexpected error of a background loop instead of ending the task group."""
    try:
        yield
    except Exception:
        logger.exception("unexpected error in the %s; it carries on", loop)


@final
class Listener:
    """Reads this worker's channel and inbox, and keeps the local entries in step with Redis.

    Pub/sub is only the fast path: it drops messages while a subscriber reconnects. Every
    message is also pushed to the worker's inbox (a list), which the worker reads after every
    (re)subscribe and every ``poll_interval`` seconds: a message reaches the worker within
    ``poll_interval`` plus one round trip while Redis answers, whether or not pub/sub
    survives. After every (re)subscribe, and on every heartbeat, :meth:`resync` re-reads the
    keys of the local entries, refreshes their leases and delivers anything still missed.

    Every loop here survives every failure (logged) and recovers by itself: none can end the
    backend's task group.
    """

    __slots__ = (
        "_conn",
        "_keys",
        "_registrations",
        "_scopes",
        "_settings",
        "_slots",
        "inbox_lines",
        "messages",
        "reconnects",
        "resyncs",
    )

    def __init__(
        self,
        conn: Connection,
        keys: Keys,
        settings: Settings,
        registrations: Registrations,
        slots: Slots,
    ) -> None:
        self._conn = conn
        self._keys = keys
        self._settings = settings
        self._registrations = registrations
        self._slots = slots
        self._scopes: set[anyio.CancelScope] = set()
        self.messages = self.resyncs = self.reconnects = self.inbox_lines = 0
        conn.on_down = self.resubscribe

    def resubscribe(self) -> None:
        """Drop the subscriptions; each reader subscribes (and resyncs) from scratch."""
        for scope in self._scopes:
            scope.cancel()

    async def read(self, *, task_status: TaskStatus[None]) -> None:
        """Read this worker's channels: one subscription per shard, each on its own.

        On a single server one subscription. On a cluster the channels are grouped by the
        shard that serves them, and each group subscribes, reads and resubscribes by itself:
        a shard that fails over (its pub/sub connection lost, its slots moving) leaves the
        subscriptions to the other shards, and the cancels they carry, untouched. A failed
        command does not tear them down either (it says nothing about their connections):
        the heartbeat's resync marks Redis up again.

        Reports started once every group has subscribed (a new worker holds nothing yet:
        its first resync follows, and a lost connection then costs a resubscribe, not the
        start); raises :exc:`RedisUnavailable` if no first subscribe succeeds in ``timeout``.
        """
        groups = channel_groups(self._conn.client, self._keys.channels())
        if len(groups) == 1:
            await self._read(groups[0], task_status=task_status)
            return
        self._conn.on_down = None
        try:
            async with anyio.create_task_group() as tg:
                for channels in groups:
                    await tg.start(self._read, channels)
                task_status.started()
        except BaseExceptionGroup as group:
            unavailable, rest = group.split(RedisUnavailable)
            if unavailable is None or rest is not None:
                raise
            first: BaseException = unavailable
            while isinstance(first, BaseExceptionGroup):  # one subscribe's, unwrapped
                first = first.exceptions[0]
            raise first from None

    async def _read(self, channels: list[str], *, task_status: TaskStatus[None]) -> None:
        """Subscribe to ``channels``, resync, read messages; resubscribe whenever lost."""
        client = self._conn.client
        settings = self._settings
        started = False
        give_up = anyio.current_time() + settings.timeout  # the first subscribe, as any call
        while True:
            scope = anyio.CancelScope()
            try:
                async with subscription(
                    client, channels, timeout=settings.timeout, heartbeat=settings.heartbeat
                ) as pubsub:
                    with scope:
                        self._scopes.add(scope)
                        if not started:  # subscribed: the worker can start (it holds nothing
                            started = True  # yet, so its first resync has nothing to deliver)
                            self._mark_up(announce=False)
                            task_status.started()
                        await self.resync(force=True)  # after subscribing: nothing is missed
                        await self.read_inbox(force=True)
                        self._mark_up(announce=True)
                        while True:
                            message = await pubsub.get_message()
                            if message is None:
                                continue
                            if message["type"] == "message":
                                self.messages += 1
                                self.on_line(str(message["data"]))
                            elif lost_subscription(message["type"]):
                                # the server ended it (on a cluster: the slot moved, or its
                                # shard failed over); coredis does not subscribe again
                                break
            except Exception as exc:
                report_error(client, exc)
                if not started and anyio.current_time() >= give_up:
                    raise RedisUnavailable(
                        f"cannot subscribe at {redact(settings.url)}: {leaf(exc)}"
                    ) from exc
                # A lost subscription alone is not an outage: commands may still work. The
                # inbox and the resync after the next subscribe deliver what was missed.
                logger.debug("pub/sub connection lost (%s); resubscribing", leaf(exc))
            finally:
                self._scopes.discard(scope)
            self.reconnects += 1
            await anyio.sleep(settings.retry_delay)

    def _mark_up(self, *, announce: bool) -> None:
        if not self._conn.up:
            if announce:
                logger.warning("Redis at %s is reachable again", redact(self._settings.url))
            self._conn.up = True

    async def beat(self) -> None:
        """Every heartbeat: poke handover waits, and resync while Redis is up."""
        while True:
            await anyio.sleep(self._settings.heartbeat)
            self._slots.poke_turns()  # messages can be lost
            with _survive("heartbeat"), suppress(Down):
                await self.resync()  # also while marked down: leases must not lapse
                if self._conn.on_down is None:  # a cluster: the readers never dropped
                    self._mark_up(announce=True)

    async def poll(self) -> None:
        """Every ``poll_interval``: read the inbox while Redis is up."""
        while True:
            await anyio.sleep(self._settings.poll_interval)
            with _survive("inbox poll"), suppress(Down):
                await self.read_inbox()

    async def read_inbox(self, *, force: bool = False) -> None:
        """Deliver the lines in this worker's inbox, then drop exactly those (at least once)."""
        inbox = self._keys.inbox()
        lines: list[str] = await self._conn.command(
            lambda client: client.lrange(inbox, 0, -1), force=force
        )
        if lines:
            for line in lines:
                self.inbox_lines += 1
                self.on_line(str(line))
            count = len(lines)
            await self._conn.command(lambda client: client.ltrim(inbox, count, -1), force=force)

    async def resync(self, *, force: bool = False) -> None:
        """Refresh liveness and TTLs, deliver lost cancellations, then retry lost cleanups.

        Deliveries first: a queue of cleanups that fail one by one (connections churning)
        must not hold back the cancellations of running work.
        """
        self.resyncs += 1
        for line in await self._registrations.resync(force=force):
            self.on_line(line)
        for line in await resync_claims(self._slots, force=force):
            self.on_line(line)
        await self._conn.drain(force=force)

    def on_line(self, line: str) -> None:
        """Dispatch a message line (see :mod:`cancelkit.redis._scripts`)."""
        kind, _, rest = line.partition(" ")
        holder, _, tail = rest.partition(" ")
        if kind == "c":
            self._registrations.on_cancel(holder, tail)
        elif kind == "s":
            self._slots.on_superseded(holder, tail)
        elif kind == "t":
            self._slots.on_turn(holder)
        elif kind == "l":
            self._registrations.on_lost(holder, tail)
