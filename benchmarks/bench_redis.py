"""Cross-worker latency through Redis, beside the raw pub/sub floor measured in the same run.

Two RedisBackend instances (two worker ids, separate connections) stand in for two workers.
Measured from the call on worker B to the deliver callback on worker A:

- supersede: worker B claims a key that worker A holds;
- cancel by id: worker B cancels an operation registered on worker A;
- floor: a raw PUBLISH from one coredis client to a subscriber on another.

Then the race under connection kills (issue 11's target): worker A tracks 200 operations whose
bodies run 300 ms; worker B cancels each within about 20 ms of its registration (half before
it, half after) while every normal and pub/sub connection is killed every 20-50 ms. Reported:
bodies that ran to completion although ``cancel()`` answered CANCELLED or PENDING (target 0),
the anomalies that tests/history.py's checker finds in the race's history (every call, answer
and body event; target 0), and cancel -> body exit latency (target p99 <= 250 ms).

And what a tombstone costs in Redis: a ``PENDING`` cancel's tombstone refuses every start of its
id until ``tombstone_ttl`` ends, so it is held for the whole TTL (before, the first start used
it up): bytes of server memory per tombstone (``INFO memory``) and a refused start's round trip
vs the cancel's that wrote it.

Uses ``$CANCELKIT_REDIS_URL`` if set, else starts a throw-away redis-server on a free port.
Run: ``python -m benchmarks.bench_redis`` (or ``python -m benchmarks redis``);
``--race-only`` skips the latency trials, ``--races N`` pools N race runs per configuration,
``--spinners N`` runs the races beside N CPU spinner processes (a starved machine).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import anyio
import coredis

from cancelkit import (
    CancelKind,
    CancelOutcome,
    CancelReason,
    OperationCancelled,
    Policy,
    TokenRegistry,
)
from cancelkit.redis import RedisBackend, RedisUnavailable
from tests.history import Event, History, Outages, check, spinners

TRIALS = 1000
TOMBS = 10_000
REPLACE = Policy.named("replace")
TARGET_MEDIAN, TARGET_P99 = 1e-3, 3e-3


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


@contextmanager
def redis_url() -> Iterator[str]:
    if url := os.environ.get("CANCELKIT_REDIS_URL"):
        yield url
        return
    executable = shutil.which("redis-server")
    if executable is None:
        sys.exit("redis-server not found: install it or set CANCELKIT_REDIS_URL")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        process = subprocess.Popen(
            [executable, *args, "--dir", directory], stdout=subprocess.DEVNULL
        )
        try:
            for _ in range(500):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                    break
                except OSError:
                    time.sleep(0.01)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(10)


async def measure(
    trial: Callable[[int], Awaitable[float]], trials: int, offset: int
) -> list[float]:
    for i in range(trials // 10):  # warm up (keys offset + trials + i stay unique)
        await trial(offset + trials + i)
    return [await trial(offset + i) for i in range(trials)]


async def run(url: str) -> dict[str, list[float]]:
    prefix = f"bench{os.getpid()}-{time.monotonic_ns()}"  # per run: seqs are remembered per key
    async with (
        RedisBackend(url, prefix=prefix) as a,
        RedisBackend(url, prefix=prefix) as b,
        coredis.Redis.from_url(url, decode_responses=True) as publisher,
        coredis.Redis.from_url(url, decode_responses=True) as subscriber_client,
    ):
        seen = anyio.Event()
        stamp = [0.0]

        def deliver(reason: CancelReason) -> None:
            stamp[0] = time.perf_counter()
            seen.set()

        async def supersede(i: int) -> float:
            nonlocal seen
            seen = anyio.Event()
            key = f"key{i}"
            await a.acquire(key, f"ha{i}", deliver, policy=REPLACE, limit=1, seq=i)
            start = time.perf_counter()
            await b.acquire(
                key,
                f"hb{i}",
                lambda reason: None,
                policy=REPLACE,
                limit=1,
                seq=None,
            )
            with anyio.move_on_after(5):  # a fail-open fallback (a stalled box) never delivers
                await seen.wait()
            elapsed = stamp[0] - start if seen.is_set() else 5.0
            await a.release(key, f"ha{i}")
            await b.release(key, f"hb{i}")
            return elapsed

        async def cancel_by_id(i: int) -> float:
            nonlocal seen
            seen = anyio.Event()
            op = f"op{i}"
            await a.register(op, None, f"ra{i}", deliver)
            start = time.perf_counter()
            await b.cancel(op, None, CancelReason())
            with anyio.move_on_after(5):  # a fail-open fallback (a stalled box) never delivers
                await seen.wait()
            elapsed = stamp[0] - start if seen.is_set() else 5.0
            await a.unregister(op, None, f"ra{i}")
            return elapsed

        async with subscriber_client.pubsub(
            channels=[f"{prefix}:raw"], ignore_subscribe_messages=True
        ) as pubsub:

            async def floor(i: int) -> float:
                start = time.perf_counter()
                await publisher.publish(f"{prefix}:raw", str(i))
                while await pubsub.get_message() is None:
                    pass
                return time.perf_counter() - start

            results: dict[str, list[float]] = {"floor": [], "supersede": [], "cancel": []}
            for round_ in range(5):  # interleave the three, so noise hits them alike
                for name, trial in (
                    ("floor", floor),
                    ("supersede", supersede),
                    ("cancel", cancel_by_id),
                ):
                    results[name] += await measure(trial, TRIALS // 5, round_ * TRIALS)
        return results


def report(name: str, results: dict[str, list[float]]) -> None:
    floor_median = statistics.median(results["floor"])
    print(f"  [{name}] {len(results['floor'])} trials each")
    for label, key in [
        ("raw PUBLISH -> receive (floor)", "floor"),
        ("supersede on B -> observed on A", "supersede"),
        ("cancel by id on B -> observed on A", "cancel"),
    ]:
        values = results[key]
        median, p99 = statistics.median(values), percentile(values, 99)
        verdict = ""
        if key != "floor":
            ok = median <= TARGET_MEDIAN and p99 <= TARGET_P99
            verdict = f"  {median / floor_median:4.2f}x floor  {'ok' if ok else 'OVER TARGET'}"
        print(f"    {label:<38} median {median * 1e3:6.3f} ms  p99 {p99 * 1e3:6.3f} ms{verdict}")


RACE_JOBS, RACE_BODY, RACE_TARGET_P99 = 200, 0.3, 0.25


async def race(url: str, fail_open: bool) -> dict[str, Any]:
    """Issue 11's race: cancels around registration while connections are killed."""
    prefix = f"race{os.getpid()}-{time.monotonic_ns()}"  # fresh: earlier runs leave markers
    history = History()
    outages = Outages(lambda kind: history.add(Event("a", time.monotonic(), kind)))
    logging.getLogger("cancelkit.redis").addHandler(outages)
    try:
        result = await _race(url, fail_open, prefix, history)
    finally:
        logging.getLogger("cancelkit.redis").removeHandler(outages)
    anomalies = check(history)
    return {**result, "events": len(history), "anomalies": anomalies}


