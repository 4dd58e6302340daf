"""LatestOnly: a keyed slot where the newest claim wins (and the rest of the policy family)."""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import final

import anyio

from . import _events
from ._exceptions import OperationCancelled, SlotBusy
from ._policy import Policy, PolicyName, preset_name
from ._reason import CancelKind, CancelReason
from ._token import (
    CancellationToken,
    HeldToken,
    TokenScope,
    commit_token,
    settled_reason,
    token_scope,
    uncommit_token,
)
from .backends import Acquired, Admission, Backend, MemoryBackend, new_holder_id
from .backends._memory import _admit, _drop

__all__ = ["Claim", "LatestOnly", "LatestOnlyStatistics", "SlotBusy"]

_MAX_KEY = 256


def _encodable(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (no lone surrogates), as every backend stores it."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


_MAX_SEQ = 2**53  # exact in a Lua (double) number, so the Redis scripts compare it exactly

#: The start of the reason message of a claim refused for its sequence number.
STALE = "stale:"


@final
class Claim:
    """A claim on a :class:`LatestOnly` key, from :meth:`LatestOnly.claim` or ``hold()``.

    Attributes:
        key: the key claimed.
        id: this claim's unique id; a claim it supersedes sees it as the reason's ``source``.
        seq: the client's sequence number, if one was given.
        token: the token that stops the body.
        generation: the fencing number, greater than that of every earlier claim on the key;
            check it with :meth:`LatestOnly.is_current` before writing results.

    .. versionadded:: 0.1
    """

    __slots__ = ("_hold", "_started", "generation", "id", "key", "seq", "token")

    key: str
    seq: int | None
    id: str
    token: CancellationToken
    generation: int
    _started: bool
    _hold: _Hold

    def __init__(self) -> None:
        raise TypeError("Claim cannot be created directly; use slot.claim(key) or slot.hold(key)")

    @property
    def started(self) -> bool:
        """Whether the body started (after the debounce, queue and handover waits)."""
        return self._started

    async def commit(self) -> None:
        """Pass the commit point: "I am still the newest", and from now on nothing stops me.

        Call it just before the body's irreversible step (write the result, send it). The
        backend decides, atomically and across workers, whether a newer claim or the commit
        came first: if the claim was superseded (or its token cancelled otherwise), this
        raises :exc:`~cancelkit.OperationCancelled` with that reason; otherwise the body is
        no longer interrupted by anything cancelkit does: a newer claim still takes the key
        (this claim stops being current; the newcomer runs or waits as the policy and
        ``handover_timeout`` say), but this body runs to its end. Idempotent.

        Raises:
            OperationCancelled: if the claim was superseded or cancelled first.
            BackendUnavailable: if the backend cannot decide (Redis unreachable with
                ``fail_open=False``); nothing is committed or cancelled then.

        .. versionadded:: 0.1
        """
        await self._hold.commit()

    def __repr__(self) -> str:
        state = "running" if self._started else "waiting"
        if self.token.committed:
            state = "committed"
        seq = "" if self.seq is None else f" seq={self.seq}"
        return (
            f"<Claim key={self.key!r} id={self.id!r}{seq} generation={self.generation} "
            f"{state} token={self.token!r}>"
        )


def _new_claim(key: str, seq: int | None, hold: _Hold) -> Claim:
    """Return a new, not yet started :class:`Claim` (its ``__init__`` refuses users)."""
    claim: Claim = object.__new__(Claim)
    claim.key = key
    claim.seq = seq
    claim.id = new_holder_id()
    claim.token = HeldToken(name=claim.id)
    claim._hold = hold
    claim.generation = 0
    claim._started = False
    return claim


@final
@dataclass(frozen=True, slots=True)
class LatestOnlyStatistics:
    """A snapshot of a :class:`LatestOnly`, from :meth:`LatestOnly.statistics`.

    Attributes:
        running: claims whose body started and has not exited.
        waiting: claims entered whose body has not started (debounce, queue or handover).
        claimed: claims accepted since the slot was made.
        superseded: claims that ended because a newer one took the key (stale ones too).
        stale: claims refused because their sequence number was not the newest.
        rejected: claims refused with :exc:`SlotBusy`.

    .. versionadded:: 0.1
    """

    running: int
    waiting: int
    claimed: int
    superseded: int
    stale: int
    rejected: int


@final
class LatestOnly:
    """A keyed slot: for each key, only the newest claims' work is worth finishing.

    ``async with slot.claim(key) as claim:`` runs the body interrupted by ``claim.token``.
    At most ``max_concurrency`` claims run per key; what happens to a newcomer when that
    many run depends on ``policy`` (the decision is atomic in the backend, so it holds
    across workers with a shared backend):

    - ``"replace"`` (default; switchMap, restartable): the oldest running claim is cancelled
      with reason :attr:`~cancelkit.CancelKind.SUPERSEDED` (its ``source`` is the
      newcomer's id), and the newcomer runs.
    - ``"reject"`` (exhaustMap, drop): the newcomer is refused with :exc:`SlotBusy`.
    - ``"keep_latest"``: running bodies finish; the newcomer waits for a free slot, and a
      claim that was waiting is superseded before its body starts (only the newest waits).
    - ``"enqueue"``: the newcomer waits for a free slot, first come first served; past
      ``max_waiting`` waiting claims it is refused with :exc:`SlotBusy`.

    These names are presets of :class:`~cancelkit.Policy`, which says the same in parts
    (``Policy("wait", "supersede", max_waiting=3)``: keep the three newest waiting).

    **Order.** Requests of one client can arrive out of order (parallel connections, several
    workers). Give each claim the client's own number, increasing per key (a keystroke
    counter): ``slot.claim(key, seq=n)``. A claim whose ``seq`` is not above the newest one
    accepted for the key (equal counts as not above: a number is used once) is *stale*: it
    cancels nobody, its body never starts, and it raises
    :exc:`~cancelkit.OperationCancelled` with reason ``SUPERSEDED``, the claim that brought
    the newest number as ``source``, and a message starting with ``"stale:"``. The backend
    remembers the newest number for a while after the key was released (its ``seq_ttl``),
    so a late stale request still never runs. Claims without ``seq`` keep arrival order.

    Args:
        policy: a :class:`~cancelkit.Policy`, or the name of a preset: ``"replace"``,
            ``"reject"``, ``"keep_latest"`` or ``"enqueue"``.
        max_concurrency: how many claims run at once per key.
        max_waiting: with a preset's name, its ``max_waiting`` instead of the preset's (1,000
            for ``"enqueue"``; 1 for ``"keep_latest"``, which then keeps that many of the
            newest claims waiting). With a :class:`~cancelkit.Policy`, give it there.
        debounce: seconds a claim waits before its body starts; a claim superseded while
            waiting never runs its body.
        handover_timeout: wait up to this many seconds (``math.inf``: no limit) until fewer
            than ``max_concurrency`` earlier claims (bodies and cleanup) are left before the
            body starts, so bodies for one key never overlap more than that (only
            ``"replace"`` supersedes running bodies, so only it needs this); ``None`` starts
            at once. It also bounds the wait of ``"keep_latest"`` and ``"enqueue"`` claims
            for a slot (``None``: no limit). Past it, the claim fails with :exc:`SlotBusy`.
        backend: where the keys live; a new :class:`~cancelkit.backends.MemoryBackend` if
            omitted. Every :class:`LatestOnly` sharing keys on a backend must use the same
            policy and limits.

    Raises:
        ValueError: for an unknown policy name, ``max_waiting`` next to a
            :class:`~cancelkit.Policy`, a limit below 1 or a negative time.

    .. versionadded:: 0.1
    """

    __slots__ = (
        "_backend",
        "_claimed",
        "_debounce",
        "_handover",
        "_limit",
        "_memory",
        "_policy",
        "_rejected",
        "_running",
        "_stale",
        "_superseded",
        "_waiting",
    )

    def __init__(
        self,
        *,
        policy: Policy | PolicyName = "replace",
        max_concurrency: int = 1,
        max_waiting: int | None = None,
        debounce: float = 0.0,
        handover_timeout: float | None = None,
        backend: Backend | None = None,
    ) -> None:
        if isinstance(policy, Policy):
            if max_waiting is not None:
                raise ValueError(f"give max_waiting in the Policy: {policy!r}")
        else:
            policy = Policy.named(policy)
            if max_waiting is not None and max_waiting != policy.max_waiting:
                policy = dataclasses.replace(policy, max_waiting=max_waiting)
        if type(max_concurrency) is not int or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be an int >= 1, not {max_concurrency!r}")
        if not debounce >= 0:
            raise ValueError(f"debounce must be seconds >= 0, not {debounce!r}")
        if handover_timeout is not None and not handover_timeout >= 0:
            raise ValueError(
                f"handover_timeout must be seconds >= 0 or None, not {handover_timeout!r}"
            )
        self._policy = policy
        self._limit = max_concurrency
        self._debounce = debounce
        self._handover = handover_timeout
        self._backend: Backend = MemoryBackend() if backend is None else backend
        # The in-memory backend never waits: claims call it without making coroutines.
        self._memory = self._backend if type(self._backend) is MemoryBackend else None
        self._running = self._waiting = 0
        self._claimed = self._superseded = self._stale = self._rejected = 0

    @property
    def backend(self) -> Backend:
        """The backend in use."""
        return self._backend

    @property
    def policy(self) -> Policy:
        """The policy, as a :class:`~cancelkit.Policy` (a preset's name resolved)."""
        return self._policy

    def hold(self, key: str, *, seq: int | None = None) -> AbstractAsyncContextManager[Claim]:
        """Claim ``key`` and hold it for the block, without interrupting the block.

        Like :meth:`claim`, but only the waits before the body (debounce, queue, handover)
        are interrupted; the block itself runs to its end and checks ``claim.token`` (or
        enters ``claim.token.scope()`` around the part that may be interrupted). Adapters use
        this to interrupt the endpoint but not the sending of its response.

        Args:
            key: what the work is about (a user's search box, a document id); 1 to 256
                characters.
            seq: the client's sequence number for this key (see the class docs), an int from
                0 to 2**53; ``None`` keeps arrival order.

        Returns:
            An async context manager yielding the :class:`Claim`.

        Raises:
            ValueError: for an empty or overlong key or a sequence number out of range;
                TypeError if the key is not a str or the number not an int.
            SlotBusy: see the policies and ``handover_timeout``.
            OperationCancelled: on entry, when the claim was stale or superseded before its
                body started (or its token was cancelled otherwise).

        .. versionadded:: 0.1
        """
        return _Hold(self, key, seq, False)

    def claim(self, key: str, *, seq: int | None = None) -> AbstractAsyncContextManager[Claim]:
        """Claim ``key`` and run the block as one of its newest holders.

        The block runs inside ``claim.token.scope()``: when the claim is superseded (or its
        token cancelled otherwise) the block's awaits are interrupted and
        :exc:`~cancelkit.OperationCancelled` is raised. The key is released when the block
        exits, in every case. Arguments and errors as for :meth:`hold`.

        Returns:
            An async context manager yielding the :class:`Claim`, whose ``token`` stops the
            body.

        Raises:
            SlotBusy: see the policies and ``handover_timeout``.
            OperationCancelled: when the claim was stale, or superseded (before or while its
                body ran), or its token was cancelled otherwise.
        """
        return _Hold(self, key, seq, True)

    async def is_current(self, key: str, generation: int) -> bool:
        """Whether the claim with ``generation`` still runs on ``key`` (for fencing writes).

        True while that claim holds one of the key's ``max_concurrency`` slots: accepted,
        not waiting, not superseded and not released. With ``max_concurrency=1`` that means
        it is the newest claim; with more, up to that many claims are current at once.
        """
        return await self._backend.is_current(key, generation)

    def statistics(self) -> LatestOnlyStatistics:
        """Return a snapshot of this slot's counters."""
        return LatestOnlyStatistics(
            running=self._running,
            waiting=self._waiting,
            claimed=self._claimed,
            superseded=self._superseded,
            stale=self._stale,
            rejected=self._rejected,
        )

    def __repr__(self) -> str:
        return (
            f"<LatestOnly policy={preset_name(self._policy) or self._policy!r} "
            f"max_concurrency={self._limit} "
            f"debounce={self._debounce} handover_timeout={self._handover} "
            f"running={self._running} waiting={self._waiting} backend={self._backend!r}>"
        )


@final
class _Hold:
    """The context manager of :meth:`LatestOnly.hold` and, interrupting, of ``claim()``.

    Use once. Interrupting, the block runs in the claim's token scope, which ends before the
    key is released.
    """

    __slots__ = ("_claim", "_interrupt", "_scope", "_slot", "_started")

    def __init__(self, slot: LatestOnly, key: str, seq: int | None, interrupt: bool) -> None:
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, not {type(key).__name__}")
        if not 0 < len(key) <= _MAX_KEY:
            raise ValueError(f"key must have 1 to {_MAX_KEY} characters, not {len(key)}")
        if not key.isascii() and not _encodable(key):
            raise ValueError(f"key {key!r} is not valid Unicode (a lone surrogate)")
        if seq is not None:
            if isinstance(seq, bool) or not isinstance(seq, int):
                raise TypeError(f"seq must be an int or None, not {type(seq).__name__}")
            if not 0 <= seq <= _MAX_SEQ:
                raise ValueError(f"seq must be from 0 to 2**53, not {seq}")
        self._slot = slot
        self._claim = _new_claim(key, seq, self)
        self._interrupt = interrupt
        self._scope: TokenScope | None = None
        self._started = time.monotonic() if _events.listeners else None

    async def __aenter__(self) -> Claim:
        slot, claim = self._slot, self._claim
        key, memory = claim.key, slot._memory
        slot._waiting += 1
        try:
            if memory is not None:
                acquired: Acquired | int = _admit(
                    memory,
                    key,
                    claim.id,
                    claim.token.cancel,
                    slot._policy,
                    slot._limit,
                    claim.seq,
                )
            else:
                acquired = await slot._backend.acquire(
                    key,
                    claim.id,
                    claim.token.cancel,
                    policy=slot._policy,
                    limit=slot._limit,
                    seq=claim.seq,
                )
        except BaseException:
            slot._waiting -= 1
            raise
        if isinstance(acquired, int):  # the in-memory backend's answer for a running claim
            admission, generation = Admission.RUNNING, acquired
        else:
            admission, generation = acquired.admission, acquired.generation
        if admission is Admission.RUNNING or admission is Admission.WAITING:
            claim.generation = generation
            slot._claimed += 1
            queued = admission is Admission.WAITING
            try:
                if queued or slot._debounce or slot._handover is not None:
                    await self._wait(queued)
                if self._interrupt:
                    # move_on(), which __aexit__ turns into OperationCancelled after releasing
                    # the key (a scope() would raise it first, to be caught and raised again)
                    claim.token.raise_if_cancelled()  # superseded meanwhile: no body
                    scope = token_scope(claim.token, 0)  # move_on(), one call less
                    scope.__enter__()
                    self._scope = scope
            except BaseException:
                slot._waiting -= 1
                self._count_superseded()
                await self._drop_key()
                raise
            slot._waiting -= 1
            slot._running += 1
            claim._started = True
            return claim
        slot._waiting -= 1
        if admission is Admission.STALE:
            assert isinstance(acquired, Acquired)
            slot._stale += 1
            slot._superseded += 1
            reason = CancelReason(
                CancelKind.SUPERSEDED,
                message=(
                    f"{STALE} sequence number {claim.seq} is not above {acquired.seq}, the "
                    "newest one seen for this key"
                ),
                source=acquired.source,
            )
            claim.token.cancel(reason)
            self._refused("stale")
            raise OperationCancelled(reason)
        slot._rejected += 1
        if admission is Admission.BUSY:
            self._refused("busy")
            raise SlotBusy(key, f"{slot._limit} claim(s) already run on the key")
        self._refused("full")
        raise SlotBusy(key, f"{slot._policy.max_waiting} claim(s) already wait for the key")

    def _refused(self, kind: str) -> None:
        if _events.listeners:
            claim = self._claim
            _events.report("claim", claim.token, claim.key, what="refused", kind=kind)

    async def _wait(self, queued: bool) -> None:
        """The debounce, queue and handover waits, interrupted by the claim's token."""
        slot, claim = self._slot, self._claim
        handover = slot._handover
        with claim.token.scope():
            if slot._debounce:
                await anyio.sleep(slot._debounce)
            limit = math.inf if handover is None else handover
            with anyio.move_on_after(limit) as wait:
                await slot._backend.wait_turn(claim.key, claim.id, handover=handover is not None)
            if wait.cancelled_caught:
                claim.token.raise_if_cancelled()  # superseded as the time ran out: say so
                raise SlotBusy(claim.key, "the claim's turn did not come in time")
        claim.token.raise_if_cancelled()  # superseded without a checkpoint in between

    def _count_superseded(self) -> None:
        """At the claim's end: count a supersede, report a cancellation (see _events)."""
        token = self._claim.token
        reason = token.reason
        if reason is not None and reason.kind is CancelKind.SUPERSEDED:
            self._slot._superseded += 1
        if _events.listeners:
            _events.report("claim", token, self._claim.key, started=self._started)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        scope = self._scope
        if scope is not None:
            try:
                scope.__exit__(exc_type, exc, tb)
            except BaseException:
                await self._release()
                raise
        await self._release()
        stopped = None if scope is None else scope.reason  # the claim's token stopped the block
        if stopped is not None:
            raise OperationCancelled(stopped) from None
        if exc_type is None:  # the body returned: not a success if it had been superseded
            token = self._claim.token
            reason = settled_reason(token)  # (no deadline poll: a body that returned in time did)
            if reason is not None and not token.committed:
                raise OperationCancelled(reason)
        return False

    async def commit(self) -> None:
        """See :meth:`Claim.commit`."""
        slot, claim = self._slot, self._claim
        token = claim.token
        if token.committed:
            return
        frames = commit_token(token)  # no local cancel can slip in during the round trip
        try:
            reason = await slot._backend.commit_claim(claim.key, claim.id)
        except BaseException:
            uncommit_token(token, frames, None)
            raise
        if reason is not None:  # superseded first; the delivery had not arrived
            uncommit_token(token, frames, reason)
            raise OperationCancelled(settled_reason(token) or reason)
        if _events.listeners:
            _events.report("claim", token, claim.key, what="committed", started=self._started)

    async def _release(self) -> None:
        self._slot._running -= 1
        superseded = await self._drop_key()
        if superseded is not None:  # the delivery had not arrived yet
            self._claim.token.cancel(superseded)
        self._count_superseded()

    async def _drop_key(self) -> CancelReason | None:
        slot, claim = self._slot, self._claim
        memory = slot._memory
        if memory is not None:
            _drop(memory, claim.key, claim.id)  # (its supersede was delivered at once)
            return None
        return await slot._backend.release(claim.key, claim.id)  # completes even if cancelled
