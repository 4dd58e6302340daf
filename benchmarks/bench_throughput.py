"""Requests/second of a trivial FastAPI endpoint under uvicorn, as ratios to the bare app.

Run from the repository root (the peers need Python >= 3.12/3.13; they are optional, and
belong in a separate environment, never in the project's dependencies)::

    python -m benchmarks.bench_throughput [--seconds 2] [--rounds 9] [--connections 16]

(the values shown are the defaults). Each variant is served by its own uvicorn process (one
worker, 127.0.0.1, access log off), all started up front, and loaded by ``wrk`` (Debian
package ``wrk``) for ``--seconds``: every variant once per round, in a fresh random order,
compared with the bare app's figure from the same round (drift of a shared machine cancels
out). The one statistic shown per variant is the **median of those per-round ratios**; the
spread column is the lowest and highest per-round ratio, to show the noise. The bare app's
median requests/second is printed once, for scale.

``--in-process`` measures the same apps without a server or a load generator: each request is
an ASGI call with a scripted ``receive``/``send``, timed in CPU seconds of this process
(``time.process_time``), ``--requests`` per variant per round; its one statistic is the ratio
of the least CPU time per request over the rounds (other processes only ever add time). That
leaves out the server's own work, so its ratios are lower bounds of the served ones, but it is
steadier on a shared, loaded machine than wrk's figures.

Install the peers for a comparison run, e.g. ``uv venv -p 3.13 .venv-bench && uv pip install
-p .venv-bench -e '.[fastapi]' uvicorn fastapi-disconnect==0.4.0 aiofence==0.5.0``.
"""

# No "from __future__ import annotations": FastAPI resolves the routes' annotations at run time.

import argparse
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, NamedTuple

VARIANTS = {
    "none": "the bare app",
    "cancelkit": "CancelOnDisconnect, every route guarded (interrupt mode)",
    "cancelkit-signal": "CancelOnDisconnect, every route guarded (signal mode)",
    "cancelkit-unused": "CancelOnDisconnect installed, route not guarded",
    "cancelkit-token": "CancelOnDisconnect + a RequestToken dependency on the route",
    "fastapi-disconnect": "@cancel_on_disconnect on the route",
    "fastapi-disconnect-mw": "CancelOnDisconnectMiddleware",
    "fastapi-disconnect-dep": "a Disconnected dependency on the route",
    "aiofence": "aiofence DisconnectMiddleware + move_on_cancel in the route",
    "aiofence-dep": "aiofence DisconnectMiddleware + a DisconnectEvent dependency on the route",
}


def make_app() -> Any:
    """Build the app named by $BENCH_VARIANT (used as a uvicorn --factory)."""
    from fastapi import FastAPI

    variant = os.environ["BENCH_VARIANT"]
    api = FastAPI()
    if variant == "fastapi-disconnect":
        from fastapi_disconnect import cancel_on_disconnect

        @api.get("/t")
        @cancel_on_disconnect
        async def guarded() -> dict[str, bool]:
            return {"ok": True}

    elif variant == "fastapi-disconnect-dep":
        from fastapi_disconnect import Disconnected

        @api.get("/t")
        async def with_event(disconnected: Disconnected) -> dict[str, bool]:
            return {"ok": not disconnected.is_set()}

    elif variant == "aiofence":
        from aiofence import get_current_fencing

        @api.get("/t")
        async def fenced() -> dict[str, bool]:
            with get_current_fencing().move_on_cancel():
                return {"ok": True}

    elif variant == "aiofence-dep":
        from aiofence.contrib.fastapi import DisconnectEvent

        @api.get("/t")
        async def with_fence_event(disconnected: DisconnectEvent) -> dict[str, bool]:
            return {"ok": not disconnected.is_set()}

    elif variant == "cancelkit-token":
        from cancelkit.fastapi import RequestToken

        @api.get("/t")
        async def with_token(token: RequestToken) -> dict[str, bool]:
            return {"ok": not token.cancelled}

    else:

        @api.get("/t")
        async def plain() -> dict[str, bool]:
            return {"ok": True}

    if variant in ("none", "fastapi-disconnect", "fastapi-disconnect-dep"):
        return api
    if variant.startswith("cancelkit"):
        from cancelkit import CancelOnDisconnect

        if variant == "cancelkit-unused":
            return CancelOnDisconnect(api, include=["/work"])
        return CancelOnDisconnect(api, mode="signal" if variant.endswith("signal") else "interrupt")
    if variant == "fastapi-disconnect-mw":
        from fastapi_disconnect import CancelOnDisconnectMiddleware

        return CancelOnDisconnectMiddleware(api)
    from aiofence.contrib.starlette.middleware import DisconnectMiddleware

    return DisconnectMiddleware(api)


