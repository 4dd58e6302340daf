"""The status of a background operation: its state, error, progress, and their JSON form.

Plain values shared by the runtime (:class:`~cancelkit.BackgroundOperations`), the status
stores (:mod:`cancelkit.backends`, ``cancelkit.redis``) and the HTTP adapters.

.. versionadded:: 0.1
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, final

from ._reason import CancelKind, CancelReason

__all__ = ["OperationError", "OperationState", "OperationStatus", "Progress"]

_MAX_TEXT = 1000  # characters kept of an error message or a progress message


@final
class OperationState(enum.StrEnum):
    """Where a background operation is in its life.

    .. versionadded:: 0.1
    """

    #: Started and not ended yet.
    RUNNING = "running"
    #: The function returned; its result (as kept) is in :attr:`OperationStatus.result`.
    COMPLETED = "completed"
    #: The function raised; :attr:`OperationStatus.error` has the type and message.
    FAILED = "failed"
    #: Stopped by a cancellation; :attr:`OperationStatus.reason` says why.
    CANCELLED = "cancelled"
    #: The worker that ran it stopped answering before it ended (killed, crashed,
    #: partitioned): its outcome is unknown. Only a shared store (Redis) can report this.
    LOST = "lost"

    @property
    def ended(self) -> bool:
        """Whether the operation is over (every state but :attr:`RUNNING`)."""
        return self is not OperationState.RUNNING


@final
@dataclass(frozen=True, slots=True)
class OperationError:
    """Why an operation failed: the exception's type name and message, never a traceback.

    Attributes:
        type_name: the exception's class name, e.g. ``"ValueError"`` (``"type"`` in JSON).
        message: ``str(exc)``, cut to 1000 characters.

    .. versionadded:: 0.1
    """

    type_name: str
    message: str


@final
@dataclass(frozen=True, slots=True)
class Progress:
    """A progress report of a running operation (see :meth:`BackgroundOperations.report`).

    Attributes:
        done: how much is done, in the operation's own unit (rows, bytes, percent...).
        total: how much there is in all, if known.
        message: a short human-readable note (cut to 1000 characters).

    .. versionadded:: 0.1
    """

    done: float
    total: float | None = None
    message: str | None = None


@final
@dataclass(frozen=True, slots=True)
class OperationStatus:
    """What is known about one background operation, from :meth:`BackgroundOperations.status`.

    Attributes:
        id: the operation's id.
        owner: the owner it runs for.
        state: running, completed, failed, cancelled, or lost.
        started_at: when it started, as :func:`time.time`.
        ended_at: when it ended (``None`` while running, and for a lost operation).
        result: for a completed operation, its result as the application chose to keep it
            (by default the return value if it is JSON-serializable, else ``None``).
        error: for a failed operation, the error's type and message; for a lost one, an
            error of type ``WorkerLost`` saying which worker stopped answering.
        reason: for a cancelled operation, why.
        progress: the latest progress report, if the operation made any.
        worker: the worker that runs it, when the store knows one (Redis), else ``None``.

    .. versionadded:: 0.1
    """

    id: str
    owner: str | None
    state: OperationState
    started_at: float
    ended_at: float | None = None
    result: Any = None
    error: OperationError | None = None
    reason: CancelReason | None = None
    progress: Progress | None = None
    worker: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the status as a JSON-serializable dict (the HTTP body, the Redis value)."""
        return {
            "id": self.id,
            "owner": self.owner,
            "state": self.state.value,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "result": self.result,
            "error": None
            if self.error is None
            else {"type": self.error.type_name, "message": self.error.message},
            "reason": None if self.reason is None else _reason_to_json(self.reason),
            "progress": None
            if self.progress is None
            else {
                "done": self.progress.done,
                "total": self.progress.total,
                "message": self.progress.message,
            },
            "worker": self.worker,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OperationStatus:
        """Rebuild a status from :meth:`to_json`'s output."""
        error, reason, progress = data.get("error"), data.get("reason"), data.get("progress")
        return cls(
            id=data["id"],
            owner=data.get("owner"),
            state=OperationState(data["state"]),
            started_at=data["started_at"],
            ended_at=data.get("ended_at"),
            result=data.get("result"),
            error=None if error is None else OperationError(error["type"], error["message"]),
            reason=None if reason is None else _reason_from_json(reason),
            progress=None
            if progress is None
            else Progress(progress["done"], progress.get("total"), progress.get("message")),
            worker=data.get("worker"),
        )


def _reason_to_json(reason: CancelReason) -> dict[str, Any]:
    data: dict[str, Any] = {"kind": reason.kind.value, "message": reason.message, "at": reason.at}
    if reason.source is not None:
        data["source"] = reason.source
    if reason.origin is not None:
        data["origin"] = _reason_to_json(reason.origin)
    return data


def _reason_from_json(data: Mapping[str, Any]) -> CancelReason:
    origin = data.get("origin")
    return CancelReason(
        CancelKind(data["kind"]),
        message=data.get("message", ""),
        source=data.get("source"),
        origin=None if origin is None else _reason_from_json(origin),
        at=data.get("at", 0.0),
    )


def _check_json(value: object) -> None:
    """Raise TypeError or ValueError unless ``value`` is JSON that every store can carry."""
    json.dumps(value, allow_nan=False, ensure_ascii=False).encode()  # no NaN, no lone surrogate


def _progress(done: float, total: float | None, message: str | None) -> Progress:
    """A progress report, or ValueError for a number JSON cannot carry (inf, NaN)."""
    for name, value in (("done", done), ("total", total)):
        number: object = value
        if number is not None and not (
            isinstance(number, int | float)
            and not isinstance(number, bool)
            and math.isfinite(number)
        ):
            raise ValueError(f"progress {name} must be a finite number, not {value!r}")
    return Progress(done, total, None if message is None else _cut(message))


def _cut(text: str) -> str:
    r"""Return ``text`` cut to 1000 characters, with lone surrogates escaped.

    A lone surrogate (a file name decoded with ``surrogateescape``) becomes ``\udcxx``, so
    every store and every JSON answer can carry the text.
    """
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 1] + "…"
