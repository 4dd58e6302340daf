"""A request's deadline between HTTP hops: the header, read (incoming) and written (outgoing).

The deadline travels as the time that is *left*, in whole milliseconds, never as a wall-clock
instant: the two hosts' clocks need not agree, and each hop re-anchors the duration on its own
monotonic clock when the request arrives. The sender keeps 4 milliseconds for the answer's
way back and floors the rest, so that the next hop gives up just before this one does.

One header is sent: ``Request-Timeout-Ms`` (a plain duration whose unit is in its name, with no
``X-`` prefix (RFC 6648); the name users asked for in openai-python#3277). Three spellings are
read, and the smallest wins:

- ``Request-Timeout-Ms: 1500``: 1 to 8 ASCII digits, milliseconds;
- ``X-Envoy-Expected-Rq-Timeout-Ms: 1500``: what Envoy tells the service behind it about its
  own route timeout (same format), so the service gives up when Envoy does;
- ``grpc-timeout: 1500m``: gRPC's format, 1 to 8 ASCII digits and a unit (``H`` hours, ``M``
  minutes, ``S`` seconds, ``m`` milliseconds, ``u`` microseconds, ``n`` nanoseconds).

``grpc-timeout`` is not *sent*: gRPC proxies act on it (Envoy rewrites the route's timeout
from it), and a plain HTTP request should not look like a gRPC call to them.

A value that is not in these formats (a sign, a decimal point, a space inside, more than 8
digits, non-ASCII digits, a list of values) is ignored, with one log line per request. The
header can only shorten the server's own maximum, never extend it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

__all__ = ["EXPIRED_HEADER", "HEADER", "header_value", "parse_deadline"]

logger = logging.getLogger("cancelkit")

#: The header an outgoing request carries: the milliseconds left of its deadline.
HEADER = "Request-Timeout-Ms"
#: The header of a ``504`` answer whose deadline expired (``Deadline-Expired: true``): the
#: caller's budget is spent, so a retry with the same budget cannot succeed.
EXPIRED_HEADER = "Deadline-Expired"

_MS_NAMES = frozenset((b"request-timeout-ms", b"x-envoy-expected-rq-timeout-ms"))
_GRPC = b"grpc-timeout"
_NAMES = _MS_NAMES | {_GRPC}
_GRPC_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_MAX_DIGITS = 8
_MAX_MS = 10**_MAX_DIGITS - 1  # what 8 digits can say: about 27.8 hours
_SHOWN = 40  # bytes of a rejected value that the log line shows
#: Milliseconds a sender keeps for its answer's way back: the next hop's deadline is earlier by
#: that much, so that its 504 arrives before the sender's own deadline cuts the call off.
RETURN_MS = 4


def _seconds(name: bytes, value: bytes) -> float | None:
    """The seconds one header value gives, or ``None`` if it is malformed."""
    value = value.strip(b" \t")
    if name == _GRPC:
        scale = _GRPC_UNITS.get(value[-1:])
        if scale is None:
            return None
        value = value[:-1]
    else:
        scale = 1e-3
    # bytes.isdigit() is ASCII only: no other script's digits, no sign, "_", space or "1.0"
    if not 0 < len(value) <= _MAX_DIGITS or not value.isdigit():
        return None
    return int(value) * scale


def parse_deadline(
    headers: Iterable[tuple[bytes, bytes]], maximum: float | None = None
) -> float | None:
    """Return how many seconds a request may run: its smallest deadline header, capped.

    A pure function of the request's headers (ASGI's list of lowercased names and values) and
    the server's own maximum; nothing is raised for any header value.

    Args:
        headers: the request's headers (``scope["headers"]``).
        maximum: the server's own limit in seconds; ``None``: none.

    Returns:
        The smallest of ``maximum`` and every well-formed deadline header, in seconds (``0``:
        nothing is left), or ``None`` when there is neither a maximum nor such a header.
    """
    budget = maximum
    rejected: tuple[bytes, bytes] | None = None
    names = _NAMES  # (a local: this loop runs for every guarded request)
    for name, value in headers:
        if name in names:
            seconds = _seconds(name, value)
            if seconds is None:
                if rejected is None:
                    rejected = (name, value)
            elif budget is None or seconds < budget:
                budget = seconds
    if rejected is not None:
        name, value = rejected
        shown = value[:_SHOWN] + (b"..." if len(value) > _SHOWN else b"")
        logger.warning("ignored a malformed deadline header %s: %r", name.decode(), shown)
    return budget


def header_value(remaining: float) -> str:
    """The :data:`HEADER` value for ``remaining`` seconds: whole milliseconds, less 4.

    Less :data:`RETURN_MS` for its answer's way back, and floored: the next hop gives up a
    moment *before* this one, so that this hop gets its ``504`` instead of cutting it off.
    At most 8 digits (a longer deadline is sent as 99999999 ms, about 27.8 hours); never
    negative.
    """
    ms = remaining * 1000 - RETURN_MS
    if ms <= 0:
        return "0"
    return str(math.floor(min(ms, _MAX_MS)))
