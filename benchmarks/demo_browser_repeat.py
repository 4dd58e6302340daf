"""Run the demo's browser typing tests 30 times in a row with both cores kept busy.

Not a test and not part of the default run: the issue asked for the count on a busy machine.
Two spinning processes keep both cores busy while pytest runs the typing tests (real uvicorn,
real headless Chromium) ``--times`` times each, and the script prints how many passed.

Run: ``python -m benchmarks.demo_browser_repeat [--times 30] [--spinners 2]``
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
TESTS = ("test_typing_fast_completes_only_the_last_search", "test_an_older_search_arriving_last")


def spin() -> None:  # pragma: no cover - runs in a child process until terminated
    while True:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--times", type=int, default=30)
    parser.add_argument("--spinners", type=int, default=2)
    options = parser.parse_args()
    spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(options.spinners)]
    for spinner in spinners:
        spinner.start()
    try:
        result = subprocess.run(
            [
                *(sys.executable, "-m", "pytest", "tests/test_demo_browser.py", "-q", "-rA"),
                *("-p", "no:cacheprovider", "-k", " or ".join(TESTS)),
            ],
            cwd=ROOT,
            env={**os.environ, "CANCELKIT_DEMO_REPEAT": str(options.times)},
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        for spinner in spinners:
            spinner.terminate()
            spinner.join()
    print(f"{options.spinners} spinning processes; each test {options.times} times:")
    for test in TESTS:
        passed = len(re.findall(rf"^PASSED \S*{test}\S*", result.stdout, re.MULTILINE))
        print(f"  {test}: {passed}/{options.times} passed")
    failures = re.findall(r"^FAILED .*$", result.stdout, re.MULTILINE)
    for line in failures:
        print(f"  {line}")
    print(result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr)


if __name__ == "__main__":
    main()
