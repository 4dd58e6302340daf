"""Every code block of the docs and the README runs, is checked, or says why it is not.

Sybil reads the pages (docs/*.md, README.md): fenced blocks, MyST directives, and two kinds of
MyST comment that the rendered page does not show. Each kind of block has its check:

- `` ```python ``: runs, in order, in one namespace per page. Top-level ``await`` and
  ``async with`` are allowed: such a block runs in ``anyio.run`` on asyncio and, in a second
  test, on trio (but for the few pages of ``ASYNCIO_ONLY``). A block of ``>>>`` lines is a
  doctest. Setup a reader does not need to see goes in ``% invisible-code-block: python``
  comments; a name a block uses that is a test fixture (``redis``: a real redis-server;
  ``postgres_server``: a real PostgreSQL server) is put in its namespace.
- `` ```console `` and `` ```sh ``: not run; each command must name what exists (a nox session,
  an extra, a file or module of this repository, the flags its source knows).
- `` ```toml ``: every key it sets has that value in pyproject.toml.
- `` ```text ``: the output of the example the page includes above it (or of the
  ``$ python docs/examples/...`` command of a console block); the test that runs that example
  compares its real output with every such block: ``assert_shows("name.py", lines)``.
- `` ```{literalinclude} ``: a file of docs/examples that a test runs.
- Anything else fails, unless ``% skip: next "why"`` (``<!-- skip: next "why" -->`` in the
  README) stands before it: those are few and each says why (``NOT_RUN_AT_MOST``).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
import shlex
import tomllib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from unittest import SkipTest

import anyio
import pytest
from sybil import Document, Example, Region
from sybil.evaluators.doctest import DocTestEvaluator
from sybil.evaluators.python import pad
from sybil.evaluators.skip import Skipper
from sybil.parsers.abstract.doctest import DocTestStringParser
from sybil.parsers.markdown.lexers import DirectiveInHTMLCommentLexer, FencedCodeBlockLexer
from sybil.parsers.myst import SkipParser
from sybil.parsers.myst.lexers import DirectiveInPercentCommentLexer, DirectiveLexer

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
TESTS = {p.name: p.read_text(encoding="utf-8") for p in Path(__file__).parent.glob("test_*.py")}

#: The most blocks that may be marked ``skip: next`` (each one cannot run here): lower it when
#: one goes, never raise it without a reason the lead accepts.
NOT_RUN_AT_MOST = 1
#: Pages whose async blocks run on asyncio only, and why.
ASYNCIO_ONLY = {"postgres.md": "SQLAlchemy's async engine, asyncpg and async psycopg need asyncio"}
#: Test fixtures a page's Python blocks may use by name.
FIXTURES = ("redis", "postgres_server")


# ------------------------------------------------------------------------------ reading pages


def parse(page: Path, backend: str = "asyncio") -> Document:
    """The page's blocks, each with its check; async Python blocks run on ``backend``."""
    run = PythonRunner(backend)

    def fenced(document: Document) -> Iterator[Region]:  # MyST directives start with {
        for region in FencedCodeBlockLexer(language=r"[^{\n]*")(document):
            yield from checked(region, region.lexemes["language"].strip(), run)

    def directives(document: Document) -> Iterator[Region]:
        code = r"literalinclude|code-block|code-cell|code|sourcecode"
        for region in DirectiveLexer(directive=code)(document):
            if region.lexemes["directive"] == "literalinclude":
                region.parsed = region.lexemes["arguments"].strip()
                region.evaluator = check_included
                yield region
            else:
                yield from checked(region, region.lexemes["arguments"].strip(), run)

    def invisible(document: Document) -> Iterator[Region]:  # setup and checks, not shown
        for lexer in (
            DirectiveInPercentCommentLexer(directive="invisible-code-block", arguments="python"),
            DirectiveInHTMLCommentLexer(directive="invisible-code-block", arguments="python"),
        ):
            for region in lexer(document):
                region.parsed = region.lexemes["source"]
                region.evaluator = run
                yield region

    # A new SkipParser per page: it keeps state per document.
    return Document.parse(str(page), fenced, directives, invisible, SkipParser())


def checked(region: Region, language: str, run: PythonRunner) -> Iterator[Region]:
    """``region`` (a block in ``language``) with its check; a doctest block is one per ``>>>``."""
    source = region.lexemes["source"]
    region.parsed = source
    if language == "python" and source.startswith(">>>"):
        for doctest in DocTestStringParser(DocTestEvaluator())(source, "<page>"):
            doctest.adjust(region, source)
            yield doctest
        return
    checks: dict[str, Callable[[Example], None]] = {
        "python": run,
        "console": check_console,
        "sh": check_sh,
        "toml": check_toml,
        "text": check_output,
    }
    region.evaluator = checks.get(language, unchecked(language))
    yield region


