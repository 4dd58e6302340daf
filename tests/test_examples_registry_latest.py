from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def run(name: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES.parent.parent)}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_registry_example() -> None:
    """The registry how-to example cancels by id, is owner-scoped, and pre-cancels."""
    out = run("registry_example.py")
    assert "bob cancels report-1: not_found" in out
    assert "alice cancels report-1: cancelled" in out
    assert "report-2 -> stopped (requested" in out
    assert "cancel report-2 again: not_found" in out


@pytest.mark.parametrize("expected", ["'c': superseded", "'cancel': finished", "'trio': finished"])
def test_latest_example(expected: str) -> None:
    """The latest-only how-to example lets only the newest search of a user finish."""
    assert expected in run("latest_example.py")
