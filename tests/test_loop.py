"""The loop bridge: the same loop and the same scope class as anyio's own detection finds."""

from __future__ import annotations

import asyncio

import anyio
import anyio.lowlevel
import pytest

from cancelkit import _loop

pytestmark = pytest.mark.anyio


async def test_this_loop_is_anyios_native_token(anyio_backend: str) -> None:
    """this_loop() is the asyncio loop or trio token anyio finds; asyncio_loop() only asyncio."""
    assert _loop.this_loop() is anyio.lowlevel.current_token().native_token
    if anyio_backend == "asyncio":
        assert _loop.asyncio_loop() is asyncio.get_running_loop()
    else:
        assert _loop.asyncio_loop() is None


def test_no_loop_outside_an_event_loop() -> None:
    """Outside any event loop there is no loop to bridge to."""
    assert _loop.this_loop() is None
    assert _loop.asyncio_loop() is None


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_asyncio_scope_class_is_anyios() -> None:
    """asyncio_scope_class() is the class of anyio.CancelScope() on asyncio, then cached."""
    cls = _loop.asyncio_scope_class()
    assert cls is type(anyio.CancelScope())
    assert _loop.asyncio_scope is cls
    scope = cls(deadline=-1)
    with scope:
        await anyio.sleep_forever()
    assert scope.cancelled_caught


async def test_new_scope_is_anyios_scope_with_its_deadline(anyio_backend: str) -> None:
    """new_scope() is what anyio.CancelScope(deadline=...) makes (the disconnect guard and
    TokenScope both make theirs with it), told or not that asyncio runs."""
    for on_asyncio in {anyio_backend == "asyncio", False}:
        scope = _loop.new_scope(on_asyncio, deadline=anyio.current_time() - 1)
        assert type(scope) is type(anyio.CancelScope())
        with scope:
            await anyio.sleep_forever()
        assert scope.cancelled_caught
    assert _loop.new_scope(False).deadline == anyio.CancelScope().deadline


def test_call_soon_into_a_finished_loop_raises() -> None:
    """call_soon() into a closed asyncio loop raises RuntimeError (cancel() relies on it)."""
    loop = asyncio.new_event_loop()
    loop.close()
    with pytest.raises(RuntimeError):
        _loop.call_soon(loop, print)
