"""House rules of cancelkit/ checked on the source: small classes, rooms that match their names.

- No class is longer than ``MAX_CLASS_LINES`` lines (decorators and docstring included), with
  no exceptions.
- No module reads or writes an underscore attribute that a class of *another* cancelkit module
  defines (a method, a ``__slots__`` entry, a class attribute or ``self._x = ...``): classes
  talk to each other through public (or documented internal) names. A subclass may use what
  its base classes define (``CancellationToken`` over ``_signal._Signal``).
- The seams: ``cancelkit/fastapi`` is a package of request adapters, OpenAPI and operations;
  one ``_exceptions.py`` holds every public exception, each a ``CancelkitError``; no import
  waits for ``noqa: E402``; the Redis status store does not import the operations runtime;
  the core (``cancelkit/*.py``, ``cancelkit/backends``) imports no web framework and no Redis
  client; every public name reports its public module; the receive buffer (``ReadAhead``)
  lives in ``_receive.py`` and ``shielded_cleanup`` in ``_cleanup.py`` (not in ``_asgi.py``);
  one loop bridge, ``_loop.py``, asks which event loop runs and schedules into it.

``REACH_INS_ALLOWED`` holds what the reach-in check flags that is no cancelkit reach-in: the
known private attributes of coredis that ``redis/_cluster.py`` uses in its subclasses of
coredis classes and whose names happen to match a cancelkit attribute, each with why it is
used. An entry that is no longer used fails the test.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import cancelkit
from cancelkit import _exceptions

PACKAGE = Path(__file__).resolve().parent.parent / "cancelkit"
TESTS = Path(__file__).resolve().parent
MAX_CLASS_LINES = 300

#: The public namespaces and the typing aliases in them (typing objects keep their module).
NAMESPACES = (
    "cancelkit",
    "cancelkit.backends",
    "cancelkit.fastapi",
    "cancelkit.httpx",
    "cancelkit.otel",
    "cancelkit.redis",
    "cancelkit.testing",
)
ALIASES = {"Deliver", "Policy", "RequestToken", "SlotPolicy", "Stores", "Workers"}

#: "module.py: name._attr" -> which coredis private it is, and why cancelkit uses it. Not
#: cancelkit reach-ins: coredis's own attributes, named like a cancelkit class's.
REACH_INS_ALLOWED: dict[str, str] = {
    "redis/_cluster.py: self._cleanup": (
        "coredis ShardedPubSub._cleanup (unsubscribe, drain the replies): what coredis's own "
        "run() does when cancelled, called by the override that leases only the channels' shards"
    ),
    "redis/_cluster.py: self._counter": (
        "coredis ClusterConnectionPool._counter (how often the pool is entered): at the "
        "last exit, close the layout's error stream that coredis 6.9 leaves open"
    ),
}

#: Names only the loop bridge (_loop.py) uses: which event loop runs, scheduling into it.
LOOP_BRIDGE = {
    "_get_running_loop",
    "get_running_loop",
    "current_trio_token",
    "in_trio_run",
    "call_soon_threadsafe",
    "run_sync_soon",
}


def modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        yield name, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def classes(tree: ast.Module) -> Iterator[ast.ClassDef]:
    return (node for node in ast.walk(tree) if isinstance(node, ast.ClassDef))


def defined_private_names(tree: ast.Module) -> set[str]:
    """Underscore attribute names that the classes of one module define."""
    return set().union(*(class_private_names(cls) for cls in classes(tree)))


def class_private_names(cls: ast.ClassDef) -> set[str]:
    """Underscore attribute names that one class defines."""
    names: set[str] = set()
    for item in cls.body:
        if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(item.name)
        elif isinstance(item, ast.Assign | ast.AnnAssign):
            targets = item.targets if isinstance(item, ast.Assign) else [item.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    names.add(target.id)
                    if target.id == "__slots__" and item.value is not None:
                        names.update(
                            elt.value
                            for elt in ast.walk(item.value)
                            if isinstance(elt, ast.Constant) and isinstance(elt.value, str)
                        )
    for node in ast.walk(cls):  # self._x = ... in any method
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
        ):
            names.add(node.attr)
    return {name for name in names if is_private(name)}


def test_no_class_is_longer_than_the_limit() -> None:
    """No class in cancelkit/ is over MAX_CLASS_LINES lines; there is no allowlist."""
    offenders: dict[str, int] = {}
    for module, tree in modules():
        for node in classes(tree):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            assert node.end_lineno is not None
            if node.end_lineno - start + 1 > MAX_CLASS_LINES:
                offenders[f"{module}:{node.name}"] = node.end_lineno - start + 1
    assert not offenders, "classes over the limit:\n" + "\n".join(
        f"  {name}: {lines} lines (limit {MAX_CLASS_LINES})" for name, lines in offenders.items()
    )


def inherited_private_names(by_name: dict[str, ast.ClassDef], tree: ast.Module) -> set[str]:
    """Underscore names that the cancelkit base classes of a module's classes define."""
    names: set[str] = set()
    pending = [base for cls in classes(tree) for base in cls.bases]
    while pending:
        base = pending.pop()
        if isinstance(base, ast.Name) and base.id in by_name:
            names |= class_private_names(by_name[base.id])
            pending.extend(by_name[base.id].bases)
    return names


