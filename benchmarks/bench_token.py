"""CancellationToken against the anyio primitives it is made of.

Prints, per backend, ratios measured side by side in the same run:

- token create + cancel vs anyio.Event create + set;
- cancel -> waiter woken vs Event.set -> waiter woken (median and p99 latency);
- ``token.scope()`` enter/exit vs a bare ``anyio.CancelScope``;
- ``token.cancel()`` -> the scoped body's ``except OperationCancelled`` vs a bare
  ``CancelScope.cancel()`` -> the code after its ``with`` block (the token's share of a
  supersede; target <= 1.5x): the ratio of the medians of 5 x 300 interleaved samples;

and the memory of one long-lived parent with 1,000,000 short-lived children (peak, end).
Run: ``python -m benchmarks.bench_token``.
"""

from __future__ import annotations

import gc
import statistics
import time
import tracemalloc
from collections.abc import Awaitable, Callable

import anyio

from benchmarks._util import compare_async, fmt_us, percentile, report_ratio
from cancelkit import CancellationToken, OperationCancelled

TARGET = 3.0


async def _token_create_cancel(n: int) -> None:
    for _ in range(n):
        CancellationToken().cancel()


async def _event_create_set(n: int) -> None:
    for _ in range(n):
        anyio.Event().set()


async def _token_scope(n: int) -> None:
    token = CancellationToken()
    for _ in range(n):
        with token.scope():
            pass


async def _bare_scope(n: int) -> None:
    for _ in range(n):
        with anyio.CancelScope():  # noqa: ASYNC100 - measuring enter/exit itself
            pass


async def _wake_latency(trials: int, *, use_token: bool) -> list[float]:
    """Time from cancel() / set() to the waiting task running again."""
    samples: list[float] = []

    async def waiter(wait: Callable[[], Awaitable[object]], stamp: list[float]) -> None:
        await wait()
        stamp.append(time.perf_counter())

    for _ in range(trials):
        stamp: list[float] = []
        token, event = CancellationToken(), anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter, token.wait if use_token else event.wait, stamp)
            await anyio.wait_all_tasks_blocked()
            start = time.perf_counter()
            if use_token:
                token.cancel()
            else:
                event.set()
        samples.append(stamp[0] - start)
    return samples


async def _interrupted_body(
    use_token: bool,
    token: CancellationToken,
    scopes: list[anyio.CancelScope],
    ready: anyio.Event,
    stamp: list[float],
) -> None:
    if use_token:
        try:
            with token.scope():
                ready.set()
                await anyio.sleep_forever()
        except OperationCancelled:
            stamp.append(time.perf_counter())
    else:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            ready.set()
            await anyio.sleep_forever()
        stamp.append(time.perf_counter())


async def _cancel_to_except(trials: int, *, use_token: bool) -> list[float]:
    """Time from token.cancel() / CancelScope.cancel() to the interrupted body's handler."""
    samples: list[float] = []
    for _ in range(trials):
        ready = anyio.Event()
        stamp: list[float] = []
        token = CancellationToken()
        scopes: list[anyio.CancelScope] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(_interrupted_body, use_token, token, scopes, ready, stamp)
            await ready.wait()
            await anyio.wait_all_tasks_blocked()
            start = time.perf_counter()
            if use_token:
                token.cancel()
            else:
                scopes[0].cancel()
        samples.append(stamp[0] - start)
    return samples


async def _run_backend() -> None:
    c, b, _ = await compare_async(_token_create_cancel, _event_create_set, loops=20_000)
    report_ratio("token create+cancel vs Event create+set", c, b, TARGET)
    c, b, _ = await compare_async(_token_scope, _bare_scope, loops=20_000)
    report_ratio("token.scope() enter/exit vs anyio.CancelScope", c, b, TARGET)
    token_lat: list[float] = []
    event_lat: list[float] = []
    for _ in range(10):  # interleave blocks of trials
        token_lat += await _wake_latency(200, use_token=True)
        event_lat += await _wake_latency(200, use_token=False)
    tm, em = statistics.median(token_lat), statistics.median(event_lat)
    report_ratio("cancel -> waiter woken vs Event.set -> woken (median)", tm, em, TARGET)
    print(
        f"  {'':<52} p99 {fmt_us(percentile(token_lat, 99))} vs {fmt_us(percentile(event_lat, 99))}"
    )
    token_lat, bare_lat = [], []
    for _ in range(5):
        token_lat += await _cancel_to_except(300, use_token=True)
        bare_lat += await _cancel_to_except(300, use_token=False)
    tm, bm = statistics.median(token_lat), statistics.median(bare_lat)
    report_ratio("token.cancel() -> except vs CancelScope.cancel() -> after", tm, bm, 1.5)


def _memory_children(count: int, in_flight: int = 1_000) -> None:
    """One long-lived parent; ``count`` children, ``in_flight`` of them alive at any time."""
    gc.collect()
    tracemalloc.start()
    parent = CancellationToken(name="shutdown")
    base = tracemalloc.get_traced_memory()[0]
    ring: list[CancellationToken | None] = [None] * in_flight
    for i in range(count):
        child = parent.child()
        if i % 2:
            child.cancel()  # half finish cancelled, half are simply dropped when done
        ring[i % in_flight] = child
    del child
    ring.clear()
    gc.collect()
    end, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    grew = end - base
    print(
        f"  {count:,} children of one parent ({in_flight:,} in flight): peak"
        f" {(peak - base) / 1e3:,.0f} kB, end {grew / 1e3:+.1f} kB vs baseline,"
        f" parent callbacks left: {parent.statistics().callbacks}"
        f" ({'back to baseline' if grew < 16_000 else 'GREW'})"
    )


def main() -> None:
    for backend in ("asyncio", "trio"):
        print(f"[{backend}]")
        anyio.run(_run_backend, backend=backend)
    print("[memory]")
    _memory_children(1_000_000)


if __name__ == "__main__":
    main()
