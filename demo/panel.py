"""The demo's live panel: what cancelkit stopped today, how fast, and the work it saved.

Fed by cancelkit's event seam (:func:`cancelkit.add_listener`): one report per stopped search
or export, with its reason's kind, the time from the cancel to the body's exit, and how long
the body had run. The work saved is estimated honestly because the demo's work is fixed: a
search takes ``work_seconds`` and an export ``EXPORT_LENGTH * work_seconds`` unless stopped,
so a body stopped after ``ran_for`` seconds saved the rest. In Redis mode the numbers are the
fleet's: every worker adds to one Redis hash and list per day.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from pydantic import BaseModel

from cancelkit import CancelEvent, add_listener

__all__ = ["MemoryTally", "PanelStats", "RedisTally", "Stopped", "feed"]

logger = logging.getLogger("demo")

#: The kinds the panel names; anything else counts as "other".
KINDS = ("superseded", "requested", "client_disconnected")


class PanelStats(BaseModel):
    """What ``GET /stats`` answers: today's numbers.

    Attributes:
        day: the server's date, ``YYYY-MM-DD``.
        stopped: stopped searches and exports by reason: ``superseded`` (a newer keystroke),
            ``requested`` (Stop), ``client_disconnected`` (the tab closed), ``other``.
        total: all of them.
        median_cancel_to_exit_ms: the median time from the cancel to the body's exit (of the
            last 1,000), or ``None`` before the first.
        saved_seconds: the work the stopped bodies did not do (see the module docs).
    """

    day: str
    stopped: dict[str, int]
    total: int
    median_cancel_to_exit_ms: float | None
    saved_seconds: float


class Stopped(BaseModel):
    """One stopped unit of work, as the tally gets it."""

    kind: str
    cancel_to_exit_ms: float | None
    saved_seconds: float


def _today() -> str:
    return time.strftime("%Y-%m-%d")


def _stats(day: str, counts: dict[str, int], latencies: list[float], saved: float) -> PanelStats:
    stopped = {kind: counts.get(kind, 0) for kind in (*KINDS, "other")}
    return PanelStats(
        day=day,
        stopped=stopped,
        total=sum(stopped.values()),
        median_cancel_to_exit_ms=round(statistics.median(latencies), 2) if latencies else None,
        saved_seconds=round(saved, 2),
    )


class MemoryTally:
    """Today's numbers in this process."""

    def __init__(self) -> None:
        """Start empty."""
        self._day = ""
        self._counts: Counter[str] = Counter()
        self._latencies: deque[float] = deque(maxlen=1000)
        self._saved = 0.0
        self._roll()

    def _roll(self) -> None:
        if (day := _today()) != self._day:  # a new day: start again
            self._day = day
            self._counts.clear()
            self._latencies.clear()
            self._saved = 0.0

    async def add(self, stopped: Stopped) -> None:
        """Count one stopped unit of work."""
        self._roll()
        self._counts[stopped.kind] += 1
        if stopped.cancel_to_exit_ms is not None:
            self._latencies.append(stopped.cancel_to_exit_ms)
        self._saved += stopped.saved_seconds

    async def read(self) -> PanelStats:
        """Today's numbers."""
        self._roll()
        return _stats(self._day, dict(self._counts), list(self._latencies), self._saved)


class RedisTally:
    """Today's numbers of the fleet: a Redis hash and a capped list per day (TTL two days).

    Args:
        client: a connected coredis client (decoding responses).
        prefix: the Redis key prefix.
    """

    _ADD = """
        redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
        redis.call('HINCRBYFLOAT', KEYS[1], 'saved', ARGV[2])
        redis.call('EXPIRE', KEYS[1], 172800)
        if ARGV[3] ~= '' then
          redis.call('LPUSH', KEYS[2], ARGV[3])
          redis.call('LTRIM', KEYS[2], 0, 999)
          redis.call('EXPIRE', KEYS[2], 172800)
        end
        return 1
    """

    def __init__(self, client: Any, *, prefix: str = "cancelkit-demo") -> None:
        """Prepare; nothing is sent until the first call."""
        self._client = client
        self._prefix = prefix
        self._add = client.register_script(self._ADD)

    def _keys(self, day: str) -> list[str]:
        return [f"{self._prefix}:stats:{day}", f"{self._prefix}:stats:{day}:lat"]

    async def add(self, stopped: Stopped) -> None:
        """Count one stopped unit of work, for the whole fleet."""
        ms = "" if stopped.cancel_to_exit_ms is None else repr(stopped.cancel_to_exit_ms)
        args = [stopped.kind, repr(stopped.saved_seconds), ms]
        await self._add(keys=self._keys(_today()), args=args)

    async def read(self) -> PanelStats:
        """The fleet's numbers today."""
        day = _today()
        counts_key, latencies_key = self._keys(day)
        fields = await self._client.hgetall(counts_key)
        latencies = [float(ms) for ms in await self._client.lrange(latencies_key, 0, -1)]
        saved = float(fields.pop("saved", 0.0))
        counts = {kind: int(n) for kind, n in fields.items()}
        return _stats(day, counts, latencies, saved)


class Mine:
    """The names (claim keys, operation ids) of this demo's work, and each one's length.

    The seam reports every cancellation of the process; the panel counts this demo's only
    (tests run several demo applications in one process).
    """

    def __init__(self, size: int = 10_000) -> None:
        """Remember at most ``size`` names (the oldest go first)."""
        self._names: OrderedDict[str, float] = OrderedDict()
        self._size = size

    def add(self, name: str, work_seconds: float) -> None:
        """Remember ``name`` as work that takes ``work_seconds`` when nothing stops it."""
        self._names[name] = work_seconds
        self._names.move_to_end(name)
        while len(self._names) > self._size:
            self._names.popitem(last=False)

    def get(self, name: str | None) -> float | None:
        """The length of ``name``'s work, or ``None`` if it is not this demo's."""
        return None if name is None else self._names.get(name)


@asynccontextmanager
async def feed(tally: MemoryTally | RedisTally, mine: Mine) -> AsyncIterator[None]:
    """While in the block, count every stopped unit of this demo's work in ``tally``.

    The listener runs where the work exits and must not block: it hands each report to a
    task of this block, which writes it (to Redis, in Redis mode).
    """
    send: MemoryObjectSendStream[Stopped]
    receive: MemoryObjectReceiveStream[Stopped]
    send, receive = anyio.create_memory_object_stream[Stopped](1000)

    def listen(event: CancelEvent) -> None:
        length = mine.get(event.name)
        stale = event.what == "refused" and event.kind == "stale"
        if not (event.what == "cancelled" or stale) or length is None:
            return
        ran = event.ran_for
        # a stale search (an older keystroke arriving after a newer one) is superseded
        # before it began, as the log says
        kind = "superseded" if stale else event.kind if event.kind in KINDS else "other"
        latency = None if event.cancel_to_exit is None else event.cancel_to_exit * 1000
        saved = 0.0 if ran is None else max(0.0, length - ran)
        stopped = Stopped(kind=kind, cancel_to_exit_ms=latency, saved_seconds=saved)
        with suppress(anyio.WouldBlock):  # a burst beyond 1,000 reports: the panel skips it
            send.send_nowait(stopped)

    async def write() -> None:
        async for stopped in receive:
            try:
                await tally.add(stopped)
            except Exception as exc:  # Redis down: the panel misses one; the app goes on
                logger.warning("the panel missed a stopped search: %s", exc)

    remove: Callable[[], None] = add_listener(listen)
    try:
        async with anyio.create_task_group() as tg, send, receive:
            tg.start_soon(write)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
    finally:
        remove()
