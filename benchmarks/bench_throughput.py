"""What the disconnect helpers cost per request of a trivial FastAPI endpoint (ratios).

Run from the repository root (the peers need Python >= 3.12/3.13; they are optional, and
belong in a separate environment, never in the project's dependencies)::

    python -m benchmarks.bench_throughput --instructions   # the figures of the docs' page
    python -m benchmarks.bench_throughput --in-process
    python -m benchmarks.bench_throughput [--seconds 2] [--rounds 9] [--connections 16]

Every variant (see VARIANTS) is the same app with one helper, each under its own path
(``/<variant>/t``) of **one** uvicorn process (one worker, 127.0.0.1, access log off), so that
every variant runs in the same interpreter and memory layout. Three methods:

- ``--instructions`` (the one statistic the docs quote): the server runs under valgrind's
  callgrind (Debian package ``valgrind``); for each variant its instruction counter is zeroed,
  ``--requests`` (default 200) GETs are sent over ``--connections`` keep-alive connections and
  all answered, and the counter is read: the server's whole work per request (HTTP parsing,
  the application, writing the response). The ratio is the bare app's instructions per
  request divided by the variant's (at equal instructions per cycle, its throughput ratio),
  the median over ``--rounds`` (at most 3) interleaved rounds. Instruction counts do not
  depend on what else the machine does: reruns agree to about 0.5 %.
- ``--in-process``: no server; each request is an ASGI call with a scripted
  ``receive``/``send``, timed in CPU seconds of this process, ``--requests`` (default 3000)
  per variant per round; the ratio of the least CPU time per request over ``--rounds``
  interleaved rounds. It leaves out the server's own work, so its ratios are lower bounds.
- by default: ``wrk`` (Debian package ``wrk``) loads one variant at a time for ``--seconds``,
  every variant once per round in a fresh random order; the ratio of requests per server CPU
  second (``--statistic wall``: per second) to the bare app's in the same round, the median
  over the rounds, with the lowest and highest as the spread. On a shared 2-core machine
  the spread is wide (±20 %): for scale, not for comparing close variants.

Install the peers for a comparison run, e.g. ``uv venv -p 3.13 .venv-bench && uv pip install
-p .venv-bench -e '.[fastapi]' uvicorn fastapi-disconnect==0.4.0 aiofence==0.5.0``.
"""

# No "from __future__ import annotations": FastAPI resolves the routes' annotations at run time.

import argparse
import glob
import http.client
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Annotated, Any, NamedTuple

VARIANTS = {
    "none": "the bare app",
    "cancelkit": "CancelOnDisconnect, every route guarded (interrupt mode)",
    "cancelkit-signal": "CancelOnDisconnect, every route guarded (signal mode)",
    "cancelkit-unused": "CancelOnDisconnect installed, route not guarded",
    "cancelkit-token": "CancelOnDisconnect + a RequestToken dependency on the route",
    "cancelkit-current": "CancelOnDisconnect + current_token() in the route",
    "cancelkit-expired": "CancelOnDisconnect(timeout=1 ns): every request a cancellation (504)",
    "fastapi-dep": "reference: any async FastAPI dependency (request: Request), no helper",
    "fastapi-disconnect": "@cancel_on_disconnect on the route",
    "fastapi-disconnect-mw": "CancelOnDisconnectMiddleware",
    "fastapi-disconnect-dep": "a Disconnected dependency on the route",
    "aiofence": "aiofence DisconnectMiddleware + move_on_cancel in the route",
    "aiofence-dep": "aiofence DisconnectMiddleware + a DisconnectEvent dependency on the route",
}


def make_app(variant: str, path: str = "/t") -> Any:
    """Build the app of ``variant`` (a key of VARIANTS), its route at ``path``."""
    from fastapi import FastAPI

    api = FastAPI()
    if variant == "fastapi-disconnect":
        from fastapi_disconnect import cancel_on_disconnect

        @api.get(path)
        @cancel_on_disconnect
        async def guarded() -> dict[str, bool]:
            return {"ok": True}

    elif variant == "fastapi-disconnect-dep":
        from fastapi_disconnect import Disconnected

        @api.get(path)
        async def with_event(disconnected: Disconnected) -> dict[str, bool]:
            return {"ok": not disconnected.is_set()}

    elif variant == "aiofence":
        from aiofence import get_current_fencing

        @api.get(path)
        async def fenced() -> dict[str, bool]:
            with get_current_fencing().move_on_cancel():
                return {"ok": True}

    elif variant == "aiofence-dep":
        from aiofence.contrib.fastapi import DisconnectEvent

        @api.get(path)
        async def with_fence_event(disconnected: DisconnectEvent) -> dict[str, bool]:
            return {"ok": not disconnected.is_set()}

    elif variant == "fastapi-dep":
        from fastapi import Depends, Request

        async def dependency(request: Request) -> object:
            return request.scope.get("state")

        @api.get(path)
        async def with_dependency(
            value: Annotated[object, Depends(dependency)],
        ) -> dict[str, bool]:
            return {"ok": value is not None}

    elif variant == "cancelkit-current":
        from cancelkit import current_token

        @api.get(path)
        async def with_current() -> dict[str, bool]:
            token = current_token()
            return {"ok": token is not None and not token.cancelled}

    elif variant == "cancelkit-token":
        from cancelkit.fastapi import RequestToken

        @api.get(path)
        async def with_token(token: RequestToken) -> dict[str, bool]:
            return {"ok": not token.cancelled}

    else:

        @api.get(path)
        async def plain() -> dict[str, bool]:
            return {"ok": True}

    if variant in ("none", "fastapi-dep", "fastapi-disconnect", "fastapi-disconnect-dep"):
        return api
    if variant.startswith("cancelkit"):
        from cancelkit import CancelOnDisconnect

        if variant == "cancelkit-unused":
            return CancelOnDisconnect(api, include=["/work"])
        if variant == "cancelkit-expired":  # its deadline passed on arrival: 504, one event
            return CancelOnDisconnect(api, timeout=1e-9)
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


