"""cancelkit.otel against the OpenTelemetry SDK's in-memory span exporter and metric reader."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from cancelkit import (
    BackgroundOperations,
    CancellationToken,
    CancelOnDisconnect,
    CancelOutcome,
    LatestOnly,
    OperationCancelled,
    OperationExists,
    RegistryFull,
    SlotBusy,
    TokenRegistry,
    request_token,
)
from cancelkit.backends import Backend, MemoryBackend
from cancelkit.otel import instrument
from cancelkit.redis import RedisBackend
from tests.conftest import RedisServer
from tests.test_asgi import DISCONNECT, FakeServer, body, http_scope
from tests.test_events import _superseded_pair

pytestmark = pytest.mark.anyio


class Recorded:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.tracer = self.tracer_provider.get_tracer("test")
        self._collected: dict[str, list[Any]] | None = None

    def points(self, name: str) -> list[Any]:
        """The data points of metric ``name`` (one collection for every metric of a test:
        SDK 1.20 reports no histogram point to a collection with no new measurement)."""
        if self._collected is None:
            data = self.reader.get_metrics_data()
            self._collected = {}
            for resource in [] if data is None else data.resource_metrics:
                for scope in resource.scope_metrics:
                    for metric in scope.metrics:
                        self._collected[metric.name] = list(metric.data.data_points)
        return self._collected.get(name, [])


@pytest.fixture
def recorded() -> Iterator[Recorded]:
    rec = Recorded()
    stop = instrument(tracer_provider=rec.tracer_provider, meter_provider=rec.meter_provider)
    yield rec
    stop()


async def test_a_supersede_is_one_span_event_and_one_count(recorded: Recorded) -> None:
    with recorded.tracer.start_as_current_span("GET /search"):
        await _superseded_pair(LatestOnly())
    (span,) = recorded.exporter.get_finished_spans()
    assert [event.name for event in span.events] == ["cancelkit.cancelled"]
    attributes = dict(span.events[0].attributes or {})
    assert attributes["cancelkit.kind"] == "superseded"
    assert attributes["cancelkit.where"] == "claim"
    assert attributes["cancelkit.name"] == "k"
    assert span.status.status_code is StatusCode.UNSET  # deliberate: not an error
    (count,) = recorded.points("cancelkit.events")
    assert count.value == 1
    assert dict(count.attributes) == {
        "cancelkit.what": "cancelled",
        "cancelkit.kind": "superseded",
        "cancelkit.where": "claim",
    }
    (latency,) = recorded.points("cancelkit.cancel_to_exit")
    assert latency.count == 1
    (ran,) = recorded.points("cancelkit.ran_for")
    assert ran.count == 1
    assert ran.min >= 0
    assert isinstance(attributes["cancelkit.source"], str)  # the superseding claim


async def test_the_owner_is_on_the_span_event(recorded: Recorded) -> None:
    shared = MemoryBackend()
    with recorded.tracer.start_as_current_span("DELETE /ops/op"):
        await cancel_by_id(shared, shared)
    (span,) = recorded.exporter.get_finished_spans()
    attributes = dict(span.events[0].attributes or {})
    assert (attributes["cancelkit.name"], attributes["cancelkit.owner"]) == ("op", "alice")


async def test_nothing_is_recorded_for_work_that_was_not_cancelled(recorded: Recorded) -> None:
    with recorded.tracer.start_as_current_span("GET /report"):
        async with TokenRegistry().track("op"), LatestOnly().claim("k"):
            pass
    (span,) = recorded.exporter.get_finished_spans()
    assert span.events == ()
    assert recorded.points("cancelkit.events") == []


async def test_an_expired_deadline_is_the_one_error(recorded: Recorded) -> None:
    with recorded.tracer.start_as_current_span("POST /export"), pytest.raises(OperationCancelled):
        async with TokenRegistry().track("op", parent=CancellationToken(timeout=0.01)):
            await anyio.sleep_forever()
    (span,) = recorded.exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["error.type"] == "deadline"
    assert span.attributes["cancelkit.kind"] == "deadline"


async def serve_until_the_client_leaves(app: Any, running: anyio.Event) -> None:
    """Serve ``app`` at route ``/slow/{id}`` under CancelOnDisconnect; the client leaves once
    it runs."""
    server = FakeServer(body())
    async with anyio.create_task_group() as tg:
        scope = http_scope("/slow/42")
        scope["route"] = type("Route", (), {"path": "/slow/{id}"})()
        tg.start_soon(CancelOnDisconnect(app), scope, server.receive, server.send)
        await running.wait()
        await anyio.wait_all_tasks_blocked()
        server.client(DISCONNECT)


async def test_a_request_whose_client_left_says_499_and_its_route(recorded: Recorded) -> None:
    running = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        running.set()
        await anyio.sleep_forever()

    with recorded.tracer.start_as_current_span("GET /slow"):
        await serve_until_the_client_leaves(app, running)
    (span,) = recorded.exporter.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["http.response.status_code"] == 499
    (count,) = recorded.points("cancelkit.events")
    assert count.attributes["http.route"] == "/slow/{id}"  # the template, never the raw path


async def test_a_request_whose_client_left_while_an_operation_ran_says_499_and_its_route(
    recorded: Recorded,
) -> None:
    """The operation inside reports the disconnect (one event, one count); the request's span
    still says 499, and the count carries the request's route."""
    running = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        async with TokenRegistry().track("op", parent=request_token(scope)):
            running.set()
            await anyio.sleep_forever()

    with recorded.tracer.start_as_current_span("GET /slow"):
        await serve_until_the_client_leaves(app, running)
    (span,) = recorded.exporter.get_finished_spans()
    assert [event.name for event in span.events] == ["cancelkit.cancelled"]
    assert span.attributes is not None
    assert span.attributes["cancelkit.where"] == "operation"
    assert span.attributes["http.response.status_code"] == 499
    (count,) = recorded.points("cancelkit.events")
    assert count.value == 1
    assert count.attributes["cancelkit.where"] == "operation"
    assert count.attributes["http.route"] == "/slow/{id}"


