"""FastAPI adapters: dependencies, a cancel router and exception handlers.

Install the extra with ``pip install 'cancelkit[fastapi]'``. Everything here is a thin layer
over the framework-agnostic core:

- :data:`RequestToken`: the request's token, cancelled by a client disconnect (with
  :class:`~cancelkit.CancelOnDisconnect` installed), by a cancel-by-id and by a newer request,
  whichever comes first;
- :func:`latest_only`: a dependency that runs the endpoint as the newest claim on a key;
- :func:`tracked`: a dependency that registers the request in a
  :class:`~cancelkit.TokenRegistry` so that another request can cancel it by id;
- :func:`cancel_router`: the ``DELETE`` (or ``POST``) endpoint that does that;
- :func:`install`: exception handlers that turn cancellations into clean HTTP answers, and the
  matching responses in the OpenAPI schema;
- :func:`operation_starter` and :func:`operations_router`: background operations
  (:class:`~cancelkit.BackgroundOperations`) started by a request, read and cancelled by id.

.. versionadded:: 0.1
"""

from typing import TypeAlias as _TypeAlias

from ._openapi import CancelledBody as CancelledBody
from ._openapi import OperationBody as OperationBody
from ._openapi import OperationErrorBody as OperationErrorBody
from ._openapi import OperationProgressBody as OperationProgressBody
from ._openapi import OperationReasonBody as OperationReasonBody
from ._openapi import OperationStartedBody as OperationStartedBody
from ._openapi import OperationStatusBody as OperationStatusBody
from ._openapi import install as install
from ._operations import OperationStarter as OperationStarter
from ._operations import operation_starter as operation_starter
from ._operations import operations_router as operations_router
from ._requests import RequestToken as _RequestToken
from ._requests import cancel_router as cancel_router
from ._requests import latest_only as latest_only
from ._requests import request_level_token as request_level_token
from ._requests import tracked as tracked

#: ``token: RequestToken`` in an endpoint or dependency: the request's token (see
#: :func:`request_level_token`). In a sync ``def`` endpoint (run in a worker thread), call
#: ``token.raise_if_cancelled()`` between steps to stop when it is cancelled.
RequestToken: _TypeAlias = _RequestToken

__all__ = [
    "CancelledBody",
    "OperationBody",
    "OperationErrorBody",
    "OperationProgressBody",
    "OperationReasonBody",
    "OperationStartedBody",
    "OperationStarter",
    "OperationStatusBody",
    "RequestToken",
    "cancel_router",
    "install",
    "latest_only",
    "operation_starter",
    "operations_router",
    "request_level_token",
    "tracked",
]

for _name in __all__:
    if _name != "RequestToken":  # a typing alias (Annotated[...]): it keeps its own module
        globals()[_name].__module__ = __name__
del _name
