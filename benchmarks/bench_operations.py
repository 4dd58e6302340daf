"""Background operations: latency of start and cancel, and the memory of a retained status.

Side by side in one run, as ratios:

- in-process: ``await operations.start(f)`` → ``f`` running, against a bare
  ``task_group.start_soon(f)``; ``await operations.cancel(id)`` → the operation's ``finally``
  ran, against ``cancel_scope.cancel()`` of a bare task;
- across workers (Redis): two BackgroundOperations with their own RedisBackend and
  RedisStatusStore stand in for two workers; start on A → running; cancel on B → stopped on A;
  status of A's operation read on B; all against the Redis round-trip floor (a ``PING`` on a
  client of its own) measured in the same run;
- memory per retained (ended) status: in a MemoryStatusStore (tracemalloc), and per key in
  Redis (``MEMORY USAGE``), beside the size of the status's JSON.

Uses ``$CANCELKIT_REDIS_URL`` if set, else starts a throw-away redis-server on a free port.
Run: ``python -m benchmarks.bench_operations`` (or ``python -m benchmarks operations``).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import time
import tracemalloc
from collections.abc import Awaitable, Callable

import anyio
import coredis

from benchmarks._util import percentile
from benchmarks.bench_redis import redis_url
from cancelkit import BackgroundOperations, MemoryStatusStore, OperationStatus, TokenRegistry
from cancelkit.redis import RedisBackend, RedisStatusStore

TRIALS = 300
RETAINED = 20_000


class Stamp:
    """The moment something happened in another task, and an event to wait for it."""

    def __init__(self) -> None:
        self.at = 0.0
        self.event = anyio.Event()

    def hit(self) -> None:
        self.at = time.perf_counter()
        self.event.set()

    async def since(self, start: float) -> float:
        await self.event.wait()
        return self.at - start


async def interleaved(
    trials: dict[str, Callable[[], Awaitable[float]]], count: int
) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {name: [] for name in trials}
    for trial in trials.values():  # warm up
        for _ in range(max(1, count // 10)):
            await trial()
    for _ in range(count):
        for name, trial in trials.items():
            results[name].append(await trial())
    return results


async def in_process() -> dict[str, list[float]]:
    async with anyio.create_task_group() as tg, BackgroundOperations(grace=0) as ops:

        async def op_started() -> float:
            stamp = Stamp()

            async def work() -> None:
                stamp.hit()

            start = time.perf_counter()
            await ops.start(work)
            return await stamp.since(start)

        async def bare_started() -> float:
            stamp = Stamp()

            async def work() -> None:
                stamp.hit()

            start = time.perf_counter()
            tg.start_soon(work)
            return await stamp.since(start)

        async def op_cancelled() -> float:
            stamp, running = Stamp(), anyio.Event()

            async def work() -> None:
                try:
                    running.set()
                    await anyio.sleep_forever()
                finally:
                    stamp.hit()

            id = await ops.start(work)
            await running.wait()
            start = time.perf_counter()
            await ops.cancel(id)
            return await stamp.since(start)

        async def bare_cancelled() -> float:
            stamp, running = Stamp(), anyio.Event()
            scope = anyio.CancelScope()

            async def work() -> None:
                with scope:
                    try:
                        running.set()
                        await anyio.sleep_forever()
                    finally:
                        stamp.hit()

            tg.start_soon(work)
            await running.wait()
            start = time.perf_counter()
            scope.cancel()
            return await stamp.since(start)

        results = await interleaved(
            {
                "start": op_started,
                "start_soon": bare_started,
                "cancel": op_cancelled,
                "scope.cancel": bare_cancelled,
            },
            TRIALS,
        )
    return results


async def across_workers(url: str) -> dict[str, list[float]]:
    prefix = f"benchops{os.getpid()}"

    def worker() -> tuple[RedisBackend, BackgroundOperations]:
        backend = RedisBackend(url, prefix=prefix)
        store = RedisStatusStore(url, prefix=prefix)
        return backend, BackgroundOperations(
            registry=TokenRegistry(backend=backend), store=store, grace=0
        )

    backend_a, a = worker()
    backend_b, b = worker()
    async with (
        backend_a,
        backend_b,
        a,
        b,
        coredis.Redis.from_url(url, decode_responses=True) as client,
    ):

        async def floor() -> float:
            start = time.perf_counter()
            await client.ping()
            return time.perf_counter() - start

        async def started() -> float:
            stamp = Stamp()

            async def work() -> None:
                stamp.hit()

            start = time.perf_counter()
            await a.start(work)
            return await stamp.since(start)

        running_id: list[str] = []

        async def cancelled() -> float:
            stamp, running = Stamp(), anyio.Event()

            async def work() -> None:
                try:
                    running.set()
                    await anyio.sleep_forever()
                finally:
                    stamp.hit()

            id = await a.start(work)
            await running.wait()
            start = time.perf_counter()
            await b.cancel(id)
            return await stamp.since(start)

        async def status_read() -> float:
            if not running_id:
                running_id.append(await a.start(anyio.sleep_forever))
            start = time.perf_counter()
            await b.status(running_id[0])
            return time.perf_counter() - start

        return await interleaved(
            {
                "floor": floor,
                "start": started,
                "cancel": cancelled,
                "status": status_read,
            },
            TRIALS // 2,
        )


def status(i: int) -> OperationStatus:
    from cancelkit import OperationState

    return OperationStatus(
        f"op-{i:08d}-xxxxxxxxxxxxxx",
        "user-123",
        OperationState.COMPLETED,
        time.time(),
        time.time(),
        result={"rows": i, "url": f"/downloads/{i}.csv"},
    )


async def memory_in_process() -> tuple[float, float]:
    """Bytes the store holds per ended status: the status object, its result, the entry."""
    store = MemoryStatusStore(max_retained=RETAINED)
    json_size = statistics.mean(len(json.dumps(status(i).to_json())) for i in range(100))
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(RETAINED):
        await store.put(status(i))
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / RETAINED, json_size


async def memory_in_redis(url: str) -> float:
    prefix = f"benchmem{os.getpid()}"
    async with (
        RedisStatusStore(url, prefix=prefix, max_retained=RETAINED) as store,
        coredis.Redis.from_url(url, decode_responses=True) as client,
    ):
        for i in range(1000):
            await store.put(status(i))
        sizes = [
            await client.memory_usage(f"{prefix}:o:s:8:user-123:{status(i).id}") or 0
            for i in range(0, 1000, 10)
        ]
        zset = await client.memory_usage(f"{prefix}:o:z") or 0
        return statistics.mean(sizes) + zset / 1000


def line(label: str, values: list[float], base: list[float], base_label: str) -> None:
    median, p99 = statistics.median(values), percentile(values, 99)
    ratio = median / statistics.median(base)
    print(
        f"    {label:<40} median {median * 1e6:8.1f} µs  p99 {p99 * 1e6:8.1f} µs  "
        f"{ratio:6.2f}x {base_label}"
    )


def main() -> None:
    for backend in ("asyncio", "trio"):
        r = anyio.run(in_process, backend=backend)
        print(f"  [{backend}] in-process, {TRIALS} trials each")
        line("start() -> running", r["start"], r["start_soon"], "start_soon")
        line("bare task_group.start_soon -> running", r["start_soon"], r["start_soon"], "")
        line("cancel(id) -> finally ran", r["cancel"], r["scope.cancel"], "scope.cancel")
        line("bare cancel_scope.cancel -> finally ran", r["scope.cancel"], r["scope.cancel"], "")
    with redis_url() as url:
        for backend in ("asyncio", "trio"):
            r = anyio.run(across_workers, url, backend=backend)
            print(f"  [{backend}] across workers (Redis), {TRIALS // 2} trials each")
            line("Redis round trip (PING, the floor)", r["floor"], r["floor"], "floor")
            line("start() on A -> running on A", r["start"], r["floor"], "floor")
            line("cancel(id) on B -> stopped on A", r["cancel"], r["floor"], "floor")
            line("status() on B of an op on A", r["status"], r["floor"], "floor")
        per_status, json_size = anyio.run(memory_in_process)
        print(f"  memory per retained status ({RETAINED:,} ended statuses, small result):")
        print(
            f"    MemoryStatusStore  {per_status:7.0f} B  "
            f"({per_status / json_size:4.2f}x its JSON, {json_size:.0f} B)"
        )
        redis_bytes = anyio.run(memory_in_redis, url)
        print(
            f"    RedisStatusStore   {redis_bytes:7.0f} B in Redis  "
            f"({redis_bytes / json_size:4.2f}x its JSON)"
        )


if __name__ == "__main__":
    main()
