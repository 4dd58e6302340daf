"""The programs some tests need that pip cannot install: redis-server, Chromium, PostgreSQL.

``python -m nox`` provisions them (see ``noxfile.py``; PostgreSQL is the ``postgresql`` Debian
package) and passes their paths in ``CANCELKIT_REDIS_SERVER``, ``CANCELKIT_CHROMIUM`` and
``CANCELKIT_PG_CTL`` (``pg_ctl``; ``initdb`` and ``postgres`` sit beside it, see
``tests/postgres.py``).
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def program(variable: str, name: str) -> str | None:
    """The program the tests should run: ``$variable`` when set (nox sets it), else ``name``.

    The ``tests`` nox sessions provision the program and pass its absolute path; an empty
    value means it could not be provisioned. Run directly, pytest looks ``name`` up on PATH.
    """
    explicit = os.environ.get(variable)
    if explicit is not None:
        return shutil.which(explicit) if explicit else None
    return shutil.which(name)


def unavailable(reason: str) -> NoReturn:
    """Skip on a developer's machine; fail under CI=true, where nothing may be skipped."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI must provision it: see noxfile.py)")
    pytest.skip(reason)