async def test_a_request_past_its_deadline_says_504_and_error(recorded: Recorded) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await anyio.sleep_forever()

    server = FakeServer(body())
    with recorded.tracer.start_as_current_span("GET /slow"):
        await CancelOnDisconnect(app, timeout=0)(http_scope("/slow"), server.receive, server.send)
    assert server.status == 504
    (span,) = recorded.exporter.get_finished_spans()
    assert [event.name for event in span.events] == ["cancelkit.cancelled"]
    assert span.attributes is not None
    assert (span.attributes["cancelkit.kind"], span.attributes["cancelkit.where"]) == (
        "deadline",
        "request",
    )
    assert span.attributes["http.response.status_code"] == 504
    assert span.attributes["error.type"] == "deadline"
    assert span.status.status_code is StatusCode.ERROR


async def test_nothing_is_recorded_for_a_guarded_request_that_was_not_cancelled(
    recorded: Recorded,
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    server = FakeServer(body())
    with recorded.tracer.start_as_current_span("GET /fast"):
        await CancelOnDisconnect(app)(http_scope("/fast"), server.receive, server.send)
    assert server.status == 200
    (span,) = recorded.exporter.get_finished_spans()
    assert span.events == ()
    assert "http.response.status_code" not in (span.attributes or {})
    assert recorded.points("cancelkit.events") == []


def test_import_cancelkit_does_not_import_opentelemetry() -> None:
    program = "import sys, cancelkit; print(sorted(m for m in sys.modules if 'opentelemetry' in m))"
    run = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True
    )
    assert run.stdout.strip() == "[]"


async def test_with_the_asgi_instrumentation_one_server_span_carries_it(
    recorded: Recorded,
) -> None:
    """OpenTelemetry's ASGI middleware makes the request's span; cancelkit adds its event and
    attributes to that span and makes none of its own (no duplicate)."""
    running = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        running.set()
        await anyio.sleep_forever()

    traced = OpenTelemetryMiddleware(
        CancelOnDisconnect(app), tracer_provider=recorded.tracer_provider
    )
    server = FakeServer(body())
    scope = {**http_scope("/slow"), "scheme": "http", "server": ("127.0.0.1", 8000)}
    scope.update(http_version="1.1", query_string=b"", headers=[], client=("127.0.0.1", 5000))
    async with anyio.create_task_group() as tg:
        tg.start_soon(traced, scope, server.receive, server.send)
        await running.wait()
        await anyio.wait_all_tasks_blocked()
        server.client(DISCONNECT)
    spans = recorded.exporter.get_finished_spans()
    (request,) = [span for span in spans if span.kind is SpanKind.SERVER]
    assert [event.name for event in request.events] == ["cancelkit.cancelled"]
    assert request.attributes is not None
    assert request.attributes["cancelkit.kind"] == "client_disconnected"
    assert all(span.name.startswith(request.name) for span in spans)  # its own send/receive


# -- every kind, in one process and across two workers (Redis) ------------------------------


