"""The OpenTelemetry listener: span events and attributes, a counter and two histograms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.trace import Status, StatusCode

from .._events import CancelEvent, add_listener, silent_requests
from .._http import STATUS
from .._reason import CancelKind, CancelReason

__all__ = ["instrument"]

#: The HTTP status a request stopped for each reason answers (499: the client left).
_HTTP_STATUS = {kind.value: status for kind, status in STATUS.items()}


def instrument(
    *,
    tracer_provider: trace.TracerProvider | None = None,
    meter_provider: metrics.MeterProvider | None = None,
) -> Callable[[], None]:
    """Record every cancellation, refusal and commit with OpenTelemetry.

    On the span current where the work exits (if it is recording): one event
    ``cancelkit.<what>`` (``cancelkit.cancelled``, ``cancelkit.refused``,
    ``cancelkit.committed``) with the attributes of the table in :doc:`/observability`. A
    deliberate cancellation is not an error (OpenTelemetry semantic conventions): the span's
    status stays unset, except for an expired deadline (``ERROR``, ``error.type`` =
    ``deadline``). For a request, ``http.response.status_code`` is the status it answered
    (``499`` when the client left), also when a claim or an operation inside it reported the
    cancellation.

    Metrics: ``cancelkit.events`` (counter, by ``cancelkit.what``, ``cancelkit.kind`` and
    ``cancelkit.where``, plus ``http.route`` when the work served a request whose route
    template is known: never an id or a key), ``cancelkit.cancel_to_exit`` (histogram,
    seconds from the cancel, or the passed deadline, to the work's exit) and
    ``cancelkit.ran_for`` (histogram, seconds the stopped work had run). No "time saved"
    figure: what the work would still have cost is not known.

    Args:
        tracer_provider: unused (events go on the current span); accepted so that callers
            can pass the providers they configured, as instrumentations take them.
        meter_provider: where the instruments are made; the global one by default.

    Returns:
        A function that stops the recording.

    .. versionadded:: 0.1
    """
    del tracer_provider
    meter = (meter_provider or metrics.get_meter_provider()).get_meter("cancelkit")
    counter = meter.create_counter(
        "cancelkit.events", unit="{event}", description="Cancellations, refusals and commits"
    )
    to_exit = meter.create_histogram(
        "cancelkit.cancel_to_exit", unit="s", description="From the cancel to the work's exit"
    )
    ran_for = meter.create_histogram(
        "cancelkit.ran_for", unit="s", description="How long the stopped work had run"
    )

    def answered(reason: CancelReason) -> None:
        """The request's span gets the status it answered (also when an inner unit reported)."""
        span = trace.get_current_span()
        if span.is_recording():
            status = _HTTP_STATUS.get(reason.kind.value, 409)
            span.set_attribute("http.response.status_code", status)

    def listener(event: CancelEvent) -> None:
        labels: dict[str, Any] = {
            "cancelkit.what": event.what,
            "cancelkit.kind": event.kind,
            "cancelkit.where": event.where,
        }
        if event.route is not None:
            labels["http.route"] = event.route
        counter.add(1, labels)
        if event.what == "cancelled":
            if event.cancel_to_exit is not None:
                to_exit.record(event.cancel_to_exit, labels)
            if event.ran_for is not None:
                ran_for.record(event.ran_for, labels)
        span = trace.get_current_span()
        if not span.is_recording():
            return
        attributes = {key: value for key, value in _attributes(event).items() if value is not None}
        span.add_event(f"cancelkit.{event.what}", attributes)
        span.set_attributes(attributes)
        if event.where == "request" and event.reason is not None:
            answered(event.reason)
        if event.kind == CancelKind.DEADLINE.value:
            span.set_attribute("error.type", "deadline")
            span.set_status(Status(StatusCode.ERROR, "the deadline passed"))

    remove = add_listener(listener)
    silent_requests.append(answered)

    def stop() -> None:
        remove()
        if answered in silent_requests:
            silent_requests.remove(answered)

    return stop


def _attributes(event: CancelEvent) -> dict[str, Any]:
    return {
        "cancelkit.what": event.what,
        "cancelkit.kind": event.kind,
        "cancelkit.where": event.where,
        "cancelkit.name": event.name,
        "cancelkit.owner": event.owner,
        "cancelkit.source": event.source,
        "cancelkit.reason": None if event.reason is None else event.reason.message,
        "cancelkit.cancel_to_exit": event.cancel_to_exit,
        "cancelkit.ran_for": event.ran_for,
    }
