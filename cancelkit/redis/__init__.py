"""RedisBackend: the state of TokenRegistry and LatestOnly shared across workers and hosts.

Install the extra (``pip install cancelkit[redis]``); the client is
`coredis <https://coredis.readthedocs.io>`_, which runs on asyncio and on trio.

.. versionadded:: 0.1
"""

from .._exceptions import RedisUnavailable as RedisUnavailable
from ._backend import RedisBackend as RedisBackend
from ._backend import RedisBackendStatistics as RedisBackendStatistics
from ._status import RedisStatusStore as RedisStatusStore

__all__ = ["RedisBackend", "RedisBackendStatistics", "RedisStatusStore", "RedisUnavailable"]

for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
