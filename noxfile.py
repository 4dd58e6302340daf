"""Nox sessions: tests on 3.11-3.13, coverage, lint, typecheck, docs, example, demo, bench."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
PYTHONS = ["3.11", "3.12", "3.13"]
EXTRAS = "-e.[fastapi,redis]"

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["lint", "typecheck", "tests", "coverage", "docs"]
nox.options.error_on_missing_interpreters = True


def _works(executable: str | None, version: str) -> bool:
    """Return True if ``executable`` runs and is Python ``version``."""
    if executable is None:
        return False
    check = f"import sys; sys.exit(sys.version.startswith('{version}.') is False)"
    try:
        result = subprocess.run(
            [executable, "-c", check], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def _make_interpreters_findable() -> None:
    """Put real pyenv interpreter dirs on PATH when ``pythonX.Y`` is missing or a broken shim.

    pyenv shims exist for every installed version but fail unless that version is selected
    (``pyenv global``), so ``shutil.which`` alone is not enough: the candidate is run.
    """
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    for version in PYTHONS:
        if _works(shutil.which(f"python{version}"), version):
            continue
        candidates = sorted(
            glob.glob(str(pyenv_root / "versions" / f"{version}.*" / "bin")),
            key=lambda p: [int(x) if x.isdigit() else -1 for x in Path(p).parent.name.split(".")],
            reverse=True,
        )
        for bindir in candidates:
            if _works(str(Path(bindir) / f"python{version}"), version):
                os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
                break


_make_interpreters_findable()


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Run the test suite under coverage; data files land in the project root."""
    session.install(EXTRAS, *nox.project.dependency_groups(PYPROJECT, "test"))
    env = {"COVERAGE_FILE": str(ROOT / ".coverage")}
    if "CI" in os.environ:
        env["CI"] = os.environ["CI"]
    session.run("coverage", "run", "-m", "pytest", *session.posargs, env=env)


@nox.session(python="3.11")
def coverage(session: nox.Session) -> None:
    """Combine the data of every tests session, report (fail_under from config), then erase."""
    session.install("coverage[toml]>=7.5")
    env = {"COVERAGE_FILE": str(ROOT / ".coverage")}
    session.run("coverage", "combine", env=env)
    try:
        session.run("coverage", "report", env=env)
    finally:
        session.run("coverage", "erase", env=env)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """Ruff lint and format check."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy --strict over cancelkit and tests (configured in pyproject.toml)."""
    session.install(EXTRAS, *nox.project.dependency_groups(PYPROJECT, "typecheck"))
    session.run("mypy", *session.posargs)


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """Build the Sphinx docs with warnings as errors and nitpicky references."""
    session.install(EXTRAS, *nox.project.dependency_groups(PYPROJECT, "docs"))
    session.run(
        "sphinx-build", "-W", "-n", "--keep-going", "-b", "html", "docs", "docs/_build/html"
    )


@nox.session(python="3.11")
def example(session: nox.Session) -> None:
    """Run the quickstart example."""
    session.install("-e.")
    session.run("python", "docs/examples/quickstart.py", *session.posargs)


@nox.session(python="3.11")
def demo(session: nox.Session) -> None:
    """Serve the demo app (a search box) and print its address; Ctrl+C stops it."""
    session.install("-e.[fastapi,redis]", "uvicorn")
    session.run("python", "-m", "demo", *session.posargs)


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Run the benchmarks (not part of the default sessions)."""
    session.install(EXTRAS, *nox.project.dependency_groups(PYPROJECT, "test"))
    session.run("python", "-m", "benchmarks", *session.posargs)
