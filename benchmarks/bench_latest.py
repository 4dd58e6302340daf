"""LatestOnly benchmarks: claim cost vs anyio.Lock/Semaphore, and supersede latency.

Side by side in one run, on asyncio and trio:

- claim+release with ``max_concurrency`` 1 and 8 (N tasks on one key) as ratios to
  ``anyio.Lock`` and ``anyio.Semaphore(8)`` doing the same, with and without sequence numbers;
- supersede -> the old body's ``OperationCancelled``, in one process, without and with ``seq``
  (target: median <= 100 us);
- the same across two workers on Redis (target: median <= 1 ms, p99 <= 3 ms), without and
  with ``seq``. Uses ``$CANCELKIT_REDIS_URL`` if set, else a throw-away redis-server; skipped
  (with a line saying so) when neither exists.

Run: ``python -m benchmarks.bench_latest [--quick] [asyncio|trio ...]``
"""

from __future__ import annotations

import itertools
import os
import shutil
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import anyio
import coredis

from cancelkit import LatestOnly, OperationCancelled
from cancelkit.redis import RedisBackend

QUICK = "--quick" in sys.argv
N = 2_000 if QUICK else 16_000
SUPERSEDES = 200 if QUICK else 2_000
ACROSS = 50 if QUICK else 300
ROUNDS = 3 if QUICK else 7


async def per_op(fn: Callable[[int], Awaitable[None]], n: int) -> float:
    """Return seconds per operation for one round of ``fn(n)``."""
    start = time.perf_counter()
    await fn(n)
    return (time.perf_counter() - start) / n