def unchecked(language: str) -> Callable[[Example], None]:
    def fail(example: Example) -> None:
        raise AssertionError(
            f"{example.path}:{example.line}: nothing checks a ```{language or '(no language)'} "
            'block: give it a checker here, or put `% skip: next "why"` before it'
        )

    return fail


def is_async(source: str) -> bool:
    """Whether a Python block awaits at its top level (and so runs in an event loop)."""
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    code = compile(source, "<block>", "exec", flags=flags, dont_inherit=True)
    return bool(code.co_flags & inspect.CO_COROUTINE)


def python_blocks(document: Document) -> list[str]:
    return [
        str(region.parsed)
        for _, region in document.regions
        if isinstance(region.evaluator, PythonRunner)
    ]


# ------------------------------------------------------------------------------ Python


class PythonRunner:
    """Runs a Python block in the page's namespace; one with top-level awaits in ``anyio.run``."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def __call__(self, example: Example) -> None:
        source = pad(example.parsed, example.line + example.parsed.line_offset)
        code = compile(
            source, example.path, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True
        )
        namespace = example.namespace
        if code.co_flags & inspect.CO_COROUTINE:

            async def block() -> None:
                await eval(code, namespace)

            anyio.run(block, backend=self.backend)
        else:
            exec(code, namespace)


# ------------------------------------------------------------------------------ commands


def nox_sessions() -> set[str]:
    tree = ast.parse((ROOT / "noxfile.py").read_text(encoding="utf-8"))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef)
        and any("nox.session" in ast.unparse(d) for d in node.decorator_list)
    }


def benchmarks() -> set[str]:
    return {p.stem.removeprefix("bench_") for p in (ROOT / "benchmarks").glob("bench_*.py")}


def module_file(module: str) -> Path:
    base = ROOT / module.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.is_file():
            return candidate
    raise AssertionError(f"`python -m {module}`: no such module in this repository")


def check_flags(target: Path, args: list[str]) -> None:
    source = target.read_text(encoding="utf-8")
    for flag in (a.split("=")[0] for a in args if a.startswith("--")):
        assert flag in source, f"{target.name} knows no {flag}"


NOX = argparse.ArgumentParser(add_help=False)
NOX.add_argument("-s", "--session", "--sessions", dest="sessions", nargs="+", default=[])
NOX.add_argument("posargs", nargs="*")


def check_command(command: str) -> None:
    """A shell command the docs show names only what exists."""
    for words in split_and(shlex.split(command, comments=True)):
        if words[:3] == ["python", "-m", "pip"]:
            words = words[2:]
        match words:
            case ["pip", "install", *requirements]:
                for requirement in requirements:
                    extras = re.fullmatch(r"cancelkit\[([\w,-]+)\]", requirement)
                    if extras:
                        known = PYPROJECT["project"]["optional-dependencies"]
                        missing = set(extras[1].split(",")) - set(known)
                        assert not missing, f"cancelkit has no extra {missing}"
            case ["python", "-m", "nox", *rest]:
                nox, _ = NOX.parse_known_args(rest)
                for session in nox.sessions:
                    assert session in nox_sessions(), f"noxfile.py has no session {session!r}"
                if nox.sessions == ["bench"]:  # its posargs name benchmarks
                    assert set(nox.posargs) <= benchmarks(), f"no benchmark in {nox.posargs}"
            case ["python", "-m", "benchmarks", *names]:
                assert set(names) <= benchmarks(), f"no benchmark in {names}"
            case ["python", "-m", module, *args]:
                check_flags(module_file(module), args)
            case ["python", path, *args] if path.endswith(".py"):
                assert (ROOT / path).is_file(), f"no file {path}"
                check_flags(ROOT / path, args)
            case _:
                raise AssertionError(f"a command this check does not know: {command!r}")


def split_and(words: list[str]) -> Iterable[list[str]]:
    current: list[str] = []
    for word in [*words, "&&"]:
        if word == "&&":
            if current:
                yield current
            current = []
        else:
            current.append(word)


def check_console(example: Example) -> None:
    """``$ command`` lines are checked; the other lines are its output (see shown_output)."""
    commands = [line[2:] for line in example.parsed.splitlines() if line.startswith("$ ")]
    assert commands, "a console block without a `$ ` command"
    for command in commands:
        check_command(command)
    if len(commands) < len(example.parsed.splitlines()):
        check_output(example)


def check_sh(example: Example) -> None:
    for line in example.parsed.splitlines():
        if line.strip():
            check_command(line)


# ------------------------------------------------------------------------------ the rest


def check_toml(example: Example) -> None:
    """Every value the block sets is the project's own (pyproject.toml)."""

    def leaves(table: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[Any, ...]]:
        for key, value in table.items():
            if isinstance(value, dict):
                yield from leaves(value, (*path, key))
            else:
                yield (*path, key), value

    for path, value in leaves(tomllib.loads(example.parsed)):
        ours: Any = PYPROJECT
        for key in path:
            ours = ours.get(key, {}) if isinstance(ours, dict) else {}
        assert ours == value, f"pyproject.toml sets {'.'.join(path)} = {ours!r}, not {value!r}"


