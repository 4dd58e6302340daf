"""Every ratio of issue 12 in one run: ``python -m benchmarks.ratios [--served]``.

Printed side by side, each figure with its one statistic:

- **supersede**: a ``LatestOnly`` newcomer's ``async with slot.claim(key)`` → the superseded
  body's ``except OperationCancelled`` (the newcomer's whole claim entry included), beside
  ``token.cancel()`` → ``except OperationCancelled`` and a bare ``anyio.CancelScope.cancel()``
  → the code after its block. Statistic: the ratio of the medians of 1,500 samples per
  variant, taken in interleaved blocks of 100 (target: supersede ≤ 1.5x bare).
- **claim+release vs anyio.Lock**: one task, one key, a checkpoint inside. Statistic: the
  ratio of the medians of 7 interleaved rounds (target ≤ 3x).
- **memory** beyond a bare ``anyio.CancelScope`` per live operation (20,000 tasks each
  waiting): ``token.scope()`` (target ≤ 400 B) and ``registry.track()`` (target ≤ 700 B).
  ``tracemalloc`` bytes: allocations, not time, so they reproduce exactly.
- **throughput** of a trivial FastAPI route as ratios to the same route without helpers,
  in-process ASGI calls (``bench_throughput --in-process``; the peers fastapi-disconnect and
  aiofence as comparison rows when installed). Statistic: the least CPU time per request over
  9 interleaved rounds, bare / variant. ``--served`` adds the served figures: the server's
  instructions per request, uvicorn under valgrind's callgrind (``bench_throughput
  --instructions``: reproducible to about 0.5 %; about 6 minutes more).

All figures on asyncio and trio except throughput (FastAPI under uvicorn: asyncio).
"""

from __future__ import annotations

import statistics
import sys
import time

import anyio

from benchmarks import bench_registry, bench_throughput
from benchmarks.bench_latest import claims_of, compare, locks_of
from cancelkit import CancellationToken, LatestOnly, OperationCancelled

TRIALS = 1_500


async def _interrupt_once(kind: str, slot: LatestOnly) -> float:
    """Seconds from the cancelling call to the interrupted body's handler."""
    ready, handled = anyio.Event(), anyio.Event()
    stamp = [0.0]
    token = CancellationToken()
    scopes: list[anyio.CancelScope] = []

    async def body() -> None:
        if kind == "bare":
            with anyio.CancelScope() as scope:
                scopes.append(scope)
                ready.set()
                await anyio.sleep_forever()
            stamp[0] = time.perf_counter()
            return
        try:
            if kind == "token":
                with token.scope():
                    ready.set()
                    await anyio.sleep_forever()
            else:
                async with slot.claim("k"):
                    ready.set()
                    await anyio.sleep_forever()
        except OperationCancelled:
            stamp[0] = time.perf_counter()
            handled.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(body)
        await ready.wait()
        await anyio.wait_all_tasks_blocked()
        start = time.perf_counter()
        if kind == "bare":
            scopes[0].cancel()
        elif kind == "token":
            token.cancel()
        else:
            # The newcomer: superseding is its claim's entry. Its body then waits, as the bare
            # canceller waits right after cancel() (a checkpoint there instead would make
            # trio's random order of ready tasks part of the figure).
            async with slot.claim("k"):
                await handled.wait()
    return stamp[0] - start


async def _backend_figures(trials: int) -> None:
    slot = LatestOnly()
    samples: dict[str, list[float]] = {"bare": [], "token": [], "supersede": []}
    for _ in range(max(1, trials // 100)):  # interleaved blocks: all see the same noise
        for kind, values in samples.items():
            values.extend([await _interrupt_once(kind, slot) for _ in range(100)])
    bare = statistics.median(samples["bare"])
    print(f"  {'bare CancelScope.cancel() -> after the block':<58} {bare * 1e6:7.1f} µs  1.00x")
    for kind, label, target in (
        ("token", "token.cancel() -> except OperationCancelled", ""),
        ("supersede", "supersede (newcomer's claim) -> old body's except", "target <= 1.5x"),
    ):
        median = statistics.median(samples[kind])
        print(f"  {label:<58} {median * 1e6:7.1f} µs  {median / bare:4.2f}x  {target}")
    mine, base = await compare(claims_of(LatestOnly(), False), locks_of(anyio.Lock()), 16_000)
    print(
        f"  {'claim+release (1 task, checkpoint inside) vs anyio.Lock':<58} "
        f"{mine * 1e6:7.2f} µs  {mine / base:4.2f}x  target <= 3x"
    )


def main() -> None:
    served = "--served" in sys.argv
    for backend in ("asyncio", "trio"):
        print(f"[{backend}] interruption and claims (median ratios, interleaved)")
        anyio.run(_backend_figures, TRIALS, backend=backend)
        print(f"[{backend}] memory")
        anyio.run(bench_registry.memory, 2 * bench_registry.LIVE, backend=backend)
    print("[throughput, in-process] (peers as comparison rows when installed)")
    sys.argv = ["bench_throughput", "--in-process"]
    bench_throughput.main()
    if served:
        print("[throughput, served: the server's instructions per request]")
        sys.argv = ["bench_throughput", "--instructions"]
        bench_throughput.main()


if __name__ == "__main__":
    main()
