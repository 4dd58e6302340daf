from __future__ import annotations

import re
import types

import pytest

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


def test_every_exception_derives_from_the_common_base() -> None:
    """Every exported exception is a CancelkitError; the unreachable-state ones share a base."""
    import cancelkit.redis

    exported = [
        *(getattr(cancelkit, name) for name in cancelkit.__all__),
        *(getattr(cancelkit.redis, name) for name in cancelkit.redis.__all__),
    ]
    errors = [obj for obj in exported if isinstance(obj, type) and issubclass(obj, BaseException)]
    assert len(errors) == 7
    for error in errors:
        assert issubclass(error, cancelkit.CancelkitError), error
    assert issubclass(cancelkit.redis.RedisUnavailable, cancelkit.BackendUnavailable)
    assert not issubclass(cancelkit.OperationExists, ValueError)


def test_package_is_typed() -> None:
    """The package ships a py.typed marker."""
    from importlib.resources import files

    assert files("cancelkit").joinpath("py.typed").is_file()


@pytest.mark.parametrize(
    ("cls", "factory"),
    [
        (cancelkit.Claim, "slot.claim(key)"),
        (cancelkit.CallbackHandle, "token.on_cancel()"),
        (cancelkit.TokenScope, "token.scope()"),
        (cancelkit.TrackedOperation, "registry.track(id)"),
    ],
)
def test_handles_are_made_by_their_factories_only(cls: type, factory: str) -> None:
    """Claim, CallbackHandle, TokenScope and TrackedOperation refuse to be built by hand."""
    with pytest.raises(TypeError, match=re.escape(factory)):
        cls()


@pytest.mark.anyio
async def test_the_factories_still_make_them() -> None:
    """What the factories return is an instance of the class, with its state set."""
    token = cancelkit.CancellationToken()
    assert isinstance(token.on_cancel(print), cancelkit.CallbackHandle)
    assert token.on_cancel(print).registered
    scope = token.move_on()
    assert isinstance(scope, cancelkit.TokenScope)
    assert scope.token is token
    assert not scope.cancelled_caught
    async with cancelkit.LatestOnly().hold("key") as claim:
        assert isinstance(claim, cancelkit.Claim)
        assert claim.started
