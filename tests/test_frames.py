"""Commit points at the token level: commit() against cancel(), and pinning the scopes around."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cancelkit import (
    CancelKind,
    CancellationToken,
    CancelReason,
    LatestOnly,
    OperationCancelled,
    TokenRegistry,
    current_token,
)
from cancelkit.backends import CancelOutcome, Deliver, MemoryBackend

pytestmark = pytest.mark.anyio


class LateDelivery:
    """A memory backend whose deliveries never arrive (as a pub/sub message still in flight)
    and whose commit lets something happen during its "round trip"."""

    def __init__(self, during_commit: Callable[[], object]) -> None:
        self.inner = MemoryBackend()
        self.during_commit = during_commit

    async def register(self, id: str, owner: str | None, holder: str, deliver: Deliver) -> Any:
        return await self.inner.register(id, owner, holder, lambda reason: None)

    async def unregister(self, id: str, owner: str | None, holder: str) -> Any:
        return await self.inner.unregister(id, owner, holder)

    async def cancel(self, id: str, owner: str | None, reason: CancelReason) -> CancelOutcome:
        return await self.inner.cancel(id, owner, reason)

    async def commit(self, id: str, owner: str | None, holder: str) -> Any:
        self.during_commit()
        await anyio.lowlevel.checkpoint()
        return await self.inner.commit(id, owner, holder)

    async def acquire(self, key: str, holder: str, deliver: Deliver, **options: Any) -> Any:
        return await self.inner.acquire(key, holder, deliver, **options)  # pragma: no cover

    async def release(self, key: str, holder: str) -> Any:  # pragma: no cover
        return await self.inner.release(key, holder)

    async def commit_claim(self, key: str, holder: str) -> Any:  # pragma: no cover
        return await self.inner.commit_claim(key, holder)

    async def wait_turn(self, key: str, holder: str, *, handover: bool) -> None:  # pragma: no cover
        await self.inner.wait_turn(key, holder, handover=handover)

    async def is_current(self, key: str, generation: int) -> bool:  # pragma: no cover
        return await self.inner.is_current(key, generation)


def test_commit_then_cancel_changes_nothing() -> None:
    """After commit(), cancel() answers False and the token stays live, committed."""
    token = CancellationToken()
    token.commit()
    assert token.committed
    assert token.cancel() is False
    assert not token.cancelled
    assert token.reason is None
    assert "committed" in repr(token)
    token.commit()  # idempotent


def test_cancel_then_commit_raises_the_reason() -> None:
    """A cancelled token cannot commit: commit() raises its reason and changes nothing."""
    token = CancellationToken()
    reason = CancelReason(CancelKind.REQUESTED, "stop")
    token.cancel(reason)
    with pytest.raises(OperationCancelled) as info:
        token.commit()
    assert info.value.reason is reason
    assert not token.committed


def test_a_passed_deadline_wins_over_a_later_commit() -> None:
    """A deadline that passed before commit() counts as the cancel that came first."""
    token = CancellationToken(timeout=0)
    with pytest.raises(OperationCancelled) as info:
        token.commit()
    assert info.value.reason.kind is CancelKind.DEADLINE


def test_commit_lifts_the_deadline_and_the_parents_cancel() -> None:
    """A committed child is no longer cancelled by its parent nor by its deadline."""
    parent = CancellationToken()
    child = parent.child(timeout=3600)
    child.commit()
    assert child.deadline == float("inf")
    parent.cancel()
    assert parent.cancelled
    assert not child.cancelled


def _race(token: CancellationToken) -> tuple[bool, bool]:
    """commit() and cancel() released at once in two threads: (commit won, cancel won)."""
    results: dict[str, bool] = {}
    barrier = threading.Barrier(2)

    def commit() -> None:
        barrier.wait()
        try:
            token.commit()
            results["commit"] = True
        except OperationCancelled:
            results["commit"] = False

    def cancel() -> None:
        barrier.wait()
        results["cancel"] = token.cancel()

    threads = [threading.Thread(target=commit), threading.Thread(target=cancel)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results["commit"], results["cancel"]


def test_commit_and_cancel_from_two_threads_exactly_one_wins() -> None:
    """commit() in one thread and cancel() in another: exactly one of them wins, every time."""
    for _ in range(300):  # bounded; each round is a few microseconds
        token = CancellationToken()
        committed, cancelled = _race(token)
        assert committed != cancelled
        assert token.committed is committed
        assert token.cancelled is cancelled


async def test_a_committed_scope_is_not_interrupted_by_its_deadline() -> None:
    """Inside token.scope(), commit() removes the scope's deadline: the block runs on."""
    token = CancellationToken(timeout=0.05)
    with token.scope():
        token.commit()
        await anyio.sleep(0.1)  # well past the deadline
    assert not token.cancelled


