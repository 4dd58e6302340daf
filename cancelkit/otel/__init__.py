"""OpenTelemetry: every cancellation on the current span, and counted in metrics.

Install the extra with ``pip install 'cancelkit[otel]'`` (``opentelemetry-api`` only: the SDK
and exporters are the application's choice). :func:`instrument` listens on cancelkit's event
seam (:func:`cancelkit.add_listener`) and records each event on the span that is current
where the work exits (the request's span of the ASGI or FastAPI instrumentation: no span of
its own, so no duplicate) and in three instruments. ``import cancelkit`` never imports
OpenTelemetry. See :doc:`/observability`.

.. versionadded:: 0.1
"""

from ._instrument import instrument as instrument

__all__ = ["instrument"]

instrument.__module__ = __name__