INCLUDE = re.compile(r"^```\{literalinclude\}\s+examples/(\S+)", re.M)


def example_shown_above(document: Document, start: int) -> str | None:
    """The example file whose output a block at ``start`` shows: the last one included above,
    or the one a ``$ python docs/examples/x.py`` command in the block runs."""
    command = re.match(r"\$ python docs/examples/(\S+)", document.text[start:].split("\n", 1)[1])
    if command:
        return command[1]
    included = INCLUDE.findall(document.text, 0, start)
    return included[-1] if included else None


def check_output(example: Example) -> None:
    """A shown output belongs to an example whose test compares it (``assert_shows``)."""
    name = example_shown_above(example.document, example.start)
    assert name, "a ```text block that is the output of no example included above it"
    call = f'assert_shows("{name}"'
    assert any(call in text for text in TESTS.values()), (
        f"the output of examples/{name} is shown but no test compares it: call {call}, ...)"
    )


def check_included(example: Example) -> None:
    """An included file is an example that a test runs (by file or module name)."""
    path = DOCS / example.parsed
    assert path.is_file(), f"no file {path}"
    pattern = re.compile(rf"\b{re.escape(path.stem)}(\.py\b|:app\b)")
    assert any(pattern.search(text) for text in TESTS.values()), f"no test runs {path.name}"


def shown_output(name: str) -> list[list[str]]:
    """The lines of every output block the docs show for docs/examples/``name``."""
    shown: list[list[str]] = []
    for page in PAGES:
        document = parse(page)
        for _, region in document.regions:
            output = region.evaluator in (check_output, check_console)
            if output and example_shown_above(document, region.start) == name:
                lines = str(region.parsed).splitlines()
                shown.append([line for line in lines if not line.startswith("$ ")])
    return shown


def assert_shows(
    name: str, output: Iterable[str], *, varying: str = "", any_order: bool = False
) -> None:
    """Every output the docs show for docs/examples/``name`` is ``output`` (its lines).

    ``varying``: a pattern for what differs from run to run (a port, a random id), compared as
    ``…``; ``any_order``: lines that other processes print in no fixed order.
    """

    def seen(lines: Iterable[str]) -> list[str]:
        same = [re.sub(varying, "…", line) if varying else line for line in lines]
        return sorted(same) if any_order else same

    shown = shown_output(name)
    assert shown, f"the docs show no output of examples/{name}"
    for lines in shown:
        assert seen(lines) == seen(output)


# ------------------------------------------------------------------------------ the tests


def skipped(document: Document) -> list[tuple[str, str | None]]:
    return [
        region.parsed for _, region in document.regions if isinstance(region.evaluator, Skipper)
    ]


def backends(page: Path) -> list[str]:
    any_async = any(is_async(source) for source in python_blocks(parse(page)))
    return ["asyncio", "trio"] if any_async and page.name not in ASYNCIO_ONLY else ["asyncio"]


@pytest.mark.parametrize(
    ("page", "backend"),
    [(page, backend) for page in PAGES for backend in backends(page)],
    ids=lambda v: v.name if isinstance(v, Path) else v,
)
def test_every_code_block_runs_or_is_checked(
    page: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """The page's blocks, in order; those a ``skip: next`` marks are left out."""
    document = parse(page, backend)
    used = {
        node.id
        for source in python_blocks(document)
        for node in ast.walk(
            compile(source, "<block>", "exec", ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        )
        if isinstance(node, ast.Name)
    }
    for fixture in used & set(FIXTURES):
        document.namespace[fixture] = request.getfixturevalue(fixture)
    for example in document.examples():
        try:
            example.evaluate()
        except SkipTest:
            continue
        except Exception as exc:
            exc.add_note(f"in the block at {page.relative_to(ROOT)}:{example.line}")
            raise


def test_blocks_that_are_not_run_are_few_and_each_says_why() -> None:
    """``skip: next "why"`` only (no open-ended ``skip: start``), each with its reason."""
    marks = [(page.name, mark) for page in PAGES for mark in skipped(parse(page))]
    for page, (action, reason) in marks:
        assert action == "next", f"{page}: `skip: {action}` (mark each block with `skip: next`)"
        assert reason, f"{page}: a `skip: next` without a reason"
        why = ast.literal_eval(reason)
        assert isinstance(why, str), f"{page}: the reason is a string: {reason}"
        assert len(why) > 20, f"{page}: say why: {reason}"
    assert len(marks) <= NOT_RUN_AT_MOST, marks
