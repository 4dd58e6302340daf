"""The small interface that :class:`TokenRegistry` and :class:`LatestOnly` talk to.

A backend keeps the state that several requests (or several worker processes) share: which
operation id is registered by whom, the tombstones of cancels that arrived first, and who
holds each latest-only key. The primitives keep their tokens locally and hand the backend,
with every registration and claim, a *holder* id and a *deliver* callback; the backend calls
``deliver(reason)`` when that exact holder must stop (a cancel by id, a newer claim).

Rules every backend follows (the in-memory one trivially, a Redis one across processes):

- **Holder ids are unique** strings (:func:`new_holder_id`: 96 random bits per process plus a
  counter), never reused. Everything that targets a registration or a claim names its holder,
  so a stale message can never cancel a newer holder of the same id or key.
- **Record first.** A backend that talks to a server stores ``holder -> deliver`` locally
  *before* it runs the atomic step on the server, so a cancel that arrives in between is not
  lost; it forgets the holder when :meth:`~Backend.unregister` / :meth:`~Backend.release`
  returns, and calls ``deliver`` for no holder after that.
- **Delivery** happens in the event loop that registered the holder, at least once per
  cancellation (callers make ``deliver`` idempotent: it is usually ``token.cancel``). A
  backend with a lossy channel (pub/sub) also re-reads the keys of its local holders on
  every reconnect and heartbeat and delivers what it lost (for a key now held by someone
  else: :attr:`~cancelkit.CancelKind.SUPERSEDED` with that holder as ``source``).
- **Nothing leaks.** A released key and a finished registration leave no state behind except
  a tombstone or a finished-marker, both of which expire (a TTL that really expires), and
  the generation counter (a single number per backend).
- **Bounded.** Tombstones are limited; a backend raises :exc:`RegistryFull` rather than grow.
- **Cleanup completes.** :meth:`~Backend.unregister` and :meth:`~Backend.release` run in
  the caller's cleanup, often while it is being cancelled: a backend that awaits I/O there
  shields that I/O itself (and bounds it with its own timeout), so the caller never needs a
  shielded scope and the in-memory backend costs nothing for one.
- Backend methods are called from one event loop; they never block it.

Options such as the tombstone TTL and limits belong to the backend's constructor, not to
this interface.

.. versionadded:: 0.1
"""

from __future__ import annotations

import enum
import itertools
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, final

from .._policy import Policy
from .._reason import CancelReason

__all__ = [
    "Acquired",
    "Admission",
    "Backend",
    "CancelOutcome",
    "Deliver",
    "new_holder_id",
]

#: Called by a backend with the reason when the holder it was given with must stop.
Deliver = Callable[[CancelReason], object]


def _reseed() -> None:
    global _prefix, _counter
    _prefix = secrets.token_urlsafe(12) + "."
    _counter = itertools.count()


_prefix = ""
_counter = itertools.count()
_reseed()
os.register_at_fork(after_in_child=_reseed)


def new_holder_id() -> str:
    """Return a new holder id, unique across processes and time (cheaper than 128 random bits).

    .. versionadded:: 0.1
    """
    return f"{_prefix}{next(_counter)}"


@final
class CancelOutcome(enum.StrEnum):
    """What :meth:`cancelkit.TokenRegistry.cancel` did.

    .. versionadded:: 0.1
    """

    #: The operation was running (for this owner) and is now cancelled.
    CANCELLED = "cancelled"
    #: Nothing with that id was running: a tombstone was written, so if the operation is
    #: tracked before the tombstone expires it starts already cancelled (its body never runs).
    PENDING = "pending"
    #: Nothing to cancel for this owner: the operation finished recently, or the id belongs to
    #: another owner's running operation (which stays untouched and unseen).
    NOT_FOUND = "not_found"
    #: Too late: the operation passed its commit point (:meth:`cancelkit.TrackedOperation.commit`)
    #: before this cancel; nothing was changed and it runs to its end.
    COMMITTED = "committed"


