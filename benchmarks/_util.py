"""Shared measuring helpers: interleaved runs, medians and ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable, Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Return the q-th percentile (0..100) of values, nearest-rank."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
    return ordered[index]


def fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:8.2f} µs"


async def compare_async(
    candidate: Callable[[int], Awaitable[None]],
    baseline: Callable[[int], Awaitable[None]],
    *,
    loops: int,
    rounds: int = 15,
) -> tuple[float, float, float]:
    """Time ``candidate(loops)`` and ``baseline(loops)`` alternately; return medians and ratio.

    Returns:
        (candidate seconds per loop, baseline seconds per loop, ratio candidate / baseline),
        each the median over ``rounds`` interleaved rounds.
    """
    cand: list[float] = []
    base: list[float] = []
    await candidate(loops // 10)  # warm up both
    await baseline(loops // 10)
    for _ in range(rounds):
        start = time.perf_counter()
        await candidate(loops)
        cand.append((time.perf_counter() - start) / loops)
        start = time.perf_counter()
        await baseline(loops)
        base.append((time.perf_counter() - start) / loops)
    c, b = statistics.median(cand), statistics.median(base)
    return c, b, c / b


def report_ratio(label: str, candidate: float, baseline: float, target: float) -> None:
    ratio = candidate / baseline
    verdict = "ok" if ratio <= target else "OVER TARGET"
    print(
        f"  {label:<52} {fmt_us(candidate)} vs {fmt_us(baseline)}"
        f"  ratio {ratio:5.2f}x (target <= {target:g}x) {verdict}"
    )