def available(variant: str) -> bool:
    module = {"fastapi-disconnect": "fastapi_disconnect", "aiofence": "aiofence"}.get(
        variant.removesuffix("-mw").removesuffix("-dep"), "fastapi"
    )
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(variant: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "BENCH_VARIANT": variant, "PYTHONPATH": os.getcwd()}
    server = subprocess.Popen(
        [
            *[sys.executable, "-m", "uvicorn", "--factory", "benchmarks.bench_throughput:make_app"],
            *["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            *["--log-level", "warning", "--no-access-log"],
        ],
        env=env,
    )
    deadline = time.monotonic() + 60  # a shared machine can be slow to import
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError(f"{variant}: server did not start") from None
            time.sleep(0.05)
        else:
            return server, f"http://127.0.0.1:{port}/t"


class Load(NamedTuple):
    per_second: float  # requests per wall-clock second
    per_cpu_second: float  # requests per CPU second of the server process


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(server: subprocess.Popen[bytes], url: str, seconds: int, connections: int) -> Load:
    """Load one server with wrk; return its requests/s and its requests per CPU second."""
    cpu_before = cpu_seconds(server.pid)
    result = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "2s", url],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    )
    cpu = cpu_seconds(server.pid) - cpu_before
    if "Non-2xx" in result.stdout or "Socket errors" in result.stdout:
        raise RuntimeError(f"{url}: errors under load:\n{result.stdout}")
    rate = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    count = re.search(r"(\d+) requests in", result.stdout)
    assert rate is not None, result.stdout
    assert count is not None, result.stdout
    return Load(float(rate.group(1)), int(count.group(1)) / max(cpu, 1e-9))


def asgi_scope() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/t",
        "raw_path": b"/t",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def cpu_per_request(app: Any, requests: int) -> float:
    """CPU seconds per request of ``app``, called in-process like a server would."""
    import asyncio

    async def send(message: Any) -> None:
        pass

    start = time.process_time()
    for _ in range(requests):
        received = False

        async def receive() -> dict[str, Any]:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.Event().wait()  # a client that stays: no disconnect
            raise AssertionError  # pragma: no cover

        await app(asgi_scope(), receive, send)
        await asyncio.sleep(0)  # the event loop turns between requests, as under a server
    return (time.process_time() - start) / requests


def in_process(variants: list[str], rounds: int, requests: int) -> dict[str, list[float]]:
    """Each variant's CPU seconds per request, one figure per round."""
    import asyncio

    apps = {}
    for variant in variants:
        os.environ["BENCH_VARIANT"] = variant
        apps[variant] = make_app()

    async def run() -> dict[str, list[float]]:
        for app in apps.values():
            await cpu_per_request(app, requests // 10)  # warm up
        costs: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(rounds):
            for variant in random.sample(variants, len(variants)):
                costs[variant].append(await cpu_per_request(apps[variant], requests))
        return costs

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument(
        "--statistic",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: requests per CPU second of the server (default; steady on a shared "
        "machine); wall: requests per second",
    )
    parser.add_argument(
        "--in-process", action="store_true", help="call the apps in-process (no server, no wrk)"
    )
    parser.add_argument("--requests", type=int, default=3000, help="per variant per round")
    args = parser.parse_args()
    if args.in_process:
        chosen = [v for v in args.variants if v == "none" or available(v)]
        if "none" not in chosen:
            chosen.insert(0, "none")
        costs = in_process(chosen, args.rounds, args.requests)
        base = min(costs["none"])
        print(
            f"\nin-process ASGI calls, Python {sys.version.split()[0]}, {args.rounds} interleaved "
            f"rounds of {args.requests} requests per variant; the bare app: {base * 1e6:.1f} µs "
            "CPU per request"
        )
        print("ratio: the bare app's least CPU per request (over the rounds) / the variant's")
        print("(the least-disturbed round of each: other processes only ever add time)")
        print(f"{'variant':24} {'ratio':>6} {'added':>9}  what")
        for variant in chosen[1:]:
            cost = min(costs[variant])
            print(
                f"{variant:24} {base / cost:6.3f} {(cost - base) * 1e6:6.1f} µs  "
                f"{VARIANTS[variant]}"
            )
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install -y wrk")
    variants = [v for v in args.variants if v == "none" or available(v)]
    for variant in set(args.variants) - set(variants):
        print(f"{variant}: not installed in this environment, skipped")
    if "none" not in variants:
        variants.insert(0, "none")
    servers = {}
    try:
        for variant in variants:
            servers[variant] = start_server(variant)
        for server, url in servers.values():
            load(server, url, 1, 4)  # warm up
        rps: dict[str, list[float]] = {v: [] for v in variants}
        ratios: dict[str, list[float]] = {v: [] for v in variants}
        for round_ in range(args.rounds):
            # Each round loads every variant once, in a fresh random order, and compares it
            # with the bare app of the same round: drift of a shared machine cancels out.
            order = random.sample(variants, len(variants))
            loads = {v: load(*servers[v], args.seconds, args.connections) for v in order}
            measured = {
                v: x.per_cpu_second if args.statistic == "cpu" else x.per_second
                for v, x in loads.items()
            }
            for variant, value in measured.items():
                rps[variant].append(loads[variant].per_second)
                ratios[variant].append(value / measured["none"])
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    finally:
        for server, _ in servers.values():
            server.send_signal(signal.SIGINT)
        for server, _ in servers.values():
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    print(
        f"\nuvicorn, Python {sys.version.split()[0]}, wrk -c{args.connections}, "
        f"{args.rounds} interleaved rounds of {args.seconds}s; the bare app served "
        f"{statistics.median(rps['none']):.0f} req/s (median)"
    )
    what = "requests per server CPU second" if args.statistic == "cpu" else "requests per second"
    report(ratios, what)


def report(ratios: dict[str, list[float]], what: str) -> None:
    print(f"ratio: the median of per-round ratios of {what} to the bare app's")
    print("spread: the lowest and the highest per-round ratio")
    print(f"{'variant':24} {'ratio':>6} {'spread':>12}  what")
    for variant, values in ratios.items():
        if variant == "none":
            continue
        print(
            f"{variant:24} {statistics.median(values):6.3f} "
            f"{min(values):5.3f}-{max(values):5.3f}  {VARIANTS[variant]}"
        )


if __name__ == "__main__":
    main()
