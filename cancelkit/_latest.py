"""LatestOnly: a keyed slot where the newest claim wins."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal, final

import anyio

from ._reason import CancelKind, CancelReason
from ._token import CancellationToken
from .backends import Backend, MemoryBackend, new_holder_id

__all__ = ["Claim", "LatestOnly", "LatestOnlyStatistics", "Policy", "SlotBusy"]

#: How a :class:`LatestOnly` treats a newcomer while a claim on the key is active.
Policy = Literal["replace", "reject", "keep_latest"]
_POLICIES = ("replace", "reject", "keep_latest")
_MAX_KEY = 256


class SlotBusy(Exception):
    """A claim could not start because the key is taken.

    Raised by the ``reject`` policy while another claim holds the key, and by any policy when
    the previous holder did not finish within ``handover_timeout``.

    Args:
        key: the key.
        message: what happened.

    .. versionadded:: 0.1
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{message} (key {key!r})")
        self.key = key


@final
class Claim:
    """A claim on a :class:`LatestOnly` key, as yielded by :meth:`LatestOnly.claim`.

    Attributes:
        key: the key claimed.
        id: this claim's unique id; a claim it supersedes sees it as the reason's ``source``.
        token: the token that stops the body; the body runs inside ``token.scope()``.
        generation: the fencing number, greater than that of every earlier claim on the key;
            check it with :meth:`LatestOnly.is_current` before writing results.

    .. versionadded:: 0.1
    """

    __slots__ = ("_finish_first", "_running", "generation", "id", "key", "token")

    def __init__(self, key: str, *, finish_first: bool) -> None:
        self.key = key
        self.id = new_holder_id()
        self.token = CancellationToken(name=self.id)
        self.generation = 0
        self._running = False
        self._finish_first = finish_first

    def _deliver(self, reason: CancelReason) -> None:
        if not (self._finish_first and self._running):  # keep_latest: a started body finishes
            self.token.cancel(reason)

    def __repr__(self) -> str:
        state = "running" if self._running else "waiting"
        return (
            f"<Claim key={self.key!r} id={self.id!r} generation={self.generation} {state} "
            f"token={self.token!r}>"
        )


@final
@dataclass(frozen=True, slots=True)
class LatestOnlyStatistics:
    """A snapshot of a :class:`LatestOnly`, from :meth:`LatestOnly.statistics`.

    Attributes:
        active: claims entered and not yet exited.
        claimed: claims accepted since the slot was made.
        superseded: claims that ended because a newer one took the key.
        rejected: claims refused with :exc:`SlotBusy`.

    .. versionadded:: 0.1
    """

    active: int
    claimed: int
    superseded: int
    rejected: int


