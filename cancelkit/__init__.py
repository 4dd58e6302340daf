"""Stop web work nobody will read: superseded, cancelled and abandoned requests.

cancelkit is built on anyio, so everything here runs on asyncio and on trio.

Vocabulary (one word for each idea, across the code, the statistics and the docs):

- *interrupt*: the work's awaits are cancelled (an anyio cancel scope underneath);
  *signal*: only the token is cancelled and the work checks it. ``LatestOnly.claim()`` and
  ``TokenRegistry.track()`` interrupt; ``hold()`` on both only signals;
  ``CancelOnDisconnect(mode="interrupt" | "signal")``; ``token.scope()`` raises on exit and
  ``token.move_on()`` swallows (anyio's words).
- *running*: entered and its body started, not yet exited; *waiting*: entered, body not
  started yet (debounce, handover, a queue). Every ``statistics()`` uses these two words.
- *owner*: the tenant who may see and cancel an id; *holder*: the one claim or registration
  instance that holds a key or an id (never called owner).
- :func:`current_token` is the :class:`CancellationToken` of the work running in this
  context (a contextvar); ``anyio.lowlevel.current_token()`` is something else: the event
  loop's own token, for calling back into the loop from threads.
"""

from ._asgi import CancelOnDisconnect as CancelOnDisconnect
from ._asgi import DisconnectGuard as DisconnectGuard
from ._asgi import DisconnectOutcome as DisconnectOutcome
from ._asgi import DisconnectStatistics as DisconnectStatistics
from ._asgi import request_token as request_token
from ._cleanup import shielded_cleanup as shielded_cleanup
from ._events import CancelEvent as CancelEvent
from ._events import add_listener as add_listener
from ._events import log_events as log_events
from ._exceptions import BackendUnavailable as BackendUnavailable
from ._exceptions import CancelkitError as CancelkitError
from ._exceptions import OperationCancelled as OperationCancelled
from ._exceptions import OperationExists as OperationExists
from ._exceptions import RegistryFull as RegistryFull
from ._exceptions import SlotBusy as SlotBusy
from ._http import exception_handlers as exception_handlers
from ._latest import Claim as Claim
from ._latest import LatestOnly as LatestOnly
from ._latest import LatestOnlyStatistics as LatestOnlyStatistics
from ._operations import BackgroundOperations as BackgroundOperations
from ._operations import OperationsStatistics as OperationsStatistics
from ._policy import Policy as Policy
from ._reason import CancelKind as CancelKind
from ._reason import CancelReason as CancelReason
from ._registry import RegistryStatistics as RegistryStatistics
from ._registry import TokenRegistry as TokenRegistry
from ._registry import TrackedOperation as TrackedOperation
from ._signal import CallbackHandle as CallbackHandle
from ._status import OperationError as OperationError
from ._status import OperationState as OperationState
from ._status import OperationStatus as OperationStatus
from ._status import Progress as Progress
from ._token import CancellationToken as CancellationToken
from ._token import TokenScope as TokenScope
from ._token import TokenStatistics as TokenStatistics
from ._token import current_token as current_token
from .backends import CancelOutcome as CancelOutcome
from .backends import MemoryStatusStore as MemoryStatusStore
from .backends import StatusStore as StatusStore

__all__ = [
    "BackendUnavailable",
    "BackgroundOperations",
    "CallbackHandle",
    "CancelEvent",
    "CancelKind",
    "CancelOnDisconnect",
    "CancelOutcome",
    "CancelReason",
    "CancelkitError",
    "CancellationToken",
    "Claim",
    "DisconnectGuard",
    "DisconnectOutcome",
    "DisconnectStatistics",
    "LatestOnly",
    "LatestOnlyStatistics",
    "MemoryStatusStore",
    "OperationCancelled",
    "OperationError",
    "OperationExists",
    "OperationState",
    "OperationStatus",
    "OperationsStatistics",
    "Policy",
    "Progress",
    "RegistryFull",
    "RegistryStatistics",
    "SlotBusy",
    "StatusStore",
    "TokenRegistry",
    "TokenScope",
    "TokenStatistics",
    "TrackedOperation",
    "add_listener",
    "current_token",
    "exception_handlers",
    "log_events",
    "request_token",
    "shielded_cleanup",
]

__version__ = "0.1.0.dev0"

for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
