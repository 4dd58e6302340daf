"""Run every benchmark module (``benchmarks/bench_*.py``), or those named on the command line.

Usage: ``python -m benchmarks [token registry ...] [--option ...]``; options (arguments that
start with ``-``, with the value that follows one unless it names a benchmark) go to every
module named, e.g. ``python -m benchmarks redis --race-only --spinners 2``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time

import benchmarks


def main(argv: list[str]) -> int:
    names = sorted(
        info.name.removeprefix("bench_")
        for info in pkgutil.iter_modules(benchmarks.__path__)
        if info.name.startswith("bench_")
    )
    options: list[str] = []
    chosen: list[str] = []
    for i, arg in enumerate(argv):
        after_option = i > 0 and argv[i - 1].startswith("-") and "=" not in argv[i - 1]
        if arg.startswith("-") or (after_option and arg not in names):  # "--spinners 2"
            options.append(arg)
        else:
            chosen.append(arg)
    chosen = chosen or names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(names)}")
        return 2
    for name in chosen:
        started = time.perf_counter()
        print(f"\n=== {name} ===", flush=True)
        sys.argv = [f"benchmarks.bench_{name}", *options]  # each module reads its own
        try:
            importlib.import_module(f"benchmarks.bench_{name}").main()
        except SystemExit as exc:  # e.g. a load generator that is not installed
            print(f"({name} did not run: {exc})")
        print(f"({name}: {time.perf_counter() - started:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
