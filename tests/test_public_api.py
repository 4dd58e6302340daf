from __future__ import annotations

import types

import cancelkit


def test_all_is_sorted() -> None:
    """__all__ is kept in sorted order."""
    assert cancelkit.__all__ == sorted(cancelkit.__all__)


def test_all_is_complete() -> None:
    """Every public name in the namespace (modules aside) is listed in __all__, and exists."""
    public = {
        name
        for name, value in vars(cancelkit).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(cancelkit.__all__)


def test_exported_objects_report_the_flat_module() -> None:
    """Every exported object says it lives in 'cancelkit', not in a private module."""
    for name in cancelkit.__all__:
        assert getattr(cancelkit, name).__module__ == "cancelkit", name


def test_package_is_typed() -> None:
    """The package ships a py.typed marker."""
    from importlib.resources import files

    assert files("cancelkit").joinpath("py.typed").is_file()
