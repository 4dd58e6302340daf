"""Cancel reasons on the wire (compact JSON) and handing them to local holders."""

from __future__ import annotations

import json
import logging
from typing import Any

from .._reason import CancelKind, CancelReason
from ..backends import Deliver

__all__ = ["deliver", "dump", "load"]

logger = logging.getLogger("cancelkit.redis")


def dump(reason: CancelReason) -> str:
    """Encode a reason as compact JSON (what the scripts store and publish)."""
    return json.dumps(_encode(reason), separators=(",", ":"))


def _encode(reason: CancelReason) -> dict[str, Any]:
    data: dict[str, Any] = {"k": reason.kind.value, "m": reason.message, "a": reason.at}
    if reason.source is not None:
        data["s"] = reason.source
    if reason.origin is not None:
        data["o"] = _encode(reason.origin)
    return data


def load(text: str) -> CancelReason:
    """Decode what :func:`dump` wrote."""
    return _decode(json.loads(text))


def _decode(data: dict[str, Any]) -> CancelReason:
    origin = data.get("o")
    return CancelReason(
        CancelKind(data["k"]),
        message=data["m"],
        source=data.get("s"),
        origin=None if origin is None else _decode(origin),
        at=data["a"],
    )


def deliver(callback: Deliver, reason: CancelReason) -> None:
    """Call a holder's deliver callback; its errors are logged, never raised into the backend."""
    try:
        callback(reason)
    except Exception:
        logger.exception("a deliver callback failed")