@final
class LatestOnly:
    """A keyed slot: for each key, only the newest claim's work is worth finishing.

    ``async with slot.claim(key) as claim:`` runs the body inside ``claim.token.scope()``.
    What happens when a claim arrives while another is active depends on ``policy``:

    - ``"replace"`` (default): the previous claim is cancelled with reason
      :attr:`~cancelkit.CancelKind.SUPERSEDED` (its ``source`` is the newcomer's id), and
      the newcomer starts (after the previous body exited, if ``handover_timeout`` is set).
    - ``"reject"``: the newcomer is refused with :exc:`SlotBusy`; the running claim goes on.
    - ``"keep_latest"``: a running body finishes; only the newest waiting claim runs after
      it; the claims in between are superseded before their bodies start.

    Args:
        policy: ``"replace"``, ``"reject"`` or ``"keep_latest"``.
        debounce: seconds a claim waits before its body starts; a claim superseded while
            waiting never runs its body.
        handover_timeout: with ``"replace"``, wait up to this many seconds (``math.inf``: no
            limit) for earlier claims' bodies and cleanup to exit before the body starts, so
            bodies for one key never overlap; ``None`` starts at once. ``"keep_latest"``
            always waits, up to this long if given. Past it, the claim fails with
            :exc:`SlotBusy`.
        backend: where the keys live; a new :class:`~cancelkit.backends.MemoryBackend` if
            omitted.

    Raises:
        ValueError: for an unknown policy or a negative time.

    .. versionadded:: 0.1
    """

    __slots__ = (
        "_active",
        "_backend",
        "_claimed",
        "_debounce",
        "_handover",
        "_policy",
        "_rejected",
        "_superseded",
    )

    def __init__(
        self,
        *,
        policy: Policy = "replace",
        debounce: float = 0.0,
        handover_timeout: float | None = None,
        backend: Backend | None = None,
    ) -> None:
        if policy not in _POLICIES:
            raise ValueError(f"unknown policy {policy!r}; expected one of {', '.join(_POLICIES)}")
        if not debounce >= 0:
            raise ValueError(f"debounce must be seconds >= 0, not {debounce!r}")
        if handover_timeout is not None and not handover_timeout >= 0:
            raise ValueError(
                f"handover_timeout must be seconds >= 0 or None, not {handover_timeout!r}"
            )
        if policy == "keep_latest" and handover_timeout is None:
            handover_timeout = math.inf
        self._policy = policy
        self._debounce = debounce
        self._handover = handover_timeout
        self._backend: Backend = MemoryBackend() if backend is None else backend
        self._active = self._claimed = self._superseded = self._rejected = 0

    @property
    def backend(self) -> Backend:
        """The backend in use."""
        return self._backend

    @asynccontextmanager
    async def claim(self, key: str, *, interrupt: bool = True) -> AsyncIterator[Claim]:
        """Claim ``key`` and run the block as its newest holder.

        Args:
            key: what the work is about (a user's search box, a document id); 1 to 256
                characters.
            interrupt: run the block inside ``claim.token.scope()`` (the default). With
                ``False`` the block is not interrupted: it only holds the key and checks or
                scopes ``claim.token`` itself (a debounce or handover wait before it is still
                interrupted). Adapters use this to interrupt only part of the block.

        Yields:
            The :class:`Claim`, whose ``token`` stops the body.

        Raises:
            ValueError: for an empty or overlong key; TypeError if it is not a str.
            SlotBusy: see the policies and ``handover_timeout``.
            OperationCancelled: when the claim was superseded (before or while its body ran)
                or its token was cancelled otherwise.
        """
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, not {type(key).__name__}")
        if not 0 < len(key) <= _MAX_KEY:
            raise ValueError(f"key must have 1 to {_MAX_KEY} characters, not {len(key)}")
        backend = self._backend
        claim = Claim(key, finish_first=self._policy == "keep_latest")
        self._active += 1
        try:
            acquired = await backend.acquire(
                key, claim.id, claim._deliver, replace=self._policy != "reject"
            )
            if acquired is None:
                self._rejected += 1
                raise SlotBusy(key, "another claim holds the key")
            self._claimed += 1
            claim.generation = acquired.generation
            with claim.token.scope():
                if self._debounce:
                    await anyio.sleep(self._debounce)
                if self._handover is not None:
                    with anyio.move_on_after(self._handover):
                        await backend.wait_turn(key, claim.id)
                        claim._running = True
                    if not claim._running:
                        claim.token.raise_if_cancelled()  # superseded meanwhile: say so
                        raise SlotBusy(key, "the previous claim did not finish in time")
                claim._running = True
                if interrupt:
                    yield claim
            if not interrupt:
                yield claim
        finally:
            self._active -= 1
            reason = claim.token.reason
            if reason is not None and reason.kind is CancelKind.SUPERSEDED:
                self._superseded += 1
            await backend.release(key, claim.id)  # completes even when cancelled

    async def is_current(self, key: str, generation: int) -> bool:
        """Whether ``generation`` is still the newest claim on ``key`` (for fencing writes)."""
        return await self._backend.generation(key) == generation

    def statistics(self) -> LatestOnlyStatistics:
        """Return a snapshot of this slot's counters."""
        return LatestOnlyStatistics(
            active=self._active,
            claimed=self._claimed,
            superseded=self._superseded,
            rejected=self._rejected,
        )

    def __repr__(self) -> str:
        return (
            f"<LatestOnly policy={self._policy!r} debounce={self._debounce} "
            f"handover_timeout={self._handover} active={self._active} backend={self._backend!r}>"
        )
