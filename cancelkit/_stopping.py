"""Hear the process being asked to stop before the server lets go of its requests.

uvicorn and hypercorn stop on SIGTERM and SIGINT by first waiting for every open request to
end, and only then send ``lifespan.shutdown``. A request that waits on purpose (a long-poll, a
stream) therefore holds the whole shutdown, up to its own limit, before any grace period even
starts. :func:`on_stop_signal` chains a handler in front of the server's own, so that such
waits can end at once; the server's handler then runs as before.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

from ._loop import call_soon, this_loop

__all__ = ["on_stop_signal"]

#: The signals servers treat as "stop gracefully".
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def on_stop_signal(callback: Callable[[], object]) -> Callable[[], None]:
    """Call ``callback`` in this event loop when the process gets SIGTERM or SIGINT.

    The handler installed before (the server's) still runs, after the callback is scheduled;
    a signal that had no Python handler keeps its default effect. Call it from the event
    loop; outside the main thread (where Python cannot handle signals) it does nothing.

    Returns:
        A function that removes the handler (idempotent). If another handler was chained in
        front of this one meanwhile, it stays and only stops scheduling the callback.
    """
    loop = this_loop()
    if loop is None or threading.current_thread() is not threading.main_thread():
        return _nothing
    previous: dict[int, object] = {}
    active = [True]

    def handler(signum: int, frame: FrameType | None) -> None:
        if active[0]:
            try:
                call_soon(loop, callback)  # signal-safe: a deque append and a wakeup write
            except RuntimeError:  # that loop has finished
                active[0] = False
        before = previous[signum]
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:  # what the signal would have done: do it now
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    for signum in STOP_SIGNALS:
        before = signal.getsignal(signum)
        if before is None:  # a handler installed outside Python: leave it alone
            continue
        previous[signum] = before
        signal.signal(signum, handler)

    def remove() -> None:
        active[0] = False
        for signum, before in previous.items():
            if signal.getsignal(signum) is handler:
                signal.signal(signum, before)  # type: ignore[arg-type]  # what getsignal gave

    return remove


def _nothing() -> None:
    return None
