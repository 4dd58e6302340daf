"""TokenRegistry benchmarks: time ratios, memory per live operation, and no growth.

Figures, on each anyio backend:

- ``track()`` + exit vs a bare token scope, and track + ``cancel(id)`` + exit vs scope +
  ``cancel()``: the ratio of the two medians over interleaved rounds (median: robust to the
  pauses of a shared machine);
- cancelkit's own memory per live operation: ``LIVE`` tasks each waiting in a bare
  ``anyio.CancelScope`` (the baseline) vs in ``token.scope()`` (target <= 400 B) vs in
  ``registry.track()`` (target <= 700 B); bytes from ``tracemalloc`` after ``gc.collect()``,
  divided by ``LIVE`` (deterministic: allocation counts, not time);
- no growth: ``--ops`` operations (default 1,000,000) tracked and finished in waves of
  ``LIVE``; the memory after the last wave minus the memory after the first (target: within
  64 kB, i.e. noise of the allocator, independent of the count);
- what a tombstone costs: a ``PENDING`` cancel's tombstone refuses every start of its id until
  ``tombstone_ttl`` ends, so it is held for the whole TTL even when its operation tried to start
  at once (before, that start used it up): bytes per tombstone, the most cancel-before-start
  calls per second one owner can sustain at the defaults, and a refused start's time vs a
  cancel that wrote the tombstone.

Run: ``python -m benchmarks.bench_registry [--ops N] [asyncio|trio ...]``
"""

from __future__ import annotations

import gc
import inspect
import sys
import time
import tracemalloc

import anyio

from benchmarks.bench_latest import compare, line
from cancelkit import CancelKind, CancellationToken, CancelReason, TokenRegistry
from cancelkit.backends import MemoryBackend

N = 20_000
LIVE = 20_000
OPS = 1_000_000
TOMBS = 10_000


async def costs() -> None:
    registry = TokenRegistry()

    async def tracks(n: int) -> None:
        for _ in range(n):
            async with registry.track():
                pass

    async def scopes(n: int) -> None:
        for _ in range(n):
            with CancellationToken().scope():
                pass

    mine, base = await compare(tracks, scopes, N)
    line("track()+exit vs bare token scope", mine, base)

    async def track_cancels(n: int) -> None:
        for i in range(n):
            async with registry.track(f"op-{i}"):
                await registry.cancel(f"op-{i}")

    async def scope_cancels(n: int) -> None:
        for _ in range(n):
            token = CancellationToken()
            with token.scope():
                token.cancel()

    mine, base = await compare(track_cancels, scope_cancels, N)
    line("track()+cancel(id)+exit vs token scope+cancel()", mine, base)


async def hold(kind: str, registry: TokenRegistry, n: int) -> int:
    """Start n tasks that wait (in a bare CancelScope, a token scope, or tracked); bytes used."""
    go = anyio.Event()
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]

    async def task() -> None:
        if kind == "bare":
            with anyio.CancelScope():
                await go.wait()
        elif kind == "scope":
            with CancellationToken().scope():
                await go.wait()
        else:
            async with registry.track(owner="user-1"):
                await go.wait()

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(task)
        await anyio.wait_all_tasks_blocked()
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
        go.set()
    return used


async def memory(ops: int) -> None:
    now = [0.0]
    backend = MemoryBackend(clock=lambda: now[0])
    registry = TokenRegistry(backend=backend)
    tracemalloc.start()
    for kind in ("bare", "scope", "tracked"):  # warm up: one-time growth is not per op
        await hold(kind, registry, LIVE)
    now[0] += 3600  # the warm-up's finished-markers expire
    backend.statistics()
    used = {kind: await hold(kind, registry, LIVE) for kind in ("bare", "scope", "tracked")}
    scope = (used["scope"] - used["bare"]) / LIVE
    tracked = (used["tracked"] - used["bare"]) / LIVE
    print(
        f"  memory beyond a bare CancelScope, per live op: token.scope() {scope:5.0f} B "
        f"(target <= 400 B), registry.track() {tracked:5.0f} B (target <= 700 B)"
    )
    waves = max(2, ops // LIVE)
    settled = 0
    for wave in range(waves):
        await hold("tracked", registry, LIVE)
        now[0] += 3600  # the finished-markers' TTL passes
        backend.statistics()
        gc.collect()
        if wave == 0:
            settled = tracemalloc.get_traced_memory()[0]
    growth = tracemalloc.get_traced_memory()[0] - settled
    tracemalloc.stop()
    print(
        f"  {waves * LIVE:,} tracked ops come and go ({LIVE:,} live at a time): memory after "
        f"the last wave {growth / 1e3:+.1f} kB vs after the first (target within 64 kB); "
        f"{backend.statistics()}"
    )


async def tombstones() -> None:
    reason = CancelReason(CancelKind.REQUESTED, "bench")

    def deliver(reason: CancelReason) -> None:
        pass

    async def write(backend: MemoryBackend) -> float:
        started = time.perf_counter()
        for i in range(TOMBS):  # 100 owners, 100 tombstones each
            await backend.cancel(f"op-{i}", f"owner{i % 100}", reason)
        return time.perf_counter() - started

    backend = MemoryBackend(max_tombstones=TOMBS)
    cancels = await write(backend)
    started = time.perf_counter()
    for i in range(TOMBS):
        assert await backend.register(f"op-{i}", f"owner{i % 100}", "h", deliver) is not None
    refused = time.perf_counter() - started
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = MemoryBackend(max_tombstones=TOMBS)
    await write(kept)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    defaults = {k: p.default for k, p in inspect.signature(MemoryBackend).parameters.items()}
    ttl = defaults["tombstone_ttl"]
    print(
        f"  a tombstone: {used / TOMBS:.0f} B ({TOMBS:,} of ids of 4-7 characters), held for "
        f"tombstone_ttl ({ttl:g} s): at the defaults one owner sustains "
        f"{defaults['max_tombstones_per_owner'] / ttl:.1f} cancels before start per second, "
        f"a process {defaults['max_tombstones'] / ttl:.0f}; a refused start "
        f"{refused / TOMBS * 1e6:.2f} µs vs the cancel that wrote it {cancels / TOMBS * 1e6:.2f} µs"
    )


def main() -> None:
    args = sys.argv[1:]
    ops = OPS
    if "--ops" in args:
        at = args.index("--ops")
        ops = int(args[at + 1])
        del args[at : at + 2]
    for backend in args or ["asyncio", "trio"]:
        print(f"TokenRegistry on {backend}:")
        anyio.run(costs, backend=backend)
        anyio.run(memory, ops, backend=backend)
        anyio.run(tombstones, backend=backend)


if __name__ == "__main__":
    main()
