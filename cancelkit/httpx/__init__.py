"""httpx adapters: outgoing requests that carry the deadline and stop with the token.

Install the extra with ``pip install 'cancelkit[httpx]'``. :class:`TokenTransport` wraps an
httpx transport so that every request an :class:`httpx.AsyncClient` sends inside a token's
scope carries the time left of its deadline (``Request-Timeout-Ms``) and is aborted, its
connection closed, when the token is cancelled; the next service, under
:class:`~cancelkit.CancelOnDisconnect`, reads that header and sees its client go away.
See :doc:`/beyond`.

.. versionadded:: 0.1
"""

from ._transport import TokenTransport as TokenTransport

__all__ = ["TokenTransport"]

TokenTransport.__module__ = __name__
