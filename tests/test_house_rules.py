"""House rules of cancelkit/ checked on the source: small classes, no private reach-ins.

- No class is longer than ``MAX_CLASS_LINES`` lines (decorators and docstring included).
- No module reads or writes an underscore attribute that a class of *another* cancelkit module
  defines (a method, a ``__slots__`` entry, a class attribute or ``self._x = ...``): classes
  talk to each other through public (or documented internal) names.

Known offenders that other work is removing are listed in the allowlists below, each with the
owner who removes it; an entry that no longer offends fails the test, so the lists only shrink.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cancelkit"
MAX_CLASS_LINES = 300

#: "module.py:Class" -> who shrinks it. Empty these, never add to them.
LONG_CLASSES_ALLOWED: dict[str, str] = {
    "_token.py:CancellationToken": "core (issue 14: the token's small internal interface)",
}

#: "module.py: name._attr" -> who removes the reach-in. Empty these, never add to them.
REACH_INS_ALLOWED: dict[str, str] = {
    # Not cancelkit reach-ins: coredis's own private attributes, used by the subclasses of
    # coredis classes in redis/_cluster.py; they only share a name with cancelkit attributes.
    "redis/_cluster.py: self._cleanup": "coredis ShardedPubSub._cleanup (name clash only)",
    "redis/_cluster.py: self._counter": "coredis ClusterConnectionPool._counter (name clash only)",
}


def modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        yield name, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def defined_private_names(tree: ast.Module) -> set[str]:
    """Underscore attribute names that the classes of one module define."""
    names: set[str] = set()
    for cls in (node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)):
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
    """No class in cancelkit/ is over MAX_CLASS_LINES lines (the allowlist only shrinks)."""
    found: dict[str, int] = {}
    for module, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                assert node.end_lineno is not None
                found[f"{module}:{node.name}"] = node.end_lineno - start + 1
    offenders = {name: lines for name, lines in found.items() if lines > MAX_CLASS_LINES}
    unexpected = sorted(set(offenders) - set(LONG_CLASSES_ALLOWED))
    fixed = sorted(set(LONG_CLASSES_ALLOWED) - set(offenders))
    assert not unexpected, "classes over the limit:\n" + "\n".join(
        f"  {name}: {offenders[name]} lines (limit {MAX_CLASS_LINES})" for name in unexpected
    )
    assert not fixed, f"no longer over the limit, remove from LONG_CLASSES_ALLOWED: {fixed}"


def test_no_module_reaches_into_another_modules_classes() -> None:
    """No module uses an underscore attribute defined by a class of another cancelkit module."""
    trees = dict(modules())
    defined = {module: defined_private_names(tree) for module, tree in trees.items()}
    offenders: dict[str, list[int]] = {}
    for module, tree in trees.items():
        elsewhere = set().union(*(names for m, names in defined.items() if m != module))
        foreign = elsewhere - defined[module]
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
