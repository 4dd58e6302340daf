"""TokenRegistry benchmarks: track/cancel cost vs a bare token scope, and memory at 100k ops.

Run: ``python -m benchmarks.bench_registry``
"""

from __future__ import annotations

import gc
import sys
import tracemalloc

import anyio

from benchmarks.bench_latest import compare, line
from cancelkit import CancellationToken, TokenRegistry
from cancelkit.backends import MemoryBackend

N = 20_000
LIVE = 100_000


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
    """Start n tasks that wait (bare, in a token scope, or tracked); return the bytes used."""
    go = anyio.Event()
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]

    async def task() -> None:
        if kind == "bare":
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


async def memory() -> None:
    now = [0.0]
    backend = MemoryBackend(clock=lambda: now[0])
    registry = TokenRegistry(backend=backend)
    tracemalloc.start()
    bare = await hold("bare", registry, LIVE)
    scope = await hold("scope", registry, LIVE)
    tracked = await hold("tracked", registry, LIVE)
    now[0] += 3600  # the finished-markers' TTL passes
    backend.statistics()
    gc.collect()
    settled = tracemalloc.get_traced_memory()[0]
    await hold("tracked", registry, LIVE)  # a second wave must not leave more behind
    now[0] += 3600
    backend.statistics()
    gc.collect()
    growth = tracemalloc.get_traced_memory()[0] - settled
    tracemalloc.stop()
    mb = 2**20
    print(
        f"  {LIVE:,} live tracked ops: {(tracked - bare) / mb:6.1f} MB beyond the same tasks "
        f"untracked (target <= 50 MB),\n"
        f"    of which the token scope alone (anyio CancelScope etc.) is {(scope - bare) / mb:.1f} "
        f"MB and the registry's own share {(tracked - scope) / mb:.1f} MB\n"
        f"  a second wave of {LIVE:,}, finished and expired, leaves {growth / mb:.2f} MB behind "
        f"(entries after: {backend.statistics()})"
    )


async def main() -> None:
    await costs()
    await memory()


if __name__ == "__main__":
    for backend in sys.argv[1:] or ["asyncio", "trio"]:
        print(f"TokenRegistry on {backend}:")
        anyio.run(main, backend=backend)
