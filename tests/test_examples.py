from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "docs" / "examples"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_quickstart_runs_and_shows_each_reason(backend: str) -> None:
    """The README's example runs on both backends and shows superseded, deadline and shutdown."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py"), backend],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    out = result.stdout
    assert "stopped: superseded: superseded by a newer request (source: search 'cat')" in out
    assert "stopped: deadline" in out
    assert "worker thread stopped: parent:" in out
    assert "shutdown: the application is shutting down" in out
    assert "results for" not in out
    assert result.stderr == ""


def test_naive_global_task_recipe_shows_every_failure() -> None:
    """The tutorial's 'before' example really shows the recipe's failures on a real server."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "naive_global_task.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    out = result.stdout
    assert "alice got HTTP 500" in out
    assert "bob got HTTP 200" in out
    assert "cleanup overlapped the new search: True" in out
    assert "['carol:c completed', 'carol:ca completed']" in out
