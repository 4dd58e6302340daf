"""The docs say only what exists: routes, names and status codes they quote; code that fits.

These read the Markdown sources and the example files they include (no docs build needed).
"""

from __future__ import annotations

import ast
import builtins
import inspect
import re
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

import cancelkit
import cancelkit.backends
import cancelkit.fastapi
import cancelkit.redis

DOCS = Path(__file__).parent.parent / "docs"
EXAMPLES = DOCS / "examples"
DEMO = Path(__file__).parent.parent / "demo"
PAGES = sorted(p for p in DOCS.glob("*.md") if p.name != "changelog.md")

# Pages whose code blocks must not scroll sideways in the rendered docs. Furo's content column
# shows 90 characters of code; 88 leaves a margin. The other pages still have longer lines.
WIDTH = 88
WIDTH_CHECKED = {
    "index.md",
    "tutorial.md",
    "fastapi.md",
    "recipes.md",
    "streaming.md",
    "websockets.md",
    "testing.md",
}

FENCE = re.compile(r"^(`{3,}|:{3,})\{?([\w-]*)\}?[ \t]*(.*)$")


@dataclass
class Block:
    page: str
    kind: str  # "literalinclude" or a language such as "python", "text"
    argument: str
    options: dict[str, str]
    body: list[str]

    def shown(self) -> list[str]:
        """The lines the rendered page shows for this block."""
        if self.kind != "literalinclude":
            return self.body
        lines = (DOCS / self.argument).read_text().splitlines()
        if "pyobject" in self.options:
            tree = ast.parse("\n".join(lines))
            node = next(
                n
                for n in ast.walk(tree)
                if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                and n.name == self.options["pyobject"]
            )
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            lines = lines[start - 1 : node.end_lineno]
        if "start-after" in self.options:
            marker = self.options["start-after"]
            index = next(i for i, line in enumerate(lines) if marker in line)
            lines = lines[index + 1 :]
        if "end-before" in self.options:
            marker = self.options["end-before"]
            index = next(i for i, line in enumerate(lines) if marker in line)
            lines = lines[:index]
        if "dedent" in self.options:
            lines = textwrap.dedent("\n".join(lines)).splitlines()
        return lines


