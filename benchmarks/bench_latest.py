"""LatestOnly benchmarks: claim cost vs anyio.Lock, and supersede -> cancellation latency.

Run: ``python -m benchmarks.bench_latest``
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import anyio

from cancelkit import LatestOnly, OperationCancelled

N = 20_000
SUPERSEDES = 3_000
ROUNDS = 7


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


def line(label: str, subject: float, baseline: float, target: str = "") -> None:
    """Print one ratio line (absolute times only as context)."""
    target = f"  target {target}" if target else ""
    print(
        f"  {label:<52} ratio {subject / baseline:5.2f}x  "
        f"({subject * 1e6:6.2f} us vs {baseline * 1e6:6.2f} us){target}"
    )


async def claim_cost() -> None:
    slot, lock = LatestOnly(), anyio.Lock()

    async def claims(n: int) -> None:
        for _ in range(n):
            async with slot.claim("k"):
                pass

    async def locks(n: int) -> None:
        for _ in range(n):
            async with lock:
                pass

    mine, base = await compare(claims, locks, N)
    line("uncontended claim+release vs anyio.Lock", mine, base, "<= 3x")


async def supersede_latency() -> None:
    slot = LatestOnly()
    samples: list[float] = []
    observed = anyio.Event()
    started = 0.0

    async def holder() -> None:
        try:
            async with slot.claim("k"):
                await anyio.sleep_forever()
        except OperationCancelled:
            samples.append(time.perf_counter() - started)
            observed.set()

    async with anyio.create_task_group() as tg:
        for _ in range(SUPERSEDES):
            observed = anyio.Event()
            tg.start_soon(holder)
            await anyio.wait_all_tasks_blocked()
            started = time.perf_counter()
            async with slot.claim("k"):
                await observed.wait()
    samples.sort()
    median = statistics.median(samples)
    p99 = samples[int(len(samples) * 0.99)]
    print(
        f"  supersede -> old body's OperationCancelled     median {median * 1e6:6.1f} us, "
        f"p99 {p99 * 1e6:6.1f} us  (target median <= 100 us; n={len(samples)})"
    )


async def main() -> None:
    await claim_cost()
    await supersede_latency()


if __name__ == "__main__":
    for backend in sys.argv[1:] or ["asyncio", "trio"]:
        print(f"LatestOnly on {backend}:")
        anyio.run(main, backend=backend)
