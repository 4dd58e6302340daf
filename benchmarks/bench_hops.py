"""Across HTTP hops: cancel at A → C stops; a budget's deadline at every hop; the transport's cost.

Run from the repository root (one run prints every figure of docs/benchmarks.md's "Across
HTTP hops"; then once more with ``--spinners 2`` for the loaded ones)::

    python -m benchmarks.bench_hops [--trials 200] [--plain-trials 10] [--budget-trials 50]
    python -m benchmarks.bench_hops --spinners 2

Three server processes A → B → C on 127.0.0.1 (the chain app of the tests,
``tests/hops_app.py``: every hop calls the next with ``cancelkit.httpx.TokenTransport`` under
``CancelOnDisconnect``), all uvicorn (asyncio) or all hypercorn on trio. Times are
``time.monotonic()`` read in each process: one clock on one Linux host.

* **cancel at A → C's handler cancelled**: a raw socket sends ``GET /work`` to A and waits
  until C's handler has started (a request to C that waits on C's own event); then it notes
  the time and closes the socket; C's handler notes the time it ended. Median and p99 over
  ``--trials``. Next to it the same chain without cancelkit (``HOP_PLAIN=1``: no middleware,
  httpx's own transport) where C works 1 s: whether and when it ends after the cancel.
* **a 300 ms budget**: ``Request-Timeout-Ms: 300`` to A, C holds: how far each hop's end is
  from A's (target: within 15 ms), and how late A's deadline fired.
* **the transport's CPU cost per outgoing request**: keep-alive GETs through httpx and
  httpcore on a canned connection (every request answered at once: no server, no socket), with
  ``httpx.AsyncHTTPTransport`` and with ``TokenTransport`` around it: outside any token; and
  with a token with a deadline current, each against the plain transport in the same token
  context, two ways: in the token's own scope (``token.scope()``, interrupt mode: the header
  and its trace hook; that scope's cancel ends the request) and *signalled* (the token current
  with no scope of its own, as in ``CancelOnDisconnect(mode="signal")`` or a task an outer
  task group started: the transport aborts the request itself, with a callback, a cancel
  scope per step and a body wrapper). Interleaved rounds, the median CPU time per request
  (target: ≤ 25 µs more); and the deadline header parser on a request without the header
  (what every guarded request now pays).
* **instructions** (valgrind's callgrind, if installed; ``--instructions``: only these): the
  same canned requests in processes under callgrind, 100 and 600 of them, the difference of
  the two counts over 500 is one request's instructions, which a shared machine's load does
  not blur; printed also as CPU time at the plain request's rate measured in the same run.
* ``--spinners N``: the cancel and budget trials with N processes keeping cores busy (the
  issue's loaded target, p99 ≤ 50 ms); the transport's cost is not measured then.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from typing import Any

import anyio
import httpcore
import httpx

from benchmarks._util import percentile
from cancelkit import CancellationToken
from cancelkit._deadline import parse_deadline
from cancelkit.httpx import TokenTransport
from tests.history import spinners
from tests.hops import chain, current

CHAINS = {
    "asyncio": dict.fromkeys("ABC", ("uvicorn", "interrupt")),
    "trio": dict.fromkeys("ABC", ("hypercorn-trio", "interrupt")),
}
LIMIT = 30.0


def get(url: str, **params: Any) -> Any:
    return httpx.get(url, params=params, timeout=LIMIT).json()


async def cancel_trial(urls: dict[str, str], id: str, query: str) -> tuple[float, Any]:
    """Send GET /work/<id> to A, wait until C started, close; return (t0, C's record)."""
    port = int(urls["A"].rsplit(":", 1)[1])
    stream = await anyio.connect_tcp("127.0.0.1", port)
    await stream.send(f"GET /work/{id}?{query} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    await anyio.to_thread.run_sync(lambda: get(f"{urls['C']}/records/{id}", until="started"))
    t0 = time.monotonic()
    await stream.aclose()
    record = await anyio.to_thread.run_sync(lambda: get(f"{urls['C']}/records/{id}", until="ended"))
    return t0, record


def cancel_latency(backend: str, trials: int, plain_trials: int, loaded: bool) -> None:
    with chain(CHAINS[backend]) as urls:
        ms = []
        for i in range(trials):
            t0, c = anyio.run(cancel_trial, urls, f"c{i}", "hold=1", backend=backend)
            assert c["end"] == "client_disconnected", c
            ms.append((c["end_at"] - t0) * 1000)
    print(
        f"  {backend:8} cancelkit   cancel at A -> C's handler cancelled: median "
        f"{statistics.median(ms):6.2f} ms, p99 {percentile(ms, 99):6.2f} ms, "
        f"max {max(ms):6.2f} ms ({trials} trials; target median <= 5, "
        + ("p99 <= 50 loaded)" if loaded else "p99 <= 20 quiet)")
    )
    with chain(CHAINS[backend], env={"HOP_PLAIN": "1"}) as urls:
        after, completed = [], 0
        for i in range(plain_trials):
            t0, c = anyio.run(cancel_trial, urls, f"p{i}", "work_ms=1000", backend=backend)
            completed += c["end"] == "completed"
            after.append((c["end_at"] - t0) * 1000)
    print(
        f"  {backend:8} no cancelkit (C works 1 s): C ran to the end in {completed} of "
        f"{plain_trials} trials, ending a median {statistics.median(after):6.1f} ms after the "
        "cancel"
    )


def budget(backend: str, trials: int) -> None:
    spreads, late, ends = [], [], {"deadline": 0, "client_disconnected": 0}
    answered = 0
    with chain(CHAINS[backend]) as urls:
        for i in range(trials):
            id = f"b{i}"
            answer = httpx.get(
                f"{urls['A']}/work/{id}",
                params={"hold": "1"},
                headers={"Request-Timeout-Ms": "300"},
                timeout=LIMIT,
            )
            assert answer.status_code == 504, answer.text
            records = {hop: get(f"{urls[hop]}/records/{id}", until="ended") for hop in "ABC"}
            a = records["A"]
            spreads.append(max(abs(r["end_at"] - a["end_at"]) for r in records.values()) * 1000)
            late.append((a["end_at"] - (a["entry"] + a["left_ms"] / 1000)) * 1000)
            for hop in "BC":
                ends[records[hop]["end"]] += 1
            answered += all(r["statuses"] == [504] for r in records.values())
    median = statistics.median(spreads)
    print(
        f"  {backend:8} 300 ms budget: every hop ended within a median {median:5.2f} "
        f"ms of A (p99 {percentile(spreads, 99):5.2f}, max {max(spreads):5.2f}; target <= 15); "
        f"A's deadline fired a median {statistics.median(late):5.2f} ms late; "
        f"B and C stopped by their own deadline {ends['deadline']} times, by their caller "
        f"leaving {ends['client_disconnected']}; every hop answered one 504 in {answered} "
        f"({trials} trials)"
    )


_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class _CannedStream(httpcore.AsyncNetworkStream):
    """A connection that answers every request at once: httpx's and httpcore's whole work,
    without a server's or a socket's noise."""

    def __init__(self) -> None:
        self.pending = 0

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        if self.pending:
            self.pending -= 1
            return _ANSWER
        return b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        self.pending += buffer.startswith(b"GET ")

    async def aclose(self) -> None:
        pass


class _CannedBackend(httpcore.AsyncNetworkBackend):
    async def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        return _CannedStream()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


def canned() -> httpx.AsyncHTTPTransport:
    transport = httpx.AsyncHTTPTransport()
    transport._pool = httpcore.AsyncConnectionPool(network_backend=_CannedBackend())
    return transport


#: The canned requests measured: (the transport wrapped or not, how the token is current).
#: "scope": in the token's own scope (``token.scope()``, interrupt mode): the transport passes
#: the request on and that scope's cancel ends it. "signal": the token current but no scope
#: of its own around the task: the transport aborts the request itself (its cancel scope per
#: step, the callback, the body wrapper). Each is compared with the plain transport in the
#: same token context.
VARIANTS = [(wrapped, mode) for mode in ("scope", "signal") for wrapped in (False, True)]


async def canned_requests(wrapped: bool, mode: str, count: int) -> float:
    """``count`` canned GETs with a token with a deadline current (``mode``: see VARIANTS);
    return the CPU seconds they took (after 50 to warm up)."""
    client = httpx.AsyncClient(transport=TokenTransport(canned()) if wrapped else canned())
    token = CancellationToken(timeout=3600)
    context = token.scope if mode == "scope" else partial(current, token)
    async with client:
        for _ in range(50):
            with context():
                await client.get("http://next/")
        start = time.process_time()
        for _ in range(count):
            with context():
                await client.get("http://next/")
        return time.process_time() - start


async def transport_cost(requests: int, rounds: int) -> dict[tuple[bool, str], float]:
    """The median CPU seconds per canned request of each variant, in interleaved rounds."""
    samples: dict[tuple[bool, str], list[float]] = {variant: [] for variant in VARIANTS}
    samples[True, "none"] = []  # the transport outside any token
    samples[False, "none"] = []
    for _ in range(rounds):
        for wrapped, mode in samples:
            if mode == "none":
                seconds = await untokened_requests(wrapped, requests)
            else:
                seconds = await canned_requests(wrapped, mode, requests)
            samples[wrapped, mode].append(seconds / requests)
    return {variant: statistics.median(values) for variant, values in samples.items()}


async def untokened_requests(wrapped: bool, count: int) -> float:
    client = httpx.AsyncClient(transport=TokenTransport(canned()) if wrapped else canned())
    async with client:
        for _ in range(50):
            await client.get("http://next/")
        start = time.process_time()
        for _ in range(count):
            await client.get("http://next/")
        return time.process_time() - start


def transport(backend: str, requests: int, rounds: int) -> dict[str, float]:
    """Print the CPU time per request; return the plain request's by token context."""
    cost = anyio.run(transport_cost, requests, rounds, backend=backend)
    base = cost[False, "none"]
    added = {mode: cost[True, mode] - cost[False, mode] for mode in ("none", "scope", "signal")}
    print(
        f"  {backend:8} CPU per outgoing request (httpx + httpcore, canned answers; medians of "
        f"{rounds} interleaved rounds of {requests}): plain {base * 1e6:5.1f} µs; "
        f"TokenTransport outside a token {added['none'] * 1e6:+.1f} µs; with a deadline, over "
        f"the plain transport in the same token context: in the token's own scope "
        f"{added['scope'] * 1e6:+.1f} µs, signalled (the transport aborts) "
        f"{added['signal'] * 1e6:+.1f} µs (target <= 25)"
    )
    return {mode: cost[False, mode] for mode in ("scope", "signal")}


def program(backend: str, wrapped: bool, mode: str, count: int) -> list[str]:
    """The command that runs ``count`` canned requests of one variant in a new process."""
    code = (
        "import anyio; from benchmarks.bench_hops import canned_requests; "
        f"anyio.run(canned_requests, {wrapped}, {mode!r}, {count}, backend={backend!r})"
    )
    return [sys.executable, "-c", code]


def count_instructions(backend: str, wrapped: bool, mode: str, count: int) -> int:
    valgrind = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    run = subprocess.run(
        [*valgrind, *program(backend, wrapped, mode, count)],
        capture_output=True,
        text=True,
        check=True,
    )
    refs = re.search(r"I\s+refs:\s+([\d,]+)", run.stderr)
    assert refs is not None, run.stderr
    return int(refs.group(1).replace(",", ""))


def instructions(backend: str, cpu: dict[str, float] | None = None) -> None:
    """Print the instructions per canned request that the transport adds, in the token's own
    scope and signalled: (600 requests - 100) / 500 of each. With ``cpu`` (the plain
    request's CPU seconds from :func:`transport`, same run), also as CPU time at that rate."""
    if shutil.which("valgrind") is None:
        print(f"  {backend:8} instructions: not measured (valgrind is needed)")
        return
    # once without valgrind: any stale .pyc is compiled then, not in one counted process
    subprocess.run(program(backend, True, "signal", 1), check=True)
    runs = [(*variant, count) for variant in VARIANTS for count in (100, 600)]
    with ThreadPoolExecutor(2) as pool:  # eight processes of about 40 s each
        found = pool.map(lambda run: count_instructions(backend, *run), runs)
        counts = dict(zip(runs, found, strict=True))
    for mode, label in (("scope", "in the token's own scope"), ("signal", "signalled")):
        plain = (counts[False, mode, 600] - counts[False, mode, 100]) / 500
        wrapped = (counts[True, mode, 600] - counts[True, mode, 100]) / 500
        as_cpu = ""
        if cpu is not None:
            as_cpu = (
                f", about +{(wrapped / plain - 1) * cpu[mode] * 1e6:.1f} µs at this run's "
                f"{cpu[mode] * 1e6:.0f} µs per plain request (target <= 25)"
            )
        print(
            f"  {backend:8} instructions per outgoing request with a deadline, {label}: "
            f"plain {plain / 1e3:.0f} k, TokenTransport +{(wrapped - plain) / 1e3:.1f} k "
            f"(+{(wrapped / plain - 1) * 100:.1f} %){as_cpu}"
        )


def header_parse(loops: int = 200_000) -> None:
    headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"user-agent", b"python-httpx/0.28.1"),
        (b"accept", b"*/*"),
        (b"accept-encoding", b"gzip, deflate"),
        (b"connection", b"keep-alive"),
        (b"x-user", b"alice"),
    ]
    with_header = [*headers, (b"request-timeout-ms", b"1500")]
    rows = []
    for label, value in (("without the header", headers), ("with it", with_header)):
        start = time.process_time()
        for _ in range(loops):
            parse_deadline(value, None)
        rows.append(f"{label} {(time.process_time() - start) / loops * 1e9:4.0f} ns")
    print(f"  deadline header parser, 6 ordinary headers: {', '.join(rows)} per request")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--plain-trials", type=int, default=10)
    parser.add_argument("--budget-trials", type=int, default=50)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--backends", default="asyncio,trio")
    parser.add_argument("--instructions", action="store_true", help="only the transport's cost")
    parser.add_argument("--no-instructions", action="store_true", help="no callgrind runs")
    parser.add_argument(
        "--spinners",
        type=int,
        default=0,
        help="the cancel and budget trials under N CPU spinners (a loaded machine); the "
        "transport's cost is then not measured",
    )
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, Python {sys.version.split()[0]}, httpx "
        f"{httpx.__version__}, loopback, load average {load:.2f} at the start"
        + (f", {args.spinners} CPU spinners" if args.spinners else "")
    )
    backends = args.backends.split(",")
    if args.instructions:
        for backend in backends:
            instructions(backend)
        return
    if not args.spinners:
        header_parse()
        for backend in backends:
            cpu = transport(backend, args.requests, args.rounds)
            if not args.no_instructions:
                instructions(backend, cpu)
    with spinners(args.spinners):
        for backend in backends:
            cancel_latency(backend, args.trials, args.plain_trials, args.spinners > 0)
            budget(backend, args.budget_trials)


if __name__ == "__main__":
    main()