def blocks(page: Path) -> list[Block]:
    """Every fenced block of a MyST page, with its directive options."""
    found: list[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, kind, argument = match.groups()
        body: list[str] = []
        options: dict[str, str] = {}
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            option = re.match(r"^:([\w-]+):\s*(.*)$", lines[i])
            if option and not body:
                options[option[1]] = option[2].strip().strip("\"'")
            else:
                body.append(lines[i])
            i += 1
        found.append(Block(page.name, kind or "text", argument.strip(), options, body))
        i += 1
    return found


def prose(page: Path) -> str:
    """The page without its fenced blocks."""
    text = page.read_text()
    return re.sub(r"^(`{3,}|:{3,}).*?^\1[ \t]*$", "", text, flags=re.M | re.S)


def quoted(page: Path) -> list[str]:
    """Inline code spans of the page's prose (``like this``), roles excluded."""
    return re.findall(r"(?<![`}])`([^`\n]+)`(?!`)", prose(page))


# ------------------------------------------------------------------------------ routes


def routes() -> set[tuple[str, str]]:
    """(METHOD, path) of every route the example apps and the demo define."""
    found: set[tuple[str, str]] = set()
    decorator = re.compile(r"\.(get|post|put|patch|delete|websocket)\(\s*\"(/[^\"]*)\"")
    for source in [*EXAMPLES.glob("*.py"), *DEMO.glob("*.py")]:
        for method, path in decorator.findall(source.read_text()):
            found.add((method.upper(), path))
    for router in (cancelkit.fastapi.cancel_router, cancelkit.fastapi.operations_router):
        default = inspect.signature(router).parameters["path"].default
        found.add(("DELETE", default))
    found.add(
        ("GET", inspect.signature(cancelkit.fastapi.operations_router).parameters["path"].default)
    )
    return found


def _pattern(path: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\\\{\w+\\\}", r"\\{\\w+\\}", re.escape(path)) + "$")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_route_quoted_in_the_docs_exists(page: Path) -> None:
    """`METHOD /path` in a page names a route an example app, the demo or a router defines."""
    known = routes()
    for span in quoted(page):
        match = re.fullmatch(r"(GET|POST|PUT|PATCH|DELETE) (/\S*)", span)
        if match is None:
            continue
        method, path = match.groups()
        assert any(
            m == method and (_pattern(p).match(path) or _pattern(path).match(p)) for m, p in known
        ), f"{page.name}: `{span}` is not a route of any example app, the demo or a router"


# ------------------------------------------------------------------------------ names

# Names the docs quote that are not cancelkit's and not defined or imported by an example.
EXTERNAL = {
    *(name for name in dir(builtins) if name[:1].isupper()),  # exceptions, None, ...
    "StreamingResponse",
    "WebSocket",
    "WebSocketDisconnect",
    "BaseHTTPMiddleware",
    "CancelledError",
    "BackgroundTask",
    "Retry-After",
    "X-Operation-Id",
    "X-Sequence",
    "X-User",
    "Last-Event-ID",
    "EventSource",
    "ProcessorFormatter",
    "ExtraAdder",
    "AbortController",
    "AsyncClient",
    "ASGITransport",
    "TestClient",
    "GET",
    "POST",
    "DELETE",
}


def otel_names() -> set[str]:
    """The span event, attribute and metric names cancelkit.otel records (``cancelkit.*``)."""
    source = (DOCS.parent / "cancelkit" / "otel" / "_instrument.py").read_text(encoding="utf-8")
    events = {f"cancelkit.{what}" for what in ("cancelled", "refused", "committed")}
    return set(re.findall(r'"(cancelkit\.\w+)"', source)) | events


def defined_in_examples() -> set[str]:
    """Every name an example file defines, imports or assigns."""
    names: set[str] = set()
    for source in EXAMPLES.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.alias):
                names.add((node.asname or node.name).split(".")[-1])
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return names


def produced_by_cancelkit() -> set[str]:
    """Every string constant in cancelkit's code: values it produces (an error ``type``)."""
    package = Path(cancelkit.__file__).parent
    return {
        node.value
        for source in package.rglob("*.py")
        for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


def _resolves(dotted: str) -> bool:
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for part in parts[cut:]:
                obj = getattr(obj, part)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_name_quoted_in_the_docs_exists(page: Path) -> None:
    """Every CamelCase name and `cancelkit.x` quoted in a page's prose exists.

    It is cancelkit's (a name, or a value it produces), or an example defines or imports it,
    or the page defines it in a quoted assignment (`CurrentUser = ...`), or it is a known
    outside name. (`CurrentUser` was once used and never defined.) Names inside `{role}`
    references are checked by Sphinx (`-n`).
    """
    public = {
        *cancelkit.__all__,
        *cancelkit.backends.__all__,
        *dir(cancelkit.fastapi),
        *cancelkit.redis.__all__,
    }
    spans = quoted(page)
    on_page = {m for span in spans for m in re.findall(r"^([A-Z]\w*)\s*=", span)}
    known = public | defined_in_examples() | produced_by_cancelkit() | on_page | EXTERNAL
    for span in spans:
        for dotted in re.findall(r"\bcancelkit(?:\.\w+)+", span):
            assert _resolves(dotted) or dotted in otel_names(), (
                f"{page.name}: `{span}`: {dotted} does not exist"
            )
        for name in re.findall(r"(?<![\w.\-])([A-Z][a-z]+[A-Z]\w*)", span):
            assert name in known, (
                f"{page.name}: `{span}`: {name} is neither cancelkit's nor defined anywhere"
            )


# ------------------------------------------------------------------------------ statuses


def statuses() -> set[int]:
    """Status codes cancelkit answers with, or an example produces or prints."""
    found = {200, 202, 404, 422}  # FastAPI's own: success, accepted, no route, validation
    sources = [*Path(cancelkit.__file__).parent.rglob("*.py"), *EXAMPLES.glob("*.py")]
    for source in sources:
        found |= {int(n) for n in re.findall(r"\b([1-5]\d\d)\b", source.read_text())}
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_status_code_quoted_in_the_docs_is_one_cancelkit_or_an_example_gives(
    page: Path,
) -> None:
    """A quoted status (`409`, **499**) is one cancelkit's code or an example's can answer."""
    known = statuses()
    text = prose(page)
    spans = re.findall(r"`([1-5]\d\d)`|\*\*([1-5]\d\d)\*\*", text)
    for code in {int(a or b) for a, b in spans}:
        assert code in known, f"{page.name}: status {code} is answered by nothing"


# ------------------------------------------------------------------------------ width


@pytest.mark.parametrize("page", sorted(p for p in PAGES if p.name in WIDTH_CHECKED), ids=str)
def test_code_on_the_guide_pages_does_not_scroll_sideways(page: Path) -> None:
    """Every line of code a checked page shows fits the rendered column (88 characters)."""
    for block in blocks(page):
        if block.kind in {"toctree", "note", "warning", "tip", "admonition"}:
            continue
        for line in block.shown():
            assert len(line) <= WIDTH, (
                f"{page.name}: a {block.kind} block ({block.argument or 'inline'}) shows a "
                f"{len(line)}-character line, which scrolls sideways: {line!r}"
            )


# ------------------------------------------------------------------------------ versions

VERSION_NOTE = re.compile(
    r"(?:\.\. |\{)(versionadded|versionchanged|deprecated)(?:::|\})[ \t]*(\S+)"
)


def release(version: str) -> tuple[int, ...]:
    """The release numbers of a version, trailing zeros dropped: ``0.1.0.dev0`` -> ``(0, 1)``."""
    match = re.match(r"\d+(\.\d+)*", version)
    assert match, f"not a version: {version!r}"
    numbers = [int(n) for n in match[0].split(".")]
    while numbers and numbers[-1] == 0:
        numbers.pop()
    return tuple(numbers)


def test_no_version_note_names_a_version_after_the_package() -> None:
    """`versionadded`, `versionchanged` and `deprecated` in cancelkit/ and docs/ name versions
    the package (pyproject.toml) has reached: a 0.1 package has nothing "new in 0.2"."""
    root = DOCS.parent
    package = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    notes = [
        (f"{source.relative_to(root)}:{number}: {kind} {version}", version)
        for source in [*Path(cancelkit.__file__).parent.rglob("*.py"), *DOCS.glob("*.md")]
        for number, line in enumerate(source.read_text().splitlines(), 1)
        for kind, version in VERSION_NOTE.findall(line)
    ]
    assert len(notes) > 2  # the reST form in docstrings and the MyST form of the pages
    ahead = [where for where, version in notes if release(version) > release(package)]
    assert not ahead, f"the package is {package}; these name a later version: {ahead}"
