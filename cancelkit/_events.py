"""The event seam: one report per cancellation, refusal and commit, for whoever listens.

The primitives call :func:`report` at their exits, behind one check of :data:`listeners`
(an empty list when nobody listens: the whole cost then). A cancellation is reported once,
by the innermost unit of work it stopped: a claim or an operation inside a request reports
the client's disconnect, and the request, whose token's reason has the same root, stays
silent. A listener's exception is logged and never reaches the work.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, final

from ._reason import CancelReason

if TYPE_CHECKING:
    from ._token import CancellationToken

__all__ = ["CancelEvent", "add_listener", "listeners", "log_events", "report"]

logger = logging.getLogger("cancelkit")

What = Literal["cancelled", "refused", "committed"]
Where = Literal["request", "claim", "operation"]

#: The listeners (see :func:`add_listener`); read as a truth value at every exit.
listeners: list[Callable[[CancelEvent], object]] = []

#: The roots reported lately (by identity), so that a root is reported once.
_reported: OrderedDict[int, CancelReason] = OrderedDict()
_REMEMBERED = 4096


@final
@dataclass(frozen=True, slots=True)
class CancelEvent:
    """What one cancellation, refusal or commit was, given to every listener once.

    Attributes:
        what: ``"cancelled"`` (the work was stopped), ``"refused"`` (it never started:
            stale, busy, full, exists, unavailable) or ``"committed"`` (it passed its commit
            point).
        kind: the root reason's kind (``"superseded"``, ``"requested"``, ``"deadline"``,
            ``"shutdown"``, ``"client_disconnected"``), or for a refusal ``"stale"``,
            ``"busy"``, ``"full"`` or ``"exists"``, or ``"committed"``.
        where: the unit of work: ``"request"``, ``"claim"`` or ``"operation"``.
        name: the claim's key or the operation's id; for a request, its route template
            when the framework knows it (never the raw path: bounded label sets), else
            ``None``.
        owner: the operation's owner, if any.
        reason: the root :class:`~cancelkit.CancelReason`, or ``None`` for a refusal or a
            commit.
        source: the reason's source (the claim or operation that caused it), if any.
        cancel_to_exit: seconds from the moment this process learned of the cancellation
            to the work's exit (``None`` if it was not learned here while a listener
            listened).
        ran_for: seconds the work had run when it exited (``None`` if unknown).

    .. versionadded:: 0.1
    """

    what: Literal["cancelled", "refused", "committed"]
    kind: str
    where: Literal["request", "claim", "operation"]
    name: str | None = None
    owner: str | None = None
    reason: CancelReason | None = None
    source: str | None = None
    cancel_to_exit: float | None = None
    ran_for: float | None = None


def add_listener(listener: Callable[[CancelEvent], object]) -> Callable[[], None]:
    """Call ``listener(event)`` for every cancellation, refusal and commit in this process.

    Listeners run synchronously, where the work exits, in the order they were added: keep
    them quick (count, log, record a span event). An exception a listener raises is logged
    on the ``cancelkit`` logger and goes no further.

    Args:
        listener: a callable taking a :class:`CancelEvent`.

    Returns:
        A function that removes the listener (calling it twice does nothing).

    .. versionadded:: 0.1
    """
    if not callable(listener):
        raise TypeError(f"listener must be callable, not {type(listener).__name__}")
    listeners.append(listener)

    def remove() -> None:
        if listener in listeners:
            listeners.remove(listener)

    return remove


def report(
    where: Where,
    token: CancellationToken,
    name: str | None = None,
    owner: str | None = None,
    *,
    started: float | None = None,
    what: What = "cancelled",
    kind: str | None = None,
) -> None:
    """Report ``token``'s work: cancelled (once per root reason), refused or committed.

    Call it only when :data:`listeners` is not empty. A cancellation is reported if the
    token has a reason whose root was not reported yet; a refusal or a commit always.
    """
    from ._signal import cancelled_at

    now = time.monotonic()
    reason = token.reason
    root = None if reason is None else reason.root
    if what == "cancelled":
        if root is None or _reported.get(id(root)) is root:
            return
        _reported[id(root)] = root
        if len(_reported) > _REMEMBERED:
            _reported.popitem(last=False)
        kind = root.kind.value
    learned = cancelled_at(token)
    event = CancelEvent(
        what=what,
        kind=kind or what,
        where=where,
        name=name,
        owner=owner,
        reason=root if what == "cancelled" else None,
        source=None if root is None else root.source,
        cancel_to_exit=None if learned is None or what != "cancelled" else now - learned,
        ran_for=None if started is None else now - started,
    )
    for listener in tuple(listeners):
        try:
            listener(event)
        except Exception:
            logger.exception("a cancelkit event listener failed on %r", event)


#: The fields of a :class:`CancelEvent`, as the ``extra`` of a :func:`log_events` record.
FIELDS = (
    "what",
    "kind",
    "where",
    "name",
    "owner",
    "source",
    "cancel_to_exit",
    "ran_for",
)


def log_events(level: int = logging.INFO) -> Callable[[], None]:
    """Log one line per cancellation, refusal and commit on the ``cancelkit.events`` logger.

    Each record carries the event's fields as attributes (``record.cancel_what``,
    ``record.cancel_kind``, ``record.cancel_where``, ``record.cancel_name``,
    ``record.cancel_owner``, ``record.cancel_source``, ``record.cancel_to_exit``,
    ``record.cancel_ran_for``; seconds, or ``None``), so a structured formatter (structlog's
    ``ProcessorFormatter`` with ``ExtraAdder``, a JSON formatter) keeps them as fields; the
    message says the same in words.

    Args:
        level: the records' level (``logging.INFO`` by default).

    Returns:
        A function that stops the logging.

    .. versionadded:: 0.1
    """
    log = logging.getLogger("cancelkit.events")

    def listener(event: CancelEvent) -> None:
        if not log.isEnabledFor(level):
            return
        extra = {f"cancel_{field}": getattr(event, field) for field in FIELDS}
        extra["cancel_to_exit"] = extra.pop("cancel_cancel_to_exit")
        log.log(level, "%s", _words(event), extra=extra)

    return add_listener(listener)


def _words(event: CancelEvent) -> str:
    text = f"{event.where} {event.name or '-'} {event.what}: {event.kind}"
    if event.owner is not None:
        text += f" (owner {event.owner})"
    if event.source is not None:
        text += f" by {event.source}"
    if event.cancel_to_exit is not None:
        text += f"; exited {event.cancel_to_exit * 1000:.1f} ms after the cancel"
    if event.ran_for is not None:
        text += f"; had run {event.ran_for * 1000:.1f} ms"
    return text