@final
class Admission(enum.StrEnum):
    """What :meth:`Backend.acquire` did with a claim.

    .. versionadded:: 0.1
    """

    #: The claim holds one of the key's ``limit`` slots; its body may start (after the
    #: handover wait, if the caller asked for one).
    RUNNING = "running"
    #: The claim waits for a slot (``enqueue`` and ``keep_latest``); :meth:`Backend.wait_turn`
    #: returns once it got one.
    WAITING = "waiting"
    #: Refused: ``limit`` claims hold the key (``reject``); nothing was recorded.
    BUSY = "busy"
    #: Refused: the queue holds ``max_waiting`` claims (``enqueue``); nothing was recorded.
    FULL = "full"
    #: Refused: the claim's ``seq`` is not above the newest one accepted for the key; nothing
    #: was recorded and nobody was cancelled.
    STALE = "stale"


@final
@dataclass(frozen=True, slots=True)
class Acquired:
    """The result of :meth:`Backend.acquire`.

    Attributes:
        admission: what happened to the claim.
        generation: for an accepted claim (``RUNNING`` or ``WAITING``), a fencing number
            strictly greater than that of every earlier claim on the key (numbers come from
            one counter per backend, so they are not consecutive); ``0`` for a refused one.
        source: for ``STALE``, the holder that brought the newest sequence number (it may
            have finished already); else ``None``.
        seq: for ``STALE``, the newest sequence number accepted for the key; else ``None``.

    .. versionadded:: 0.1
    """

    admission: Admission
    generation: int = 0
    source: str | None = None
    seq: int | None = None


_new = object.__new__
# The slots' own setters: they skip the frozen dataclass's __setattr__ (as its __init__ does).
_set_admission, _set_generation, _set_source, _set_seq = (
    Acquired.__dict__[name].__set__ for name in ("admission", "generation", "source", "seq")
)


def _running(generation: int) -> Acquired:
    """Return ``Acquired(Admission.RUNNING, generation)``, without the dataclass ``__init__``."""
    acquired: Acquired = _new(Acquired)
    _set_admission(acquired, Admission.RUNNING)
    _set_generation(acquired, generation)
    _set_source(acquired, None)
    _set_seq(acquired, None)
    return acquired


