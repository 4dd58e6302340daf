"""shielded_cleanup: a bounded shield for the cleanup of interrupted work (a general helper)."""

from __future__ import annotations

import anyio

__all__ = ["shielded_cleanup"]


def shielded_cleanup(timeout: float = 5.0) -> anyio.CancelScope:
    """Return a cancel scope for cleanup that must run even in an interrupted handler.

    ``with shielded_cleanup(2.0): await tx.rollback()`` shields the block from the
    cancellation that interrupted the handler, but never for longer than ``timeout`` seconds:
    after that the block is cancelled and execution continues after it
    (check ``cancelled_caught`` on the returned scope).

    Args:
        timeout: the most seconds the cleanup may take.

    Raises:
        ValueError: if ``timeout`` is negative.

    .. versionadded:: 0.1
    """
    if timeout < 0:
        raise ValueError(f"timeout must be >= 0, not {timeout!r}")
    return anyio.move_on_after(timeout, shield=True)