@asynccontextmanager
async def two_workers(kind: str, redis: RedisServer | None) -> AsyncIterator[list[Backend]]:
    """One shared memory backend, or two Redis backends standing in for two workers."""
    if kind == "memory":
        shared = MemoryBackend()
        yield [shared, shared]
        return
    assert redis is not None
    prefix = "ot" + secrets.token_hex(4)
    async with (
        RedisBackend(redis.url, prefix=prefix) as a,
        RedisBackend(redis.url, prefix=prefix) as b,
    ):
        yield [a, b]


async def supersede(a: Backend, b: Backend) -> None:
    running = anyio.Event()

    async def older() -> None:
        with pytest.raises(OperationCancelled):
            async with LatestOnly(backend=a).claim("k"):
                running.set()
                await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(older)
        await running.wait()
        async with LatestOnly(backend=b).claim("k"):
            pass


async def cancel_by_id(a: Backend, b: Backend) -> None:
    running = anyio.Event()

    async def work() -> None:
        with pytest.raises(OperationCancelled):
            async with TokenRegistry(backend=a).track("op", owner="alice"):
                running.set()
                await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(work)
        await running.wait()
        await TokenRegistry(backend=b).cancel("op", owner="alice")


async def stale(a: Backend, b: Backend) -> None:
    async with LatestOnly(backend=a).claim("k", seq=5):
        pass
    with pytest.raises(OperationCancelled):
        async with LatestOnly(backend=b).claim("k", seq=4):
            pass  # pragma: no cover


async def busy(a: Backend, b: Backend) -> None:
    async with LatestOnly(backend=a, policy="reject").claim("k"):
        with pytest.raises(SlotBusy):
            async with LatestOnly(backend=b, policy="reject").claim("k"):
                pass  # pragma: no cover


async def exists(a: Backend, b: Backend) -> None:
    async with TokenRegistry(backend=a).track("op"):
        with pytest.raises(OperationExists):
            async with TokenRegistry(backend=b).track("op"):
                pass  # pragma: no cover


async def full(a: Backend, b: Backend) -> None:
    registry = TokenRegistry(backend=a, max_running=1)
    async with registry.track("first"):
        with pytest.raises(RegistryFull):
            async with registry.track("op"):
                pass  # pragma: no cover


async def commit(a: Backend, b: Backend) -> None:
    async with TokenRegistry(backend=a).track("op") as op:
        await op.commit()
        assert await TokenRegistry(backend=b).cancel("op") is CancelOutcome.COMMITTED


async def shutdown(a: Backend, b: Backend) -> None:
    async with BackgroundOperations(registry=TokenRegistry(backend=a), grace=0) as ops:
        await ops.start(anyio.sleep_forever, id="op")


SCENARIOS: dict[Callable[[Backend, Backend], Awaitable[None]], tuple[str, str, str, str]] = {
    supersede: ("cancelled", "superseded", "claim", "k"),
    cancel_by_id: ("cancelled", "requested", "operation", "op"),
    stale: ("refused", "stale", "claim", "k"),
    busy: ("refused", "busy", "claim", "k"),
    exists: ("refused", "exists", "operation", "op"),
    full: ("refused", "full", "operation", "op"),
    commit: ("committed", "committed", "operation", "op"),
    shutdown: ("cancelled", "shutdown", "operation", "op"),
}


@pytest.mark.parametrize("workers", ["memory", "redis"])
@pytest.mark.parametrize("scenario", list(SCENARIOS), ids=lambda f: f.__name__)
async def test_every_kind_is_one_span_event_and_one_count(
    recorded: Recorded,
    scenario: Callable[[Backend, Backend], Awaitable[None]],
    workers: str,
    request: pytest.FixtureRequest,
) -> None:
    """Each kind of cancellation, refusal and commit: on the span current where the work
    exits, exactly the documented event and attributes, and one count with its labels; in
    one process, and across two workers on Redis (the second worker causes it)."""
    what, kind, where, name = SCENARIOS[scenario]
    redis = request.getfixturevalue("redis") if workers == "redis" else None
    async with two_workers(workers, redis) as (a, b):
        with recorded.tracer.start_as_current_span("work"):
            await scenario(a, b)
    (span,) = recorded.exporter.get_finished_spans()
    assert [event.name for event in span.events] == [f"cancelkit.{what}"]
    attributes = dict(span.events[0].attributes or {})
    assert (attributes["cancelkit.kind"], attributes["cancelkit.where"]) == (kind, where)
    assert attributes["cancelkit.name"] == name
    assert span.status.status_code is StatusCode.UNSET  # none of them is an error
    (count,) = recorded.points("cancelkit.events")
    assert (count.value, dict(count.attributes)) == (
        1,
        {"cancelkit.what": what, "cancelkit.kind": kind, "cancelkit.where": where},
    )
