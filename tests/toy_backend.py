"""A toy backend: the whole Backend protocol in plain dicts, to show what a backend takes.

It passes cancelkit.testing.BackendContract (tests/test_testing.py). It is not for use: no
expiry, no limits, one process.
"""

from __future__ import annotations

import itertools

import anyio

from cancelkit import CancelKind, CancelReason, OperationExists, Policy
from cancelkit.backends import Acquired, Admission, CancelOutcome, Deliver

Id = tuple[str | None, str]


class Claim:
    def __init__(self, deliver: Deliver, generation: int, state: str) -> None:
        self.deliver, self.generation, self.state = deliver, generation, state
        self.by: str | None = None  # who superseded it
        self.committed = False


class Key:
    def __init__(self) -> None:
        self.claims: dict[str, Claim] = {}  # unreleased, oldest first
        self.seq: tuple[int, str] | None = None
        self.limit = 1


class ToyBackend:
    def __init__(self) -> None:
        self.regs: dict[Id, tuple[str, Deliver]] = {}
        self.decided: dict[str, CancelReason | bool] = {}  # holder -> cancel reason or commit
        self.tombs: dict[Id, CancelReason] = {}
        self.finished: set[Id] = set()
        self.keys: dict[str, Key] = {}
        self.generations = itertools.count(1)
        self.changed = anyio.Event()

    # -- TokenRegistry ----------------------------------------------------------------------

    async def register(
        self, id: str, owner: str | None, holder: str, deliver: Deliver
    ) -> CancelReason | None:
        if (owner, id) in self.tombs:
            return self.tombs[(owner, id)]
        if (owner, id) in self.regs:
            raise OperationExists(id)
        self.finished.discard((owner, id))
        self.regs[(owner, id)] = (holder, deliver)
        return None

    async def unregister(self, id: str, owner: str | None, holder: str) -> CancelReason | None:
        if self.regs.get((owner, id), ("",))[0] == holder:
            del self.regs[(owner, id)]
            self.finished.add((owner, id))
        decided = self.decided.pop(holder, None)
        return decided if isinstance(decided, CancelReason) else None

    async def commit(self, id: str, owner: str | None, holder: str) -> CancelReason | None:
        if self.regs.get((owner, id), ("",))[0] != holder:
            return CancelReason(CancelKind.REQUESTED, "this run was taken over")
        decided = self.decided.setdefault(holder, True)
        return decided if isinstance(decided, CancelReason) else None

    async def cancel(self, id: str, owner: str | None, reason: CancelReason) -> CancelOutcome:
        if (owner, id) in self.regs:
            holder, deliver = self.regs[(owner, id)]
            if self.decided.setdefault(holder, reason) is True:
                return CancelOutcome.COMMITTED
            deliver(self.decided[holder])  # type: ignore[arg-type]  # a reason: not committed
            return CancelOutcome.CANCELLED
        if any(other == id for _, other in self.regs) or (owner, id) in self.finished:
            return CancelOutcome.NOT_FOUND
        self.tombs.setdefault((owner, id), reason)
        return CancelOutcome.PENDING

    # -- LatestOnly -------------------------------------------------------------------------

    async def acquire(
        self,
        key: str,
        holder: str,
        deliver: Deliver,
        *,
        policy: Policy,
        limit: int,
        seq: int | None,
    ) -> Acquired:
        k = self.keys.setdefault(key, Key())
        k.limit = limit
        if seq is not None and k.seq is not None and seq <= k.seq[0]:
            return Acquired(Admission.STALE, source=k.seq[1], seq=k.seq[0])
        running = [c for c in k.claims.values() if c.state == "running"]
        waiting = [c for c in k.claims.values() if c.state == "waiting"]
        state, victim = "running", None
        if len(running) >= limit:
            if policy.when_busy == "supersede":
                victim = running[0]
            elif policy.when_busy == "refuse":
                return Acquired(Admission.BUSY)
            elif policy.when_busy != "wait":
                raise ValueError(f"a policy this backend does not know: {policy!r}")
            elif len(waiting) < policy.max_waiting:
                state = "waiting"
            elif policy.when_full == "supersede":
                state, victim = "waiting", waiting[0]
            elif policy.when_full == "refuse":
                return Acquired(Admission.FULL)
            else:
                raise ValueError(f"a policy this backend does not know: {policy!r}")
        if victim is not None:
            victim.state, victim.by = "superseded", holder
            if not victim.committed:
                victim.deliver(CancelReason(CancelKind.SUPERSEDED, source=holder))
        generation = next(self.generations)
        k.claims[holder] = Claim(deliver, generation, state)
        if seq is not None:
            k.seq = (seq, holder)
        return Acquired(Admission(state), generation)

    async def release(self, key: str, holder: str) -> CancelReason | None:
        k = self.keys.get(key)
        claim = None if k is None else k.claims.pop(holder, None)
        if k is None or claim is None:
            return None
        if claim.state == "running":
            for other in k.claims.values():
                if other.state == "waiting":
                    other.state = "running"
                    break
        self.changed.set()
        self.changed = anyio.Event()
        if claim.by is not None and not claim.committed:
            return CancelReason(CancelKind.SUPERSEDED, source=claim.by)
        return None

    async def commit_claim(self, key: str, holder: str) -> CancelReason | None:
        claim = self.keys.get(key, Key()).claims.get(holder)
        if claim is None or claim.by is not None:
            by = None if claim is None else claim.by
            return CancelReason(CancelKind.SUPERSEDED, source=by)
        claim.committed = True
        return None

    async def wait_turn(self, key: str, holder: str, *, handover: bool) -> None:
        while (k := self.keys.get(key)) is not None and holder in k.claims:
            claims = list(k.claims)
            ahead = [c for c in claims[: claims.index(holder)] if k.claims[c].state != "waiting"]
            limit_free = not handover or len(ahead) < k.limit
            if k.claims[holder].state == "running" and limit_free:
                return
            await self.changed.wait()

    async def is_current(self, key: str, generation: int) -> bool:
        claims = self.keys.get(key, Key()).claims.values()
        return any(c.generation == generation and c.state == "running" for c in claims)