def served_app() -> Any:
    """Every variant of $BENCH_VARIANTS in one app, each under ``/<variant>/t`` (uvicorn --factory).

    One process serves them all, so every variant runs in the same interpreter and memory
    layout. The dispatch by the path's first segment is the same for every variant.
    """
    apps = {v: make_app(v, f"/{v}/t") for v in os.environ["BENCH_VARIANTS"].split(",")}

    async def dispatch(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await apps[scope["path"].split("/", 2)[1]](scope, receive, send)

    otel = os.environ.get("BENCH_OTEL")
    if not otel:
        return dispatch
    return traced(dispatch, listen=otel == "listen")


def traced(app: Any, listen: bool) -> Any:
    """``app`` in OpenTelemetry's ASGI middleware on the SDK (every span recorded, then
    dropped by a no-op exporter); with ``listen``, cancelkit.otel.instrument() too."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    from cancelkit.otel import instrument

    class Dropped(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(Dropped()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    if listen:
        instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    return OpenTelemetryMiddleware(
        app, tracer_provider=tracer_provider, meter_provider=meter_provider
    )


def start_server(
    variants: list[str], wrapper: tuple[str, ...] = (), cwd: str | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """Start uvicorn serving ``variants`` (see served_app), under ``wrapper`` if given."""
    port = free_port()
    env = {**os.environ, "BENCH_VARIANTS": ",".join(variants), "PYTHONPATH": os.getcwd()}
    server = subprocess.Popen(
        [
            *wrapper,
            *[
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "benchmarks.bench_throughput:served_app",
            ],
            *["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            *["--log-level", "warning", "--no-access-log"],
        ],
        env=env,
        cwd=cwd,
    )
    deadline = time.monotonic() + 120  # a shared machine (or valgrind) can be slow to import
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("the server did not start") from None
            time.sleep(0.05)
        else:
            return server, port


def stop(server: subprocess.Popen[bytes], grace: float) -> None:
    """Stop the server as Ctrl+C would; kill it if it is not gone within ``grace`` seconds."""
    server.send_signal(signal.SIGINT)
    try:
        server.wait(grace)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


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


class Client:
    """``connections`` keep-alive HTTP connections to one server, used from as many threads."""

    def __init__(self, port: int, connections: int) -> None:
        self.connections = [
            http.client.HTTPConnection("127.0.0.1", port, timeout=300) for _ in range(connections)
        ]

    def burst(self, path: str, requests: int) -> None:
        """Send ``requests`` GETs of ``path`` over the connections; return once all are answered."""

        expected = 504 if path.startswith("/cancelkit-expired/") else 200

        def send(connection: http.client.HTTPConnection, count: int) -> None:
            for _ in range(count):
                connection.request("GET", path)
                response = connection.getresponse()
                response.read()
                if response.status != expected:
                    raise RuntimeError(f"{path}: status {response.status}")

        count = len(self.connections)
        threads = [
            threading.Thread(target=send, args=(c, requests // count + (i < requests % count)))
            for i, c in enumerate(self.connections)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def instructions(variants: list[str], rounds: int, requests: int, connections: int) -> Any:
    """Each variant's instructions per request in the server process, one figure per round.

    The server runs under valgrind's callgrind; its counters are zeroed before and read after
    each burst of ``requests`` (all answered in between), so each figure is the server's whole
    work for those requests: HTTP parsing, the application, the writing of the response.
    """
    control = shutil.which("callgrind_control")
    if control is None:
        sys.exit("valgrind is needed for --instructions: apt-get install -y valgrind")
    with tempfile.TemporaryDirectory() as out:
        valgrind = (
            "valgrind",
            "-q",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}/cg",
        )
        server, port = start_server(variants, valgrind, cwd=out)
        try:
            pid = str(server.pid)
            client = Client(port, connections)
            for variant in variants:  # warm up, not yet counted (and 50 times faster)
                client.burst(f"/{variant}/t", requests)
            subprocess.run([control, "--instr=on", pid], capture_output=True, check=True)
            counts: dict[str, list[float]] = {v: [] for v in variants}
            for round_ in range(rounds):
                for variant in random.sample(variants, len(variants)):
                    subprocess.run([control, "--zero", pid], capture_output=True, check=True)
                    client.burst(f"/{variant}/t", requests)
                    subprocess.run([control, "--dump", pid], capture_output=True, check=True)
                    dump = max(glob.glob(f"{out}/cg*"), key=os.path.getmtime)
                    with open(dump) as file:
                        total = re.search(r"^(?:summary|totals): (\d+)", file.read(), re.M)
                    assert total is not None, dump
                    counts[variant].append(int(total.group(1)) / requests)
                    os.remove(dump)
                print(f"round {round_ + 1}/{rounds} done", flush=True)
        finally:
            stop(server, 60)
    return counts


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
        apps[variant] = make_app(variant)

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
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count the server's instructions per request under valgrind (reproducible)",
    )
    parser.add_argument(
        "--requests", type=int, help="per variant per round (default 3000 in-process, 200 counted)"
    )
    parser.add_argument(
        "--otel",
        action="store_true",
        help="with --instructions: each variant without OpenTelemetry, in its ASGI "
        "middleware on the SDK, and the same with cancelkit.otel.instrument() (three servers)",
    )
    args = parser.parse_args()
    if args.instructions and args.otel:
        chosen = [v for v in args.variants if v.startswith("cancelkit") or v == "none"]
        requests, rounds = args.requests or 200, min(args.rounds, 3)
        runs = {}
        for otel in ("", "asgi", "listen"):  # three servers, one after the other
            os.environ["BENCH_OTEL"] = otel
            runs[otel] = {
                v: statistics.median(c)
                for v, c in instructions(chosen, rounds, requests, args.connections).items()
            }
        print(
            f"\nuvicorn under callgrind, Python {sys.version.split()[0]}: instructions per "
            f"request, medians of {rounds} rounds of {requests}: without OpenTelemetry; in "
            "its ASGI middleware on the SDK (spans recorded); the same + "
            "cancelkit.otel.instrument(). ratio: the bare app's / the variant's, same server"
        )
        print(f"{'variant':20} {'no otel':>9} {'asgi':>9} {'+listen':>9} {'added':>8} ratios")
        for variant in chosen:
            a, b, c = (runs[otel][variant] for otel in ("", "asgi", "listen"))
            shown = " ".join(
                f"{runs[otel]['none'] / runs[otel][variant]:.3f}" for otel in ("", "asgi", "listen")
            )
            print(
                f"{variant:20} {a / 1e3:7.0f} k {b / 1e3:7.0f} k {c / 1e3:7.0f} k "
                f"{(c - b) / 1e3:+6.1f} k {shown}"
            )
        return
    if args.instructions:
        chosen = [v for v in args.variants if v == "none" or available(v)]
        if "none" not in chosen:
            chosen.insert(0, "none")
        requests = args.requests or 200
        rounds = min(args.rounds, 3)
        counts = instructions(chosen, rounds, requests, args.connections)
        base = statistics.median(counts["none"])
        print(
            f"\nuvicorn under callgrind, Python {sys.version.split()[0]}, {args.connections} "
            f"connections, {rounds} rounds of {requests} requests per variant; the bare app: "
            f"{base / 1e3:.0f} k instructions per request (the server's whole work)"
        )
        print("ratio: the bare app's instructions per request / the variant's (medians)")
        print(f"{'variant':24} {'ratio':>6} {'added':>8} {'rounds':>12}  what")
        for variant in chosen[1:]:
            mine = statistics.median(counts[variant])
            spread = [base / c for c in counts[variant]]
            print(
                f"{variant:24} {base / mine:6.3f} {(mine - base) / 1e3:6.0f} k "
                f"{min(spread):5.3f}-{max(spread):5.3f}  {VARIANTS[variant]}"
            )
        return
    if args.in_process:
        chosen = [v for v in args.variants if v == "none" or available(v)]
        if "none" not in chosen:
            chosen.insert(0, "none")
        costs = in_process(chosen, args.rounds, args.requests or 3000)
        base = min(costs["none"])
        print(
            f"\nin-process ASGI calls, Python {sys.version.split()[0]}, {args.rounds} interleaved "
            f"rounds of {args.requests or 3000} requests per variant; the bare app: "
            f"{base * 1e6:.1f} µs CPU per request"
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
    server, port = start_server(variants)
    urls = {v: f"http://127.0.0.1:{port}/{v}/t" for v in variants}
    try:
        for variant in variants:
            load(server, urls[variant], 1, 4)  # warm up
        rps: dict[str, list[float]] = {v: [] for v in variants}
        ratios: dict[str, list[float]] = {v: [] for v in variants}
        for round_ in range(args.rounds):
            # Each round loads every variant once, in a fresh random order, and compares it
            # with the bare app of the same round: drift of a shared machine cancels out.
            order = random.sample(variants, len(variants))
            loads = {v: load(server, urls[v], args.seconds, args.connections) for v in order}
            measured = {
                v: x.per_cpu_second if args.statistic == "cpu" else x.per_second
                for v, x in loads.items()
            }
            for variant, value in measured.items():
                rps[variant].append(loads[variant].per_second)
                ratios[variant].append(value / measured["none"])
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    finally:
        stop(server, 10)
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
