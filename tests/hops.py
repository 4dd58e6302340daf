"""Start the three-service chain of tests/hops_app.py as real server processes.

For test_hops.py and benchmarks/bench_hops.py: each hop is a uvicorn process (asyncio) or a
hypercorn process on trio, on 127.0.0.1, told its name, the next hop's URL and its mode.
Also :func:`current`: a token current the way signal mode makes it (no scope of its own).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from cancelkit import CancellationToken
from cancelkit._frames import current as current_frame
from cancelkit._frames import interrupt_frame

ROOT = Path(__file__).parent.parent
START_LIMIT = 60.0  # seconds the processes get to start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def command(server: str, port: int) -> list[str]:
    """The command that serves the hop app: ``uvicorn`` or ``hypercorn-trio``."""
    if server == "uvicorn":
        return [
            *(sys.executable, "-m", "uvicorn", "tests.hops_app:asgi"),
            *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"),
        ]
    return [
        *(sys.executable, "-m", "hypercorn", "-k", "trio"),
        *("-b", f"127.0.0.1:{port}", "--graceful-timeout", "5", "tests.hops_app:asgi"),
    ]


@contextmanager
def chain(
    hops: Mapping[str, tuple[str, str]], env: Mapping[str, str] | None = None
) -> Iterator[dict[str, str]]:
    """Serve ``{name: (server, mode)}`` in that order, each calling the next; yield the URLs.

    Stopped with SIGINT on exit; a traceback in a hop's stderr fails the exit.
    """
    names = list(hops)
    ports = {name: free_port() for name in names}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    following = dict(zip(names, [urls[name] for name in names[1:]] + [""], strict=True))
    processes = {
        name: subprocess.Popen(
            command(server, ports[name]),
            cwd=ROOT,
            env={
                **os.environ,
                **(env or {}),
                "HOP_NAME": name,
                "HOP_NEXT": following[name],
                "HOP_MODE": mode,
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name, (server, mode) in hops.items()
    }
    try:
        deadline = time.monotonic() + START_LIMIT
        for name, url in urls.items():
            while True:
                assert processes[name].poll() is None, processes[name].communicate()
                try:
                    httpx.get(f"{url}/counts", timeout=5).raise_for_status()
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, f"hop {name} never started"
                    time.sleep(0.05)  # the process is still starting
        yield urls
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGINT)
        for name, process in processes.items():
            _, stderr = process.communicate(timeout=30)
            assert b"Traceback" not in stderr, f"hop {name}: {stderr.decode()}"


@contextmanager
def current(token: CancellationToken) -> Iterator[None]:
    """Make ``token`` the current one without interrupting anything, as signal mode does: an
    outgoing call is then stopped by the transport's own abort, not by a scope around it."""
    frame = interrupt_frame(token, None)
    reset = current_frame.set(frame)
    try:
        yield
    finally:
        frame.exit()
        current_frame.reset(reset)
