"""Why work was stopped: the reason kinds and the reason value."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import final

__all__ = ["CancelKind", "CancelReason"]


@final
class CancelKind(enum.StrEnum):
    """What stopped a piece of work.

    - ``REQUESTED``: somebody asked for it: ``token.cancel()``, a cancel-by-id request, a Stop
      button.
    - ``SUPERSEDED``: a newer claim on the same latest-only key replaced this one.
    - ``CLIENT_DISCONNECTED``: the HTTP client went away before the response was complete.
    - ``DEADLINE``: the token's deadline passed; never used for any other cause.
    - ``SHUTDOWN``: the server or the application is shutting down.
    - ``PARENT``: a token this one is linked to was cancelled; :attr:`CancelReason.origin`
      says why.

    .. versionadded:: 0.1
    """

    REQUESTED = "requested"
    SUPERSEDED = "superseded"
    CLIENT_DISCONNECTED = "client_disconnected"
    DEADLINE = "deadline"
    SHUTDOWN = "shutdown"
    PARENT = "parent"


_DEFAULT_MESSAGES = {
    CancelKind.REQUESTED: "cancellation was requested",
    CancelKind.SUPERSEDED: "superseded by a newer request",
    CancelKind.CLIENT_DISCONNECTED: "the client disconnected",
    CancelKind.DEADLINE: "the deadline passed",
    CancelKind.SHUTDOWN: "the application is shutting down",
    CancelKind.PARENT: "a linked token was cancelled",
}


@final
@dataclass(frozen=True, slots=True)
class CancelReason:
    """Why a token was cancelled: a small immutable value.

    Args:
        kind: what stopped the work.
        message: a human-readable explanation; a default for the kind when empty.
        source: who caused it, when known: the id of the superseding claim, of the canceller,
            of the worker.
        origin: for :attr:`CancelKind.PARENT`, the reason of the linked token that fired.
        at: when it happened, as :func:`time.time` (wall clock, for logs).

    .. versionadded:: 0.1
    """

    kind: CancelKind = CancelKind.REQUESTED
    message: str = ""
    source: str | None = None
    origin: CancelReason | None = None
    at: float = field(default_factory=time.time, compare=False)

    def __post_init__(self) -> None:
        kind: object = self.kind
        message: object = self.message
        source: object = self.source
        if not isinstance(kind, CancelKind):
            try:
                object.__setattr__(self, "kind", CancelKind(kind))  # type: ignore[arg-type]
            except ValueError:
                kinds = ", ".join(repr(k.value) for k in CancelKind)
                raise ValueError(
                    f"unknown cancel reason kind {kind!r}; expected one of {kinds}"
                ) from None
        if not isinstance(message, str):
            raise TypeError(f"message must be a str, not {type(message).__name__}")
        if source is not None and not isinstance(source, str):
            raise TypeError(f"source must be a str or None, not {type(source).__name__}")
        if not self.message:
            object.__setattr__(self, "message", _DEFAULT_MESSAGES[self.kind])

    @property
    def root(self) -> CancelReason:
        """The first reason in the chain of :attr:`CancelReason.origin` links: what happened."""
        reason = self
        while reason.origin is not None:
            reason = reason.origin
        return reason

    def __str__(self) -> str:
        text = f"{self.kind.value}: {self.message}"
        if self.source is not None:
            text += f" (source: {self.source})"
        if self.origin is not None:
            text += f" <- {self.origin}"
        return text


_new = object.__new__
_time = time.time
# The slots' own setters: they skip the frozen dataclass's __setattr__ (as its __init__ does).
_set_kind, _set_message, _set_source, _set_origin, _set_at = (
    CancelReason.__dict__[name].__set__ for name in ("kind", "message", "source", "origin", "at")
)


def _fast_reason(
    kind: CancelKind, source: str | None = None, origin: CancelReason | None = None
) -> CancelReason:
    """Return ``CancelReason(kind, source=source, origin=origin)`` for arguments known valid.

    For cancelkit's own hot paths (a supersede, a plain ``cancel()``, a parent's relay): the
    same value as the public constructor gives, without the dataclass ``__init__``, its
    ``default_factory`` call and the checks of ``__post_init__`` (about half the cost).
    """
    reason: CancelReason = _new(CancelReason)
    _set_kind(reason, kind)
    _set_message(reason, _DEFAULT_MESSAGES[kind])
    _set_source(reason, source)
    _set_origin(reason, origin)
    _set_at(reason, _time())
    return reason
