"""Requests/second of a trivial FastAPI endpoint under uvicorn, as ratios to the bare app.

Run from the repository root (peers need Python >= 3.12, so use an environment that has
them; they are optional)::

    python -m benchmarks.bench_throughput [--seconds 4] [--rounds 3] [--connections 16]

Each variant is served by its own uvicorn process (one worker, 127.0.0.1, access log off),
all started up front, and loaded by ``wrk`` (Debian package ``wrk``) for a bounded time:
short rounds, every variant once per round in random order, each compared with the bare
app's figure from the same round; the table shows the median of those per-round ratios.
"""

from __future__ import annotations

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
from typing import Any

VARIANTS = {
    "none": "the bare app",
    "cancelkit": "CancelOnDisconnect, every route guarded (interrupt mode)",
    "cancelkit-signal": "CancelOnDisconnect, every route guarded (signal mode)",
    "cancelkit-unused": "CancelOnDisconnect installed, route not guarded",
    "fastapi-disconnect": "@cancel_on_disconnect on the route",
    "fastapi-disconnect-mw": "CancelOnDisconnectMiddleware",
    "aiofence": "aiofence DisconnectMiddleware + move_on_cancel in the route",
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

    elif variant == "aiofence":
        from aiofence import get_current_fencing

        @api.get("/t")
        async def fenced() -> dict[str, bool]:
            with get_current_fencing().move_on_cancel():
                return {"ok": True}

    else:

        @api.get("/t")
        async def plain() -> dict[str, bool]:
            return {"ok": True}

    if variant == "none" or variant == "fastapi-disconnect":
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
        variant.removesuffix("-mw"), "fastapi"
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
    deadline = time.monotonic() + 15
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


def load(url: str, seconds: int, connections: int) -> float:
    result = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "2s", url],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    )
    if "Non-2xx" in result.stdout or "Socket errors" in result.stdout:
        raise RuntimeError(f"{url}: errors under load:\n{result.stdout}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    assert match is not None, result.stdout
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
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
        for _, url in servers.values():
            load(url, 1, 4)  # warm up
        rps: dict[str, list[float]] = {v: [] for v in variants}
        ratios: dict[str, list[float]] = {v: [] for v in variants}
        for round_ in range(args.rounds):
            # Each round loads every variant once, in a fresh random order, and compares it
            # with the bare app of the same round: drift of a shared machine cancels out.
            order = random.sample(variants, len(variants))
            measured = {v: load(servers[v][1], args.seconds, args.connections) for v in order}
            for variant, value in measured.items():
                rps[variant].append(value)
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
        f"{args.rounds} interleaved rounds of {args.seconds}s; median of per-round ratios"
    )
    print(f"{'variant':24} {'req/s':>9} {'ratio':>6}  what")
    for variant in variants:
        print(
            f"{variant:24} {statistics.median(rps[variant]):9.0f} "
            f"{statistics.median(ratios[variant]):6.3f}  {VARIANTS[variant]}"
        )


if __name__ == "__main__":
    main()
