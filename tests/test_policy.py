"""Policy as data: the presets, validation, and every backend branching on the parts."""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

import anyio
import pytest

from cancelkit import LatestOnly, OperationCancelled, Policy, SlotBusy
from cancelkit.backends import Admission, MemoryBackend
from cancelkit.redis import RedisBackend
from cancelkit.redis._listener import Listener
from tests.conftest import RedisServer

pytestmark = pytest.mark.anyio


def test_the_presets_are_policies() -> None:
    """Each name LatestOnly took before is a preset: one Policy, equal wherever it is named."""
    assert Policy.named("replace") == Policy("supersede")
    assert Policy.named("reject") == Policy("refuse")
    assert Policy.named("enqueue") == Policy("wait", "refuse", max_waiting=1_000)
    assert Policy.named("keep_latest") == Policy("wait", "supersede", max_waiting=1)
    assert LatestOnly().policy == Policy("supersede")  # the default
    assert LatestOnly(policy="enqueue", max_waiting=3).policy == Policy("wait", max_waiting=3)


@pytest.mark.parametrize(
    ("parts", "named"),
    [
        ({"when_busy": "replace"}, "when_busy"),
        ({"when_busy": "wait", "when_full": "wait"}, "when_full"),
        ({"when_busy": "wait", "max_waiting": 0}, "max_waiting"),
        ({"when_busy": "wait", "max_waiting": 1.5}, "max_waiting"),
        ({"when_busy": "wait", "max_waiting": True}, "max_waiting"),
    ],
)
def test_a_bad_part_is_refused_by_name(parts: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        Policy(**parts)


def test_names_and_values_are_checked_where_a_slot_is_made() -> None:
    with pytest.raises(ValueError, match=r"unknown policy 'newest'.*replace, reject"):
        LatestOnly(policy="newest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="give max_waiting in the Policy"):
        LatestOnly(policy=Policy("wait"), max_waiting=3)
    with pytest.raises(ValueError, match="max_waiting"):
        LatestOnly(policy="enqueue", max_waiting=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Policy("wait").when_busy = "refuse"  # type: ignore[misc]


def test_repr_names_a_preset() -> None:
    assert "policy='keep_latest'" in repr(LatestOnly(policy="keep_latest"))
    custom = Policy("wait", "supersede", max_waiting=2)
    assert f"policy={custom!r}" in repr(LatestOnly(policy=custom))


def _unknown() -> Policy:
    """A policy with a part no backend knows (what a newer client could send)."""
    policy = Policy("wait")
    object.__setattr__(policy, "when_busy", "toss")
    return policy


async def _claims(slot: LatestOnly, count: int) -> tuple[list[str], list[str]]:
    """``count`` claims of one key, each holding until the last arrived: how each ended."""
    started: list[str] = []
    ended: list[str] = []
    everyone = anyio.Event()

    async def claim(n: int) -> None:
        try:
            async with slot.claim("k"):
                started.append(f"c{n}")
                await everyone.wait()
            ended.append(f"c{n} done")
        except OperationCancelled:
            ended.append(f"c{n} superseded")
        except SlotBusy:
            ended.append(f"c{n} refused")

    async with anyio.create_task_group() as tg:
        for n in range(count):
            tg.start_soon(claim, n)
            await anyio.wait_all_tasks_blocked()
        everyone.set()
    return started, sorted(ended)


async def test_keep_the_two_newest_waiting(anyio_backend: str) -> None:
    """A combination no preset names: wait, and when two wait, the oldest waiter goes."""
    slot = LatestOnly(policy=Policy("wait", "supersede", max_waiting=2))
    started, ended = await _claims(slot, 5)
    # c0 runs; c1, c2 wait; c3 supersedes c1; c4 supersedes c2; then c3 and c4 run in turn
    assert started == ["c0", "c3", "c4"]
    assert ended == ["c0 done", "c1 superseded", "c2 superseded", "c3 done", "c4 done"]


async def test_refuse_when_two_wait(anyio_backend: str) -> None:
    slot = LatestOnly(policy=Policy("wait", "refuse", max_waiting=2))
    started, ended = await _claims(slot, 4)
    assert started == ["c0", "c1", "c2"]
    assert ended == ["c0 done", "c1 done", "c2 done", "c3 refused"]


async def test_the_memory_backend_refuses_a_part_it_does_not_know() -> None:
    backend = MemoryBackend()
    await backend.acquire("k", "h1", print, policy=_unknown(), limit=1, seq=None)
    with pytest.raises(ValueError, match="does not know"):
        await backend.acquire("k", "h2", print, policy=_unknown(), limit=1, seq=None)


async def test_redis_branches_on_the_parts_and_refuses_an_unknown_one(
    redis: RedisServer, anyio_backend: str
) -> None:
    """The ACQUIRE script reads the parts (a custom combination across two workers), and a
    part it does not know is refused before anything is recorded, not queued silently."""
    prefix = "pol" + secrets.token_hex(4)
    policy = Policy("wait", "supersede", max_waiting=1)
    async with (
        RedisBackend(redis.url, prefix=prefix) as a,
        RedisBackend(redis.url, prefix=prefix) as b,
    ):
        first = await a.acquire("k", "h1", print, policy=policy, limit=1, seq=None)
        second = await b.acquire("k", "h2", print, policy=policy, limit=1, seq=None)
        superseded: list[object] = []
        third = await a.acquire("k", "h3", superseded.append, policy=policy, limit=1, seq=None)
        assert [first.admission, second.admission, third.admission] == [
            Admission.RUNNING,
            Admission.WAITING,
            Admission.WAITING,
        ]
        with pytest.raises(ValueError, match="does not know"):
            await b.acquire("k", "h4", print, policy=_unknown(), limit=1, seq=None)
        assert b.statistics().claims == 1  # nothing recorded for the refused one
        for backend, holder in ((a, "h1"), (b, "h2"), (a, "h3")):
            await backend.release("k", holder)


@pytest.mark.parametrize("part", ["when_busy", "when_full"])
async def test_the_acquire_script_refuses_an_unknown_part_itself(
    redis: RedisServer, anyio_backend: str, monkeypatch: pytest.MonkeyPatch, part: str
) -> None:
    """Defence in depth: with the Python check bypassed (``check_known`` refuses first, so
    the script's refusal is never reached otherwise), the ACQUIRE script refuses a part it
    does not know with a clear error; nothing is queued, run locally, or marked down."""
    monkeypatch.setattr("cancelkit.redis._slots.check_known", lambda policy: None)
    resynced = anyio.Event()
    resync = Listener.resync

    async def first_only(self: Listener, *, force: bool = False) -> None:
        if resynced.is_set():  # no later resync races the releases below
            await anyio.sleep_forever()
        await resync(self, force=force)
        resynced.set()

    # A resync that read h1 before its release re-asserts it until its own cleanup runs: a
    # newcomer in that window is refused (1 in 10 runs beside two CPU spinners; see the
    # closing note of session 7). Not what this test is about: the start's resync ends first.
    monkeypatch.setattr(Listener, "resync", first_only)
    prefix = "pol" + secrets.token_hex(4)
    wait = Policy("wait", max_waiting=1)
    unknown = dataclasses.replace(wait)
    object.__setattr__(unknown, part, "toss")
    async with RedisBackend(redis.url, prefix=prefix) as backend:
        with anyio.fail_after(10):
            await resynced.wait()
        await backend.acquire("k", "h1", print, policy=wait, limit=1, seq=None)
        if part == "when_full":
            await backend.acquire("k", "h2", print, policy=wait, limit=1, seq=None)
        with pytest.raises(ValueError, match="cancelkit: a policy this backend does not know"):
            await backend.acquire("k", "h3", print, policy=unknown, limit=1, seq=None)
        stats = backend.statistics()
        assert (stats.connected, stats.failures, stats.claims) == (
            True,
            0,
            2 if part == "when_full" else 1,
        )
        await backend.release("k", "h1")
        if part == "when_full":
            await backend.release("k", "h2")
        again = await backend.acquire("k", "h4", print, policy=Policy("refuse"), limit=1, seq=None)
        assert again.admission is Admission.RUNNING  # h3 was not queued
        await backend.release("k", "h4")
