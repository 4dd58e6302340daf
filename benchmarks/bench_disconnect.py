"""Client disconnect -> handler cancelled: latency on uvicorn (asyncio) and hypercorn (trio).

Run from the repository root (peers need Python >= 3.12; they are optional)::

    python -m benchmarks.bench_disconnect [--trials 40]

Each trial opens a raw socket to a server on 127.0.0.1, sends ``GET /work``, waits until the
FastAPI handler has started, notes the time, closes the socket, and waits (bounded) until the
handler has stopped; the handler notes the time in its ``finally``. Median and p95 per
variant, all measured in the same run:

* ``cancelkit``: ``CancelOnDisconnect(app)``, interrupt mode, handler awaits forever;
* ``polling``: ``while not await request.is_disconnected(): await anyio.sleep(0.1)``;
* ``fastapi-disconnect``: its ``@cancel_on_disconnect`` decorator;
* ``aiofence``: its ``DisconnectMiddleware`` with ``move_on_cancel()`` in the handler.
"""

from __future__ import annotations

import argparse
import math
import socket
import statistics
import sys
import time
from typing import Any

import anyio
from fastapi import FastAPI, Request

TIMEOUT = 3.0


class State:
    def __init__(self) -> None:
        self.started = anyio.Event()
        self.ended = anyio.Event()
        self.ended_at = math.nan


state = State()


def ended() -> None:
    state.ended_at = time.perf_counter()
    state.ended.set()


def make_app(variant: str) -> Any:
    api = FastAPI()
    if variant == "cancelkit":
        from cancelkit import CancelOnDisconnect

        @api.get("/work")
        async def work() -> None:
            state.started.set()
            try:
                await anyio.sleep_forever()
            finally:
                ended()

        return CancelOnDisconnect(api)
    if variant == "polling":

        @api.get("/work")
        async def poll(request: Request) -> None:
            state.started.set()
            while not await request.is_disconnected():  # noqa: ASYNC110 (the idiom measured)
                await anyio.sleep(0.1)
            ended()

        return api
    if variant == "fastapi-disconnect":
        from fastapi_disconnect import cancel_on_disconnect

        @api.get("/work")
        @cancel_on_disconnect
        async def guarded() -> None:
            state.started.set()
            try:
                await anyio.sleep_forever()
            finally:
                ended()

        return api
    from aiofence import get_current_fencing
    from aiofence.contrib.starlette.middleware import DisconnectMiddleware

    @api.get("/work")
    async def fenced() -> None:
        state.started.set()
        try:
            with get_current_fencing().move_on_cancel():
                await anyio.sleep_forever()
        finally:
            ended()

    return DisconnectMiddleware(api)


async def measure(server: str, variant: str, trials: int) -> list[float] | str:
    app = make_app(variant)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    stop = anyio.Event()
    latencies: list[float] = []
    error = ""
    async with anyio.create_task_group() as tg:
        if server == "uvicorn":
            import uvicorn

            userver = uvicorn.Server(
                uvicorn.Config(app, log_level="critical", access_log=False, lifespan="off")
            )

            async def run_uvicorn() -> None:
                await userver.serve([sock])

            async def stop_uvicorn() -> None:
                await stop.wait()
                userver.should_exit = True

            tg.start_soon(run_uvicorn)
            tg.start_soon(stop_uvicorn)
        else:
            import os

            from hypercorn.config import Config
            from hypercorn.trio import serve

            config = Config()
            config.bind = [f"fd://{os.dup(sock.fileno())}"]
            config.accesslog = config.errorlog = None
            config.graceful_timeout = 0.5
            tg.start_soon(lambda: serve(app, config, shutdown_trigger=stop.wait))
        try:
            for _ in range(trials):
                global state
                state = State()
                stream = await anyio.connect_tcp("127.0.0.1", port)
                await stream.send(b"GET /work HTTP/1.1\r\nHost: bench\r\n\r\n")
                with anyio.move_on_after(TIMEOUT) as started:
                    await state.started.wait()
                if started.cancelled_caught:
                    error = "handler never started (the request failed)"
                    await stream.aclose()
                    break
                await anyio.sleep(0.005)  # let the handler settle into its await
                t0 = time.perf_counter()
                await stream.aclose()
                with anyio.move_on_after(TIMEOUT) as cancelled:
                    await state.ended.wait()
                if cancelled.cancelled_caught:
                    error = f"handler not stopped within {TIMEOUT:g}s of the disconnect"
                    break
                latencies.append(state.ended_at - t0)
        finally:
            stop.set()
    sock.close()
    return error or latencies


def available(variant: str) -> bool:
    module = {"fastapi-disconnect": "fastapi_disconnect", "aiofence": "aiofence"}.get(variant)
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=40)
    args = parser.parse_args()
    variants = ["cancelkit", "polling", "fastapi-disconnect", "aiofence"]
    print(f"Python {sys.version.split()[0]}, {args.trials} trials per row, loopback")
    print(f"{'server':18} {'variant':20} {'median ms':>10} {'p95 ms':>8}")
    for server, backend in (("uvicorn", "asyncio"), ("hypercorn+trio", "trio")):
        for variant in variants:
            if not available(variant):
                print(f"{server:18} {variant:20} not installed in this environment")
                continue
            try:
                result = anyio.run(
                    measure, server.split("+")[0], variant, args.trials, backend=backend
                )
            except Exception as exc:  # a peer that cannot run on this backend
                while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
                    exc = exc.exceptions[0]
                result = f"fails: {type(exc).__name__}: {exc}"[:90]
            if isinstance(result, str):
                print(f"{server:18} {variant:20} {result}")
                continue
            ms = sorted(x * 1000 for x in result)
            p95 = ms[min(len(ms) - 1, math.ceil(0.95 * len(ms)) - 1)]
            print(f"{server:18} {variant:20} {statistics.median(ms):10.3f} {p95:8.3f}")


if __name__ == "__main__":
    main()
