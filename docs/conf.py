"""Sphinx configuration for cancelkit (built with ``-W -n``: warnings are errors, nitpicky)."""

from __future__ import annotations

import builtins
import logging
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version

project = "cancelkit"
author = "cancelkit developers"
copyright = "2026, cancelkit developers"
try:
    release = _dist_version("cancelkit")
except PackageNotFoundError:  # pragma: no cover - docs are built with the package installed
    release = "0.0.0"
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "examples", "Thumbs.db", ".DS_Store"]

# -- MyST -------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# -- autodoc / napoleon -----------------------------------------------------
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # "Attributes:" sections as fields, not duplicate attribute entries

# -- nitpicky references ----------------------------------------------------
# There is no intersphinx (no network to fetch inventories), so references to the
# standard library, builtins and third-party packages cannot resolve: ignore them
# narrowly. References to cancelkit's own objects must still resolve.
_EXTERNAL = "|".join(
    [
        r"anyio(\..*)?",
        r"trio(\..*)?",
        r"_?asyncio(\..*)?",
        r"_?thread.*",
        r"collections\.abc\..*",
        r"typing(_extensions)?\..*",
        r"types\..*",
        r"contextvars\..*",
        r"concurrent\..*",
        r"starlette(\..*)?",
        r"fastapi(\..*)?",
        r"coredis(\..*)?",
        r"httpx(\..*)?",
        r"opentelemetry(\..*)?",
        r"datetime\..*",
        r"enum\..*",
        r"dataclasses\..*",
        r"logging\..*",
        r"weakref\..*",
        r"time\..*",
        r"re\..*",
        r"contextlib\..*",
        r"math\..*",
        r"secrets\..*",
        r"os\..*",
        r"ExceptionGroup",
        r"BaseExceptionGroup",
        r".*CancelledError",
        r"Cancelled",
    ]
)
_BUILTINS = "|".join(sorted(name for name in dir(builtins) if not name.startswith("_")))
_ROLES = r"py:(class|obj|exc|data|func|meth|attr|mod)"
nitpick_ignore_regex = [
    (_ROLES, rf"({_EXTERNAL})"),
    (_ROLES, rf"(builtins\.)?({_BUILTINS})"),
    # Type variables / ParamSpecs (``T``, ``T_co``, ``ResultT``, ``P.args``...) and pseudo-names.
    (_ROLES, r"(None|Ellipsis|\.\.\.)"),
    (
        _ROLES,
        r"(cancelkit\.)?(_\w+\.)?_?(T|K|V|P|R|T_co|T_contra|[A-Z][A-Za-z]*T|T[A-Z_]\w*)(\.args|\.kwargs)?",
    ),
]

# -- HTML -------------------------------------------------------------------
html_theme = "furo"
html_title = "cancelkit"


# -- quiet builds -----------------------------------------------------------
class _NoMystConfigDump(logging.Filter):
    """Drop myst-parser's info line that prints its whole configuration on every build."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("myst v", "\x1b[01mmyst v"))


logging.getLogger("sphinx.myst_parser.sphinx_ext.main").addFilter(_NoMystConfigDump())
