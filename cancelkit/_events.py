"""The event seam: one report per cancellation, refusal and commit, for whoever listens.

The primitives call :func:`report` at their exits, behind one check of :data:`listeners`
(an empty list when nobody listens: the whole cost then). A cancellation is reported once,
by the innermost unit of work it stopped: a claim or an operation inside a request reports
the client's disconnect, and the request, whose token's cancellation reached the operation's
(:attr:`~cancelkit.CancellationToken.cancelled_by`), stays silent; units side by side that
one cause stopped (the operations of a shutdown, of one parent token) report one each. A
listener's exception is logged and never reaches the work.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, final

from ._reason import CancelReason

if TYPE_CHECKING:
    from ._token import CancellationToken

__all__ = ["CancelEvent", "add_listener", "listeners", "log_events", "report"]

logger = logging.getLogger("cancelkit")

What = Literal["cancelled", "refused", "committed"]
Where = Literal["request", "claim", "operation"]

#: The listeners (see :func:`add_listener`); read as a truth value at every exit.
listeners: list[Callable[[CancelEvent], object]] = []

#: The ASGI scopes of the requests running while a listener listens, by their tokens (the
#: route of the request an inner unit served); each removed at its request's end.
requests: dict[CancellationToken, MutableMapping[str, Any]] = {}

#: A claim's or an operation's token -> the request token that cancels it by a callback
#: (the FastAPI adapters' relay, which is no ``cancelled_by`` link); weak both ways.
relayed: weakref.WeakKeyDictionary[CancellationToken, CancellationToken] = (
    weakref.WeakKeyDictionary()
)

#: Called with the reason at the end of a request whose cancellation an inner unit reported
#: (private: so that :mod:`cancelkit.otel` still gives the request's span its HTTP status).
silent_requests: list[Callable[[CancelReason], object]] = []

#: The tokens reported, and those whose cancellation reached them (their ``cancelled_by``
#: chain): a unit whose token is here stays silent. Weak: an entry lives as its token does.
_covered: weakref.WeakSet[CancellationToken] = weakref.WeakSet()


@final
@dataclass(frozen=True, slots=True)
class CancelEvent:
    """What one cancellation, refusal or commit was, given to every listener once.

    Attributes:
        what: ``"cancelled"`` (the work was stopped), ``"refused"`` (it never started:
            stale, busy, full, exists) or ``"committed"`` (it passed its commit
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
        route: the route template of the request the work served (for a request, its
            ``name``), when known: for a claim or an operation, that of the request whose
            cancellation reached it.

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
    route: str | None = None


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
    """Report ``token``'s work: cancelled (once per innermost unit), refused or committed.

    Call it only when :data:`listeners` is not empty. A cancellation is reported if the
    token has a reason and neither it nor a token its cancellation reached was reported
    yet; a refusal or a commit always.
    """
    from ._signal import cancelled_at

    now = time.monotonic()
    reason = token.reason
    root = None if reason is None else reason.root
    route = name if where == "request" else None
    if what == "cancelled":
        if root is None:
            return
        if token in _covered:
            if where == "request":
                _call(silent_requests, root)
            return
        stopped: CancellationToken | None = token
        while stopped is not None:  # the whole chain: a sibling reported part of it already
            _covered.add(stopped)
            scope = requests.get(stopped)
            if route is None and scope is not None:
                route = route_of(scope)
            served = stopped.cancelled_by
            if served is None:  # relayed by a callback (the FastAPI adapters), not linked
                served = relayed.get(stopped)
                if served is not None and not served.cancelled:
                    served = None  # (stopped on its own: the request goes on)
            stopped = served
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
        route=route,
    )
    _call(listeners, event)


def _call(functions: list[Callable[[Any], object]], argument: object) -> None:
    for function in tuple(functions):
        try:
            function(argument)
        except Exception:
            logger.exception("a cancelkit event listener failed on %r", argument)


def route_of(scope: MutableMapping[str, Any]) -> str | None:
    """The template of the route that served ``scope`` (never the raw path: bounded labels)."""
    return getattr(scope.get("route"), "path", None)


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
    "route",
)


def log_events(level: int = logging.INFO) -> Callable[[], None]:
    """Log one line per cancellation, refusal and commit on the ``cancelkit.events`` logger.

    Each record carries the event's fields as attributes (``record.cancel_what``,
    ``record.cancel_kind``, ``record.cancel_where``, ``record.cancel_name``,
    ``record.cancel_owner``, ``record.cancel_source``, ``record.cancel_to_exit``,
    ``record.cancel_ran_for``: seconds, or ``None``; ``record.cancel_route``), so a
    structured formatter (structlog's ``ProcessorFormatter`` with ``ExtraAdder``, a JSON
    formatter) keeps them as fields; the message says the same in words.

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