class Backend(Protocol):
    """Where the shared state of the primitives lives (see the module docs for the rules).

    The in-memory :class:`~cancelkit.backends.MemoryBackend` is the default. ``owner`` is
    ``None`` or a string; ``(owner, id)`` pairs are separate namespaces: a registration,
    tombstone or finished-marker under one owner is invisible to every other owner, and a
    cancel of an id that runs for another owner answers ``NOT_FOUND`` and writes nothing.

    .. versionadded:: 0.1
    """

    # -- TokenRegistry -----------------------------------------------------------------

    async def register(
        self, id: str, owner: str | None, holder: str, deliver: Deliver
    ) -> CancelReason | None:
        """Register ``holder`` as the running operation ``(owner, id)``.

        Atomically: if a live tombstone exists for ``(owner, id)``, record nothing and return
        its reason (the operation must not start); the tombstone stays until it expires, so
        every start of that id before then (a client's retry too) is refused the same way.
        Otherwise record the registration (forgetting any finished-marker) and return ``None``.

        Raises:
            OperationExists: if ``(owner, id)`` is already registered by another holder.
            RegistryFull: never for a registration; only :meth:`cancel` writes tombstones.
        """
        ...

    async def unregister(self, id: str, owner: str | None, holder: str) -> CancelReason | None:
        """Remove the registration of ``(owner, id)`` if ``holder`` still holds it.

        Must complete even when the caller is being cancelled (see the module docs). Leaves a
        finished-marker with the tombstone TTL (best effort: the oldest markers are
        dropped when the tombstone limit needs the room), so that a late :meth:`cancel`
        answers :attr:`cancelkit.CancelOutcome.NOT_FOUND` instead of writing a tombstone.

        Returns:
            The reason of a :meth:`cancel` that answered ``CANCELLED`` for this holder (its
            delivery may not have arrived yet), unless the holder committed; else ``None``.
            The caller reports that cancellation instead of a success. A backend that cannot
            tell (the server unreachable) returns ``None``.
        """
        ...

    async def commit(self, id: str, owner: str | None, holder: str) -> CancelReason | None:
        """Decide between the commit of ``holder``'s registration and any cancel of it.

        Atomically: if a cancel was recorded for this registration (a :meth:`cancel` that
        answered ``CANCELLED``, a tombstone it started with), return that reason and change
        nothing; else mark the registration committed and return ``None``: from then on
        :meth:`cancel` answers ``COMMITTED``, delivers nothing and writes no tombstone.
        Idempotent. If the registration is held by another holder now (this one's lease
        lapsed and the id was started again), return a reason: this one must stop.
        """
        ...

    async def cancel(self, id: str, owner: str | None, reason: CancelReason) -> CancelOutcome:
        """Cancel ``(owner, id)``.

        Atomically: if it is registered, deliver ``reason`` to its holder and return
        ``CANCELLED``; if the same id is registered for another owner, return ``NOT_FOUND``
        and write nothing (someone else's work looks absent and cannot be pre-cancelled);
        if a finished-marker exists, return ``NOT_FOUND``; if a tombstone exists,
        keep it (the first reason wins) and return ``PENDING``; else write a tombstone with
        ``reason`` and return ``PENDING``.

        Raises:
            RegistryFull: if a new tombstone is needed and the tombstone limit is reached.
        """
        ...

    # -- LatestOnly --------------------------------------------------------------------

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
        """Admit ``holder`` to ``key``: the whole decision is one atomic step.

        A key's claims are *running* (holding one of its ``limit`` slots), *waiting* (queued
        for a slot) or *superseded* (told to stop, not yet released); all of them stay
        recorded, oldest first, until :meth:`release`. Atomically:

        1. If ``seq`` is given and not above the newest sequence number accepted for the key
           (remembered for a while after the key was released), return ``STALE`` with that
           number and its holder, and change nothing.
        2. With ``n`` running claims and ``w`` waiting ones: run if ``n < limit``; else by
           the parts of ``policy`` (a :class:`~cancelkit.Policy`; a part the backend does not
           know raises ``ValueError``, it never falls back to another behaviour):

           - ``when_busy="supersede"``: run, and the oldest running claim is superseded.
           - ``when_busy="refuse"``: return ``BUSY``.
           - ``when_busy="wait"``: wait at the back of the queue if ``w <
             policy.max_waiting``; else, ``when_full="supersede"``: the oldest waiting claim
             is superseded and the newcomer waits; ``when_full="refuse"``: return ``FULL``.

           A superseded claim gets ``deliver(CancelReason(SUPERSEDED, source=holder))``.
        3. An accepted claim gets a new generation, and its ``seq`` (if any) becomes the
           key's newest.

        When a running claim is released and claims wait, the oldest waiting one runs.
        ``policy`` and ``limit`` must be the same for every claim on a key.
        A committed claim (:meth:`commit_claim`) can still be superseded (it stops being
        current and its slot goes to the newcomer); it must then not be interrupted. A backend
        may deliver it nothing (the memory backend) or the ``SUPERSEDED`` reason (Redis: the
        decision is the server's, the commit is kept by the worker's token), which the
        primitive ignores once the claim committed.
        """
        ...

    async def release(self, key: str, holder: str) -> CancelReason | None:
        """Forget ``holder``'s claim on ``key`` (whatever its state), promoting a waiter.

        Must complete even when the caller is being cancelled (see the module docs). When no
        claim on the key remains, only its newest sequence number is left, and that expires.

        Returns:
            The ``SUPERSEDED`` reason (the newcomer as ``source``) if the claim had been
            superseded (its delivery may not have arrived yet; for a committed claim the
            primitive ignores it), else ``None`` (also when the backend cannot tell).
        """
        ...

    async def commit_claim(self, key: str, holder: str) -> CancelReason | None:
        """Decide between the commit of ``holder``'s claim and its supersession.

        Atomically: if the claim was superseded (or is no longer recorded: it lost its
        place), return the ``SUPERSEDED`` reason with the newcomer as ``source`` and change
        nothing; else mark it committed and return ``None`` (a newer claim then takes its
        slot without interrupting it). Idempotent.
        """
        ...

    async def wait_turn(self, key: str, holder: str, *, handover: bool) -> None:
        """Return once ``holder``'s body may start.

        That is once the claim runs (not waiting) and, with ``handover``, fewer than
        ``limit`` claims acquired before it and not waiting are unreleased, so that at most
        ``limit`` bodies (with their cleanup) overlap. Returns at once for a holder that is
        not recorded. Callers bound the wait and cancel it with their own scopes.
        """
        ...

    async def is_current(self, key: str, generation: int) -> bool:
        """Whether the claim with ``generation`` runs on ``key``.

        That is: accepted, not waiting, not superseded, not released (with ``limit == 1``:
        it is the newest claim).
        """
        ...