async def compare(
    subject: Callable[[int], Awaitable[None]],
    baseline: Callable[[int], Awaitable[None]],
    n: int,
) -> tuple[float, float]:
    """Time subject and baseline in alternating rounds; return their median per-op seconds."""
    await subject(n // 10)  # warm up
    await baseline(n // 10)
    subject_times, baseline_times = [], []
    for _ in range(ROUNDS):
        subject_times.append(await per_op(subject, n))
        baseline_times.append(await per_op(baseline, n))
    return statistics.median(subject_times), statistics.median(baseline_times)


def line(label: str, subject: float, baseline: float) -> None:
    """Print one ratio line (absolute times only as context)."""
    print(
        f"  {label:<54} ratio {subject / baseline:5.2f}x  "
        f"({subject * 1e6:6.2f} us vs {baseline * 1e6:6.2f} us)"
    )


def in_tasks(tasks: int, one: Callable[[int], Awaitable[None]]) -> Callable[[int], Awaitable[None]]:
    """Run ``one(n // tasks)`` in ``tasks`` concurrent tasks."""

    async def run(n: int) -> None:
        async def part() -> None:
            await one(n // tasks)

        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(part)

    return run


def claims_of(slot: LatestOnly, with_seq: bool) -> Callable[[int], Awaitable[None]]:
    """A loop of claim+release on one key (each holds the key across one checkpoint)."""
    numbers = itertools.count()

    async def claims(n: int) -> None:
        for _ in range(n):
            async with slot.claim("k", seq=next(numbers) if with_seq else None):
                await anyio.lowlevel.checkpoint()

    return claims


def locks_of(lock: anyio.Lock | anyio.Semaphore) -> Callable[[int], Awaitable[None]]:
    """The same loop around an anyio lock or semaphore."""

    async def locks(n: int) -> None:
        for _ in range(n):
            async with lock:
                await anyio.lowlevel.checkpoint()

    return locks


async def claim_cost() -> None:
    for limit in (1, 8):
        lock = anyio.Lock() if limit == 1 else anyio.Semaphore(limit)
        name = "anyio.Lock" if limit == 1 else f"anyio.Semaphore({limit})"
        for with_seq in (False, True):
            slot = LatestOnly(max_concurrency=limit)
            mine, base = await compare(
                in_tasks(limit, claims_of(slot, with_seq)), in_tasks(limit, locks_of(lock)), N
            )
            seq = "seq on " if with_seq else "seq off"
            line(f"claim+release N={limit} ({limit} task(s)), {seq} vs {name}", mine, base)


def summary(label: str, samples: list[float], target: str) -> None:
    samples = sorted(samples)
    median = statistics.median(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    print(
        f"  {label:<44} median {median * 1e6:7.1f} us, p99 {p99 * 1e6:7.1f} us  "
        f"(target {target}; n={len(samples)})"
    )


async def supersede_once(old: LatestOnly, new: LatestOnly, seq: int | None) -> float:
    """Claim on ``old``, then supersede from ``new``; seconds until the old body was interrupted
    (its await cancelled; the release that follows is not counted)."""
    observed, ready = anyio.Event(), anyio.Event()
    seen = [0.0]

    async def holder() -> None:
        try:
            async with old.claim("k", seq=seq):
                ready.set()
                try:
                    await anyio.sleep_forever()
                finally:
                    seen[0] = time.perf_counter()
                    observed.set()
        except OperationCancelled:
            pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await ready.wait()
        await anyio.wait_all_tasks_blocked()
        started = time.perf_counter()
        async with new.claim("k", seq=None if seq is None else seq + 1):
            await observed.wait()
    return seen[0] - started


async def supersede_latency(
    old: LatestOnly,
    new: LatestOnly,
    trials: int,
    where: str,
    floor: Callable[[], Awaitable[float]] | None = None,
) -> None:
    plain: list[float] = []
    ordered: list[float] = []
    floors: list[float] = []
    for i in range(trials):  # interleaved, so that all see the same noise
        plain.append(await supersede_once(old, new, None))
        ordered.append(await supersede_once(old, new, 2 * i + 10**9))
        if floor is not None:
            floors.append(await floor())
    target = "median <= 100 us" if where == "same process" else "median <= 1 ms, p99 <= 3 ms"
    if floors:
        summary("raw PUBLISH -> receive (the floor)", floors, "-")
    summary(f"supersede, {where}, seq off", plain, target)
    summary(f"supersede, {where}, seq on", ordered, target)
    if floors:
        base = statistics.median(floors)
        print(
            f"  medians / floor: seq off {statistics.median(plain) / base:4.2f}x, "
            f"seq on {statistics.median(ordered) / base:4.2f}x"
        )


async def run(url: str | None) -> None:
    await claim_cost()
    slot = LatestOnly()
    await supersede_latency(slot, slot, SUPERSEDES, "same process")
    if url is None:
        print("  supersede across workers: skipped (no redis-server, no CANCELKIT_REDIS_URL)")
        return
    prefix = f"bench{time.monotonic_ns()}"
    # A generous timeout: on a loaded box a call past the default 1 s would make the backend
    # fall back to local state, which is not what is measured here.
    a, b = (RedisBackend(url, prefix=prefix, timeout=10.0) for _ in range(2))
    async with (
        a,
        b,
        coredis.Redis.from_url(url, decode_responses=True) as publisher,
        coredis.Redis.from_url(url, decode_responses=True) as subscriber,
        subscriber.pubsub(channels=[f"{prefix}:raw"], ignore_subscribe_messages=True) as pubsub,
    ):

        async def floor() -> float:
            start = time.perf_counter()
            await publisher.publish(f"{prefix}:raw", "x")
            while await pubsub.get_message() is None:
                pass
            return time.perf_counter() - start

        await supersede_latency(
            LatestOnly(backend=a), LatestOnly(backend=b), ACROSS, "across workers (Redis)", floor
        )


def main() -> None:
    from benchmarks.bench_redis import redis_url

    backends = [arg for arg in sys.argv[1:] if not arg.startswith("-")] or ["asyncio", "trio"]
    if shutil.which("redis-server") is None and "CANCELKIT_REDIS_URL" not in os.environ:
        for backend in backends:
            print(f"LatestOnly on {backend}:")
            anyio.run(run, None, backend=backend)
        return
    with redis_url() as url:
        for backend in backends:
            print(f"LatestOnly on {backend}:")
            anyio.run(run, url, backend=backend)


if __name__ == "__main__":
    main()
