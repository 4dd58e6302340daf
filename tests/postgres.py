"""A real PostgreSQL server for the tests: ``initdb`` + ``pg_ctl`` on a free loopback port.

Postgres refuses to run as root, and CI runs as root: then the server runs as a dedicated system
user (``cancelkit-pg``, created with ``useradd --system`` when missing) in a temporary directory
it owns; as any other user it runs as that user. ``CANCELKIT_PG_CTL`` names ``pg_ctl`` (``initdb``
and ``postgres`` sit beside it); without it ``pg_ctl`` is looked up on PATH and then in Debian's
``/usr/lib/postgresql/<version>/bin``. ``python -m nox`` installs the ``postgresql`` package when
it is missing (see ``noxfile.py``); under ``CI=true`` a missing server fails instead of skipping.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.programs import program, unavailable

#: The unprivileged user the server runs as when the tests run as root.
SYSTEM_USER = "cancelkit-pg"

#: Settings for a throwaway server: nothing is durable, everything is quick.
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "100",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
    "logging_collector": "off",
}


def find_pg_ctl() -> str | None:
    """``$CANCELKIT_PG_CTL``, else ``pg_ctl`` on PATH, else the newest Debian install's."""
    found = program("CANCELKIT_PG_CTL", "pg_ctl")
    if found is not None or os.environ.get("CANCELKIT_PG_CTL"):
        return found
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    return candidates[-1] if candidates else None


def _run_as() -> tuple[int | None, int | None]:
    """(uid, gid) to run the server as: a system user when root, else (None, None)."""
    if os.geteuid() != 0:
        return None, None
    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SYSTEM_USER,
            ],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(SYSTEM_USER)
    return entry.pw_uid, entry.pw_gid


class PostgresServer:
    """A throwaway PostgreSQL server on 127.0.0.1 (superuser ``postgres``, trust auth)."""

    def __init__(self, pg_ctl: str) -> None:
        self.bindir = Path(pg_ctl).parent
        self.uid, self.gid = _run_as()
        # Not under pytest's tmp dir: that is private to the user running pytest (0700).
        self.directory = Path(tempfile.mkdtemp(prefix="cancelkit-pg-"))
        self.data = self.directory / "data"
        self.log = self.directory / "server.log"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port: int = sock.getsockname()[1]
        self.user = "postgres"
        self.database = "postgres"

    @property
    def dsn(self) -> str:
        """A libpq connection string (psycopg)."""
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={self.database}"

    @property
    def url(self) -> str:
        """A ``postgresql://`` URL (asyncpg, SQLAlchemy with a driver suffix added)."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *args: str, timeout: float = 60) -> None:
        result = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            user=self.uid,
            group=self.gid,
            extra_groups=[] if self.uid is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise RuntimeError(
                f"{args[0]} failed ({result.returncode}): {result.stdout}{result.stderr}{log}"
            )

    def start(self) -> None:
        if self.uid is not None:
            os.chown(self.directory, self.uid, self.gid if self.gid is not None else -1)
        self._run(
            "initdb",
            "--pgdata",
            str(self.data),
            "--username",
            self.user,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        )
        with (self.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(f"port = {self.port}\n")
            conf.writelines(f"{name} = {value}\n" for name, value in SETTINGS.items())
        self._run("pg_ctl", "--pgdata", str(self.data), "--log", str(self.log), "-w", "start")

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "--pgdata", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the session; skipped without one, except in CI where that fails."""
    pg_ctl = find_pg_ctl()
    if pg_ctl is None:
        unavailable(
            "PostgreSQL is not installed: apt-get install postgresql, or name pg_ctl with "
            "CANCELKIT_PG_CTL (`python -m nox` installs it when run as root)"
        )
    server = PostgresServer(pg_ctl)
    try:
        server.start()
        yield server
    finally:
        server.stop()


class OneShotProxy:
    """A TCP forwarder to the server that accepts one connection, then refuses all others.

    A driver sends its cancel request to the address it connected to: through this proxy the
    connection works, and the cancel request's new connection is refused.
    """

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        self.threads = [threading.Thread(target=self._accept_one, daemon=True)]
        self.threads[0].start()

    def _accept_one(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:  # closed before anyone connected
            return
        self.listener.close()  # from now on, connections to self.port are refused
        upstream = socket.create_connection(("127.0.0.1", self.target))
        self.sockets += [client, upstream]
        for source, sink in ((client, upstream), (upstream, client)):
            thread = threading.Thread(target=self._pump, args=(source, sink), daemon=True)
            self.threads.append(thread)
            thread.start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv()
            sock.close()
        for thread in self.threads:
            thread.join(10)
