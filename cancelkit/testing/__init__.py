"""The behaviour every backend must show, as a test suite a backend's own tests run.

:class:`BackendContract` is a pytest test class: subclass it with a ``workers`` fixture and
every rule of :class:`~cancelkit.backends.Backend` runs against your backend (registrations,
cancels and tombstones, owner namespaces, commits, claims under each policy, sequence
numbers, handover waits, commits against cancels at every step, across workers).
:class:`StatusStoreContract` does the same for a :class:`~cancelkit.StatusStore`.
:func:`check_latest_only_model` drives random claim sequences through
:class:`~cancelkit.LatestOnly` on your backend and checks each outcome against a plain model;
:func:`sweep_commit` cancels a committing operation at every point it suspends (asyncio, with
the ``cancellens`` package). The memory, Redis and Redis Cluster backends pass them all in
cancelkit's own CI (the sweep on Redis and Redis Cluster: the memory backend's commit never
suspends).

Needs pytest and hypothesis (your test dependencies); ``import cancelkit`` does not import
this module.

.. versionadded:: 0.1
"""

from ._contract import BackendContract as BackendContract
from ._contract import Delivered as Delivered
from ._contract import StatusStoreContract as StatusStoreContract
from ._contract import Stores as Stores
from ._contract import Workers as Workers
from ._model import check_latest_only_model as check_latest_only_model
from ._storms import sweep_commit as sweep_commit

__all__ = [
    "BackendContract",
    "Delivered",
    "StatusStoreContract",
    "Stores",
    "Workers",
    "check_latest_only_model",
    "sweep_commit",
]

for _name in (
    "BackendContract",
    "Delivered",
    "StatusStoreContract",
    "check_latest_only_model",
    "sweep_commit",
):
    globals()[_name].__module__ = __name__
del _name