def test_no_module_reaches_into_another_modules_classes() -> None:
    """No module uses an underscore attribute defined by a class of another cancelkit module."""
    trees = dict(modules())
    defined = {module: defined_private_names(tree) for module, tree in trees.items()}
    by_name = {cls.name: cls for tree in trees.values() for cls in classes(tree)}
    offenders: dict[str, list[int]] = {}
    for module, tree in trees.items():
        elsewhere = set().union(*(names for m, names in defined.items() if m != module))
        foreign = elsewhere - defined[module] - inherited_private_names(by_name, tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in foreign:
                owner = ast.unparse(node.value)
                offenders.setdefault(f"{module}: {owner}.{node.attr}", []).append(node.lineno)
    unexpected = sorted(set(offenders) - set(REACH_INS_ALLOWED))
    fixed = sorted(set(REACH_INS_ALLOWED) - set(offenders))
    assert not unexpected, "private reach-ins into another module's classes:\n" + "\n".join(
        f"  {name} (line {', '.join(map(str, offenders[name]))})" for name in unexpected
    )
    assert not fixed, f"no longer offending, remove from REACH_INS_ALLOWED: {fixed}"


def test_fastapi_is_a_package_of_three_rooms_each_with_its_test_module() -> None:
    """cancelkit/fastapi/: request adapters, OpenAPI, operations; one test module for each."""
    rooms = {path.name for path in (PACKAGE / "fastapi").glob("*.py")}
    assert not (PACKAGE / "fastapi.py").exists()
    assert rooms == {"__init__.py", "_requests.py", "_openapi.py", "_operations.py"}
    for room in rooms - {"__init__.py"}:
        assert (TESTS / f"test_fastapi{room.removesuffix('.py')}.py").is_file(), room


def test_every_public_exception_lives_in_one_module_under_one_base() -> None:
    """Each exported exception is defined in _exceptions.py and is a CancelkitError."""
    defined_there = {
        cls.name for cls in classes(ast.parse((PACKAGE / "_exceptions.py").read_text()))
    }
    found = 0
    for namespace in map(importlib.import_module, NAMESPACES):
        for name in namespace.__all__:
            obj = getattr(namespace, name)
            if isinstance(obj, type) and issubclass(obj, BaseException):
                found += 1
                assert name in defined_there, f"{namespace.__name__}.{name}"
                assert obj is getattr(_exceptions, name)
                assert issubclass(obj, cancelkit.CancelkitError), name
    assert found >= len(defined_there)


def test_no_import_waits_for_noqa_e402() -> None:
    """No module imports half-way down (the sign of two modules joined into one)."""
    for path in PACKAGE.rglob("*.py"):
        assert "noqa: E402" not in path.read_text(encoding="utf-8"), path


def imported_modules(tree: ast.Module) -> set[str]:
    """The modules a module imports (relative imports as written, with their dots)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_one_redis_client_stack() -> None:
    """Only redis/_connection.py and redis/_cluster.py make coredis clients and pools: the
    backend and the status store share that stack (its error model, its cluster support)."""
    makers = {"Redis", "RedisCluster", "ConnectionPool", "ClusterConnectionPool", "from_url"}
    for module, tree in modules():
        if not module.startswith("redis/") or module in (
            "redis/_connection.py",
            "redis/_cluster.py",
        ):
            continue
        made = {
            node.func.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        }
        assert not made & makers, f"{module} makes its own client: {made & makers}"


def test_the_redis_status_store_imports_value_types_not_the_runtime() -> None:
    """redis/_status.py gets OperationStatus from _status, never from the _operations runtime."""
    tree = dict(modules())["redis/_status.py"]
    assert not {name for name in imported_modules(tree) if name.endswith("_operations")}


def test_the_core_imports_no_web_framework_and_no_redis_client() -> None:
    """cancelkit/*.py and cancelkit/backends/ run with anyio alone (the extras are optional)."""
    extras = ("fastapi", "starlette", "pydantic", "coredis", "httpx", "httpcore")
    for module, tree in modules():
        if "/" in module and not module.startswith("backends/"):
            continue
        for name in imported_modules(tree):
            assert not name.startswith(extras), f"{module} imports {name}"


def test_every_public_name_reports_its_public_module() -> None:
    """X in cancelkit.fastapi says cancelkit.fastapi, and so on (aliases are typing objects)."""
    for namespace in map(importlib.import_module, NAMESPACES):
        for name in namespace.__all__:
            if name in ALIASES:
                continue
            module = getattr(namespace, name).__module__
            if namespace.__name__ == "cancelkit.backends":  # re-exports of the flat names
                assert module in ("cancelkit", "cancelkit.backends"), name
            else:
                assert module == namespace.__name__, f"{namespace.__name__}.{name}: {module}"


def top_level_names(tree: ast.Module) -> set[str]:
    """The classes and functions a module defines at its top level."""
    kinds = ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
    return {node.name for node in tree.body if isinstance(node, kinds)}


def test_the_receive_buffer_and_shielded_cleanup_live_in_their_own_rooms() -> None:
    """ReadAhead is defined in _receive.py only, shielded_cleanup in _cleanup.py only; the
    disconnect guard (_asgi.py) imports the buffer."""
    homes = {"ReadAhead": "_receive.py", "shielded_cleanup": "_cleanup.py"}
    trees = dict(modules())
    for name, home in homes.items():
        where = [module for module, tree in trees.items() if name in top_level_names(tree)]
        assert where == [home], f"{name} is defined in {where}, not in {home} alone"
    assert "._receive" in imported_modules(trees["_asgi.py"])


def test_one_loop_bridge() -> None:
    """Only _loop.py asks which event loop runs or schedules into one (LOOP_BRIDGE names).

    cancelkit/postgres drives asyncpg and psycopg, which run on asyncio only: it creates
    its futures and watcher tasks on asyncio's running loop itself.
    """
    for module, tree in modules():
        if module == "_loop.py" or module.startswith("postgres/"):
            continue
        used = {
            node.attr if isinstance(node, ast.Attribute) else node.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute | ast.Name)
        } | {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            for alias in node.names
        }
        assert not used & LOOP_BRIDGE, f"{module} bridges to the loop itself: {used & LOOP_BRIDGE}"