async def _race(url: str, fail_open: bool, prefix: str, history: History) -> dict[str, Any]:
    async with (
        RedisBackend(url, prefix=prefix, fail_open=fail_open) as a,
        RedisBackend(url, prefix=prefix) as b,
        coredis.Redis.from_url(url, decode_responses=True) as killer_client,
    ):
        runner, canceller = TokenRegistry(backend=a), TokenRegistry(backend=b)
        answers: dict[int, CancelOutcome | None] = {}
        asked: dict[int, float] = {}
        exited: dict[int, float] = {}
        completed: set[int] = set()
        stop = anyio.Event()

        async def killer() -> None:
            i = 0
            while not stop.is_set():
                for kind in (coredis.PureToken.NORMAL, coredis.PureToken.PUBSUB):
                    with suppress(coredis.exceptions.RedisError):
                        await killer_client.client_kill(type_=kind, skipme=True)
                await anyio.sleep((0.02, 0.035, 0.05)[i % 3])
                i += 1

        def record(kind: str, i: int, value: str = "", start: float | None = None) -> None:
            process = "b" if kind == "cancel" else "a"
            history.add(Event(process, time.monotonic(), kind, f"job{i}", value, start))

        async def job(i: int, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
            started = False
            end = "failed"
            try:
                async with runner.track(f"job{i}"):
                    started = True
                    record("started", i)
                    task_status.started()
                    try:
                        await anyio.sleep(RACE_BODY)
                    finally:
                        record("exiting", i)
                completed.add(i)
                end = "completed"
            except OperationCancelled:
                end = "cancelled"
            except RedisUnavailable:
                pass
            finally:
                exited[i] = time.perf_counter()
                record(end, i)
                if not started:
                    task_status.started()

        async def cancel(i: int) -> None:
            asked[i] = time.perf_counter()
            start = time.monotonic()
            try:
                answers[i] = await canceller.cancel(f"job{i}")
            except RedisUnavailable:
                answers[i] = None
            record("cancel", i, str(answers[i] or "unavailable"), start)

        async with anyio.create_task_group() as tg:
            tg.start_soon(killer)
            for i in range(RACE_JOBS):
                if i % 2:
                    await cancel(i)
                    tg.start_soon(job, i)
                else:
                    await tg.start(job, i)
                    tg.start_soon(cancel, i)
                await anyio.sleep(0.01)
            with anyio.move_on_after(10):
                while len(exited) < RACE_JOBS or len(answers) < RACE_JOBS:  # noqa: ASYNC110
                    await anyio.sleep(0.01)  # a benchmark: polling costs nothing measured
            stop.set()
            tg.cancel_scope.cancel()
        obeyed = [i for i, answer in answers.items() if answer in ("cancelled", "pending")]
        latencies = [
            max(0.0, exited[i] - asked[i])
            for i in obeyed
            if answers[i] == "cancelled" and i in exited and i not in completed
        ]
        return {
            "completed_after": sum(1 for i in obeyed if i in completed),
            "answers": {
                str(k): sum(1 for a in answers.values() if a == k)
                for k in ("cancelled", "pending", "not_found", None)
            },
            "latencies": latencies,
        }


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs of one configuration as one: counts added, latencies pooled."""
    answers: dict[str, int] = {}
    for result in results:
        for key, count in result["answers"].items():
            answers[key] = answers.get(key, 0) + count
    return {
        "runs": len(results),
        "events": sum(r["events"] for r in results),
        "anomalies": [a for r in results for a in r["anomalies"]],
        "completed_after": sum(r["completed_after"] for r in results),
        "answers": answers,
        "latencies": [x for r in results for x in r["latencies"]],
    }


def report_race(name: str, result: dict[str, Any]) -> None:
    lat = result["latencies"]
    p50, p99 = (statistics.median(lat), percentile(lat, 99)) if lat else (0.0, 0.0)
    anomalies = result["anomalies"]
    ok = result["completed_after"] == 0 and not anomalies and p99 <= RACE_TARGET_P99
    print(
        f"    [{name}] {result.get('runs', 1)} run(s); answers {result['answers']}; "
        f"completed after CANCELLED/PENDING: "
        f"{result['completed_after']}; anomalies {len(anomalies)} "
        f"(of {result['events']} events checked); cancel -> exit p50 {p50 * 1e3:.1f} ms "
        f"p99 {p99 * 1e3:.1f} ms  {'ok' if ok else 'OVER TARGET'}"
    )
    for line in anomalies[:5]:
        print(f"      anomaly: {line}")


async def tombstones(url: str) -> None:
    prefix = f"tomb{os.getpid()}-{time.monotonic_ns()}"
    reason = CancelReason(CancelKind.REQUESTED, "bench")
    async with (
        RedisBackend(url, prefix=prefix, max_tombstones=TOMBS) as backend,
        coredis.Redis.from_url(url, decode_responses=True) as client,
    ):
        before = int(str((await client.info("memory"))["used_memory"]))
        cancels, refused = [], []
        for i in range(TOMBS):  # 100 owners, 100 tombstones each
            started = time.perf_counter()
            await backend.cancel(f"op-{i}", f"owner{i % 100}", reason)
            cancels.append(time.perf_counter() - started)
        used = int(str((await client.info("memory"))["used_memory"])) - before
        for i in range(TOMBS):
            started = time.perf_counter()
            await backend.register(f"op-{i}", f"owner{i % 100}", "h", lambda reason: None)
            refused.append(time.perf_counter() - started)
        await client.eval(  # leave the server as found
            "for _, k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end",
            keys=[],
            args=[f"{prefix}*"],
        )
    print(
        f"  a tombstone: {used / TOMBS:.0f} B of Redis memory ({TOMBS:,}, ids of 4-7 "
        f"characters), held for tombstone_ttl; a refused start "
        f"{statistics.median(refused) * 1e3:.3f} ms (median) vs the cancel that wrote it "
        f"{statistics.median(cancels) * 1e3:.3f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_redis")
    parser.add_argument("--race-only", action="store_true", help="skip the latency trials")
    parser.add_argument("--races", type=int, default=1, help="race runs per configuration")
    parser.add_argument("--spinners", type=int, default=0, help="CPU spinners beside the races")
    options = parser.parse_args(sys.argv[1:])
    with redis_url() as url:
        if not options.race_only:
            print("tombstones (asyncio):")
            anyio.run(tombstones, url)
            print(f"targets: median <= {TARGET_MEDIAN * 1e3:g} ms, p99 <= {TARGET_P99 * 1e3:g} ms")
            for backend in ("asyncio", "trio"):
                report(backend, anyio.run(run, url, backend=backend))
        print(
            f"race under connection kills every 20-50 ms ({RACE_JOBS} jobs of "
            f"{RACE_BODY * 1e3:.0f} ms, {options.spinners} CPU spinners; targets: 0 completed, "
            f"0 anomalies, p99 <= {RACE_TARGET_P99 * 1e3:g} ms)"
        )
        with spinners(options.spinners):
            for backend in ("asyncio", "trio"):
                for fail_open in (False, True):
                    results = [
                        anyio.run(race, url, fail_open, backend=backend)
                        for _ in range(options.races)
                    ]
                    report_race(f"{backend}, fail_open={fail_open}", merge(results))


if __name__ == "__main__":
    main()
