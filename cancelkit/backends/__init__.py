"""Where the state shared between requests lives: the interface and the in-memory default.

.. versionadded:: 0.1
"""

from .._exceptions import OperationExists as OperationExists
from .._exceptions import RegistryFull as RegistryFull
from .._policy import Policy as Policy
from ._memory import MemoryBackend as MemoryBackend
from ._memory import MemoryBackendStatistics as MemoryBackendStatistics
from ._protocol import Acquired as Acquired
from ._protocol import Admission as Admission
from ._protocol import Backend as Backend
from ._protocol import CancelOutcome as CancelOutcome
from ._protocol import Deliver as Deliver
from ._protocol import new_holder_id as new_holder_id
from ._status import MemoryStatusStore as MemoryStatusStore
from ._status import StatusStore as StatusStore

__all__ = [
    "Acquired",
    "Admission",
    "Backend",
    "CancelOutcome",
    "Deliver",
    "MemoryBackend",
    "MemoryBackendStatistics",
    "MemoryStatusStore",
    "OperationExists",
    "Policy",
    "RegistryFull",
    "StatusStore",
    "new_holder_id",
]

# The exceptions and the status stores live in the flat namespace (``cancelkit.X``), the
# aliases are typing objects: re-exported here, they keep their own module.
_ELSEWHERE = {
    "Deliver",
    "MemoryStatusStore",
    "OperationExists",
    "Policy",
    "RegistryFull",
    "StatusStore",
}
for _name in __all__:
    if _name not in _ELSEWHERE:
        globals()[_name].__module__ = __name__
del _name
