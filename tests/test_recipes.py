"""The recipe pages' examples (docs/examples), run against real uvicorn servers on 127.0.0.1."""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_docs_blocks import assert_shows

EXAMPLES = Path(__file__).parent.parent / "docs" / "examples"
LIMIT = 30.0  # seconds: the most any wait here may take


class Uvicorn:
    """``python -m uvicorn --app-dir docs/examples MODULE:app`` on an inherited socket."""

    def __init__(self, target: str, *args: str) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        fd = self.sock.fileno()
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "uvicorn", "--app-dir", str(EXAMPLES)),
                *("--fd", str(fd), *args, target),
            ],
            pass_fds=[fd],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put(line.rstrip("\n"))

    def wait_for_line(self, needle: str) -> str:
        """Read the server's stderr until a line contains ``needle`` (bounded by LIMIT)."""
        deadline = time.monotonic() + LIMIT
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {needle!r} in the server's output: {self.seen}"
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(line)
            if needle in line:
                return line

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(LIMIT)
        finally:
            if self.process.poll() is None:  # pragma: no cover - only if terminate hangs
                self.process.kill()
                self.process.wait(LIMIT)
            self.reader.join(LIMIT)
            assert self.process.stderr is not None
            self.process.stderr.close()
            self.sock.close()


@pytest.fixture
def uvicorn_logging() -> Iterator[Uvicorn]:
    server = Uvicorn("fastapi_logging:app")
    try:
        server.wait_for_line("Uvicorn running")
        yield server
    finally:
        server.close()


def test_plain_uvicorn_shows_the_499_line_with_the_documented_logging_setup(
    uvicorn_logging: Uvicorn,
) -> None:
    """Under a plain ``uvicorn app:app``, the docs' logging setup makes the 499 line appear."""
    with socket.create_connection(("127.0.0.1", uvicorn_logging.port), timeout=LIMIT) as client:
        client.sendall(b"GET /report HTTP/1.1\r\nHost: docs\r\n\r\n")
    line = uvicorn_logging.wait_for_line('"GET /report" 499 client disconnected')
    assert_shows("fastapi_logging.py", [line], varying=r"(?<=127\.0\.0\.1:)\d+")


def run_example(name: str) -> str:
    """Run docs/examples/<name> as a script (it serves on 127.0.0.1); return its output."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=LIMIT * 2,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # no traceback, no error line
    return result.stdout


def test_token_stream_stops_on_new_prompt_stop_and_leaving_and_ends_cleanly() -> None:
    """The streaming recipe on a real uvicorn: a new prompt supersedes the streaming answer,
    Stop cancels one by id, a closed connection stops one; each stream the client still
    reads ends with a final `end` event (a clean end, not a cut connection)."""
    assert_shows("streaming_llm.py", run_example("streaming_llm.py").splitlines())


def test_websocket_message_supersedes_the_previous_work_and_closing_stops_it() -> None:
    """The WebSocket recipe on a real uvicorn: a newer message supersedes the previous one's
    work (the client is told), closing the connection stops what runs."""
    assert_shows("websocket_latest.py", run_example("websocket_latest.py").splitlines())
