"""RedisBackend on a Redis Cluster (3 primaries + 3 replicas) beside a single redis-server.

Starts both on loopback (``tests/cluster.py`` joins the cluster) and measures, in one run:

- latency: supersede and cancel by id across two backends (``bench_redis``'s trials), on the
  cluster and on the single server, and the ratio (target: cluster <= 1.5x single);
- throughput: claim + release per second from several client processes, all on one prefix,
  against the single server, the cluster with the prefix in one slot group (``slot_groups=1``:
  one shard serves it) and the cluster with the default layout (16 slot groups spread over
  the three shards), and the ratio 3 shards / 1 shard;
- failover: SIGKILL of the primary that serves a backend's prefix, then the time until the
  replica is promoted and until the backend is connected again (``cluster-node-timeout`` is
  1000 ms here; production clusters usually run 15000).

Run: ``python -m benchmarks cluster`` (about a minute). Needs ``redis-server``.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

from benchmarks.bench_redis import percentile, redis_url
from benchmarks.bench_redis import run as latency_run
from cancelkit import LatestOnly
from cancelkit.redis import RedisBackend
from tests.cluster import LocalCluster  # run from the project root (python -m benchmarks)

TARGET_RATIO = 1.5
PROCESSES = 4
SECONDS = 3.0


async def bounded_latency(url: str) -> dict[str, list[float]]:
    with anyio.fail_after(600):  # a benchmark never hangs
        return await latency_run(url)


def claims_worker(
    url: str, prefix: str, groups: int, seconds: float, out: multiprocessing.Queue[int]
) -> None:
    async def main() -> int:
        done = 0
        async with RedisBackend(url, prefix=prefix, slot_groups=groups) as backend:
            slot = LatestOnly(backend=backend)
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                async with slot.claim(f"k{done % 64}"):
                    pass
                done += 1
        return done

    out.put(anyio.run(main))


def script_calls(cluster: LocalCluster) -> dict[int, int]:
    """Script calls (EVALSHA and EVAL) served by each primary since its stats were reset."""
    calls = {}
    for node in cluster.primaries():
        stats = node.info("commandstats")
        calls[node.port] = sum(
            int(stats.get(name, "calls=0").split(",")[0].removeprefix("calls="))
            for name in ("cmdstat_evalsha", "cmdstat_eval")
        )
    return calls


def reset_stats(cluster: LocalCluster) -> None:
    for node in cluster.primaries():
        node.call("CONFIG", "RESETSTAT")


def busiest_share(calls: dict[int, int]) -> float:
    """The busiest primary's share of the script calls (1/3 is a perfect spread over 3)."""
    return max(calls.values()) / max(sum(calls.values()), 1)


def claims_per_second(url: str, prefix: str, groups: int = 16) -> float:
    """Run PROCESSES processes on one prefix; the summed claims per second."""
    context = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[int] = context.Queue()
    processes = [
        context.Process(target=claims_worker, args=(url, prefix, groups, SECONDS, out))
        for _ in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    total = sum(out.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(30)
    return total / SECONDS


async def failover_once(cluster: LocalCluster) -> tuple[float, float]:
    prefix = f"fo{os.getpid()}{time.monotonic_ns() % 100000}"
    async with RedisBackend(cluster.url, prefix=prefix, heartbeat=0.2, timeout=0.5) as backend:
        # the primary serving this worker's inbox (it reads it every poll_interval)
        victim = cluster.primary_for_key(backend._keys.inbox())
        replica = victim.replica(cluster)
        killed = time.perf_counter()
        victim.kill()
        promoted = None
        with anyio.fail_after(60):
            while backend.statistics().failures == 0 or not backend.statistics().connected:
                if promoted is None and replica.role == "master":
                    promoted = time.perf_counter() - killed
                await anyio.sleep(0.01)
        back = time.perf_counter() - killed
    if promoted is None:
        promoted = back
    return promoted, back


def main() -> None:
    executable = shutil.which("redis-server")
    if executable is None:
        sys.exit("redis-server not found")
    with tempfile.TemporaryDirectory() as directory, redis_url() as single:
        cluster = LocalCluster(executable, Path(directory))
        cluster.start()
        try:
            print(
                f"latency (supersede / cancel by id across two backends), target <= {TARGET_RATIO}x"
            )
            for backend in ("asyncio", "trio"):
                one = anyio.run(bounded_latency, single, backend=backend)
                many = anyio.run(bounded_latency, cluster.url, backend=backend)
                for key, label in (("supersede", "supersede"), ("cancel", "cancel by id")):
                    s, c = statistics.median(one[key]), statistics.median(many[key])
                    ratio = c / s
                    verdict = "ok" if ratio <= TARGET_RATIO else "OVER TARGET"
                    print(
                        f"  [{backend}] {label:<13} single {s * 1e3:6.3f} ms (p99 "
                        f"{percentile(one[key], 99) * 1e3:5.2f})  cluster {c * 1e3:6.3f} ms (p99 "
                        f"{percentile(many[key], 99) * 1e3:5.2f})  ratio {ratio:4.2f}x {verdict}"
                    )
            print(
                f"throughput: claim+release per second, {PROCESSES} processes on one prefix, "
                f"{SECONDS:g} s each"
            )
            base = claims_per_second(single, "tp-single")
            reset_stats(cluster)
            one_shard = claims_per_second(cluster.url, "tp-one", groups=1)
            one_share = busiest_share(script_calls(cluster))
            reset_stats(cluster)
            three = claims_per_second(cluster.url, "tp-spread")
            spread_calls = script_calls(cluster)
            three_share = busiest_share(spread_calls)
            shards = sum(1 for calls in spread_calls.values() if calls)
            print(f"  single server                        {base:8.0f}/s")
            print(
                f"  cluster, slot_groups=1  (1 shard)    {one_shard:8.0f}/s  "
                f"({one_shard / base:4.2f}x single)  busiest shard: {one_share:4.0%} of scripts"
            )
            print(
                f"  cluster, slot_groups=16 ({shards} shards)   {three:8.0f}/s  "
                f"({three / base:4.2f}x single, {three / one_shard:4.2f}x one shard)  "
                f"busiest shard: {three_share:4.0%} of scripts"
            )
            print(
                "  (the clients and all six servers share this machine's cores: the busiest "
                "shard's share bounds the spread where shards have cores of their own)"
            )
            print("failover: SIGKILL of the primary serving a worker's inbox (node timeout 1 s)")
            for backend in ("asyncio", "trio"):
                promoted, back = anyio.run(failover_once, cluster, backend=backend)
                print(f"  [{backend}] replica promoted {promoted:5.2f} s, backend up {back:5.2f} s")
                cluster.heal()
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