async def test_commit_pins_the_scopes_around_the_caller() -> None:
    """Cancelling an outer token after an inner commit does not interrupt the committed work."""
    outer, inner = CancellationToken(), CancellationToken()
    done = []
    with outer.scope():
        with inner.scope():
            inner.commit()
            outer.cancel()  # e.g. the client left after the payment was committed
            await anyio.lowlevel.checkpoint()
            done.append("charged")
        await anyio.lowlevel.checkpoint()
    assert done == ["charged"]
    assert outer.cancelled  # recorded, but it interrupted nothing


async def test_commit_is_refused_when_a_scope_around_was_cancelled() -> None:
    """An outer scope already interrupted: commit() raises its reason, nothing is committed."""
    outer, inner = CancellationToken(), CancellationToken()
    with pytest.raises(OperationCancelled) as info, outer.scope(), inner.move_on():
        outer.cancel(CancelReason(CancelKind.SHUTDOWN))
        inner.commit()
    assert info.value.reason.kind is CancelKind.SHUTDOWN
    assert not inner.committed


async def test_commit_from_a_worker_thread_commits_the_token() -> None:
    """A commit() from a worker thread (a sync endpoint) commits; cancel() is refused then."""
    token = CancellationToken()
    with token.scope():
        await anyio.to_thread.run_sync(token.commit)
        assert current_token() is token
        token.cancel()
        await anyio.lowlevel.checkpoint()
    assert token.committed
    assert not token.cancelled


async def test_the_token_of_a_tracked_operation_commits_through_the_operation() -> None:
    """op.token.commit() is refused (the backend decides); claim.token likewise."""
    async with TokenRegistry().track("a") as op:
        with pytest.raises(RuntimeError, match=r"op\.commit"):
            op.token.commit()
        await op.commit()
        assert op.token.committed
    async with LatestOnly().claim("k") as claim:
        with pytest.raises(RuntimeError, match=r"claim\.commit"):
            claim.token.commit()


async def test_a_refused_backend_commit_unpins_and_interrupts_at_once() -> None:
    """When the backend says a cancel came first, the op stops, and the interruption held
    back by the pin during the round trip (the client left meanwhile) happens at once."""
    outer = CancellationToken()
    backend = LateDelivery(lambda: outer.cancel(CancelReason(CancelKind.CLIENT_DISCONNECTED)))
    registry = TokenRegistry(backend=backend)
    with pytest.raises(OperationCancelled) as outer_info, outer.scope():
        with pytest.raises(OperationCancelled) as info:
            async with registry.hold("a") as op:
                # the server recorded a cancel whose delivery has not arrived (as on Redis)
                await backend.cancel("a", None, CancelReason(message="late"))
                assert not op.token.cancelled
                await op.commit()
        assert info.value.reason.message == "late"
        assert not op.token.committed
        await anyio.lowlevel.checkpoint()  # the client's leaving, held back, lands now
        pytest.fail("the outer scope was not interrupted")  # pragma: no cover
    assert outer_info.value.reason.kind is CancelKind.CLIENT_DISCONNECTED


class TokenMachine(RuleBasedStateMachine):
    """Tokens in a parent/child chain against a model: live, cancelled (why) or committed."""

    def __init__(self) -> None:
        super().__init__()
        self.root = CancellationToken()
        self.child = self.root.child()
        self.grandchild = self.child.child()
        self.tokens = [self.root, self.child, self.grandchild]
        self.model: list[str] = ["live", "live", "live"]

    def _relay(self, index: int) -> None:
        """The model of a cancel arriving at token ``index`` (and passed down the chain)."""
        for i in range(index, 3):
            if self.model[i] != "live":
                break  # a committed or cancelled token stops the relay (links are dropped)
            self.model[i] = "cancelled"

    @rule(index=st.integers(0, 2))
    def cancel(self, index: int) -> None:
        was_live = self.model[index] == "live"
        assert self.tokens[index].cancel() is was_live
        if was_live:
            self._relay(index)

    @rule(index=st.integers(0, 2))
    def commit(self, index: int) -> None:
        if self.model[index] == "cancelled":
            with pytest.raises(OperationCancelled):
                self.tokens[index].commit()
        else:
            self.tokens[index].commit()
            self.model[index] = "committed"

    @invariant()
    def agrees(self) -> None:
        for token, state in zip(self.tokens, self.model, strict=True):
            assert token.cancelled is (state == "cancelled")
            assert token.committed is (state == "committed")


test_tokens_match_a_model = TokenMachine.TestCase
TokenMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=12, deadline=None)
