"""The disconnect example in the docs runs and shows what it claims."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "disconnect_example.py"


def test_disconnect_example_runs() -> None:
    """The example exits 0 after showing the handler stopped for a client disconnect."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == [
        "handler started; the client closes the connection",
        "handler stopped: client_disconnected",
    ]
    assert "disconnects=1, interrupted=1" in lines[2]
    assert '"GET /report" 499 client disconnected' in result.stderr
    assert "Traceback" not in result.stderr
