"""The cancelkit demo: a search box whose unwanted work stops on the server.

Every keystroke in the page sends ``GET /search?q=...``; the server-side work takes a
noticeable time (``work_seconds``). cancelkit stops the work nobody will read:

- **superseded**: a newer keystroke of the same user (browser tab) takes the user's
  latest-only slot; the older search stops and its client gets ``409``;
- **cancelled by id**: the page names every search with a random operation id
  (``X-Operation-Id``); the Stop button sends ``DELETE /operations/{id}``;
- **client gone**: closing the tab closes the connection, and
  :class:`~cancelkit.CancelOnDisconnect` interrupts the handler at once.

With ``downstream=True`` (what ``python -m demo`` serves, unless ``--no-downstream``) the
search asks a small downstream service for the matches, over HTTP (``GET /downstream/find``,
the same server standing in for another service), with a
:class:`cancelkit.httpx.TokenTransport` client: when the search stops, for whatever reason, its
call is aborted, and the log shows the downstream stopping too (``downstream_stopped``: its
client left).

The **Export** button starts a background operation (:class:`~cancelkit.BackgroundOperations`)
that outlives its request: ``POST /exports`` answers ``202`` with a ``Location``; the page
follows its progress with ``GET /exports/{id}?wait=...`` and stops it with ``DELETE
/exports/{id}``, on any worker in Redis mode.

The server records what happened to each search in a small bounded log; the page shows it
live (``GET /events``, Server-Sent Events) and tests read it (``GET /log``). On Redis, every
worker appends to one bounded Redis stream and follows it, so each worker's page shows what
every worker did (:class:`RedisEventLog`).

A live panel (``GET /stats``, :mod:`demo.panel`) counts what was stopped today, by reason,
with the median cancel → exit and the work saved, fed by cancelkit's event seam
(:func:`cancelkit.add_listener`); on Redis, the whole fleet's.

A "user" is a random id each tab makes for itself and sends as ``X-User``: there is no login
in a demo, and two tabs must never supersede each other.
"""

# No "from __future__ import annotations" here: FastAPI reads the annotations of the
# dependencies declared inside create_app() at run time, and they refer to local variables.
import importlib
import json
import os
import socket
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import httpx
import uvicorn
from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from cancelkit import (
    BackgroundOperations,
    CancelKind,
    CancellationToken,
    CancelOnDisconnect,
    CancelReason,
    Claim,
    LatestOnly,
    MemoryStatusStore,
    OperationCancelled,
    StatusStore,
    TokenRegistry,
    TrackedOperation,
    request_token,
)
from cancelkit.backends import Backend, MemoryBackend
from cancelkit.fastapi import (
    OperationStartedBody,
    OperationStarter,
    RequestToken,
    cancel_router,
    install,
    latest_only,
    operation_starter,
    operations_router,
    request_level_token,
    tracked,
)
from cancelkit.httpx import TokenTransport

from .panel import MemoryTally, Mine, PanelStats, RedisTally, feed

__all__ = [
    "DemoServer",
    "DemoState",
    "EventLog",
    "LogEvent",
    "RedisEventLog",
    "SearchResult",
    "app_from_env",
    "create_app",
    "export_words",
    "make_backend",
    "make_status_store",
]

STATIC = Path(__file__).resolve().parent / "static"
REDIS_ENV = "CANCELKIT_DEMO_REDIS"
WORK_SECONDS_ENV = "CANCELKIT_DEMO_WORK_SECONDS"
DOWNSTREAM_ENV = "CANCELKIT_DEMO_DOWNSTREAM"
STEPS = 30  # the search runs in this many small steps, so a cancellation lands mid-way
EXPORT_STEPS = 20  # the export's steps, each reported as progress
EXPORT_LENGTH = 4  # an export takes this many times work_seconds
USER_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

_WORD_LIST = """
    abandon abort accept access account acquire action active adapter address agent alarm
    algorithm anchor answer anyio apply archive arrow async atomic await backend balance
    banner batch beacon binary bridge browser buffer cable cache callback cancel cancelled
    cancelling candle canvas capture carbon cascade channel checkpoint claim client cluster
    cobalt column commit concurrent connect context cookie coroutine cursor daemon deadline
    debounce decode deliver digest disconnect dispatch domain effect engine event exception
    expire fastapi fence filter fleet flush future gateway generation handler harbor header
    heartbeat holder horizon idle inbox keystroke kernel ladder latency latest lease ledger
    lifespan listen loop marker memory message middleware monitor network operation outcome
    owner packet parent pending pipeline policy prompt protocol proxy queue reason receive
    redis registry release replace request response result router runner scope search
    select server session shield signal socket source stale stream supersede superseded
    switch task timeout token trio tombstone uvicorn vector watcher worker
"""
#: What the search looks through: a small built-in word list.
WORDS = tuple(_WORD_LIST.split())


# -- the event log ----------------------------------------------------------------------------

#: What happened to a search: it started, or how it ended.
EventKind = Literal[
    "started",
    "superseded",
    "cancelled",
    "client_gone",
    "completed",
    "stopped",
    "downstream_started",  # the downstream service began the search's work
    "downstream_done",
    "downstream_stopped",  # ...and stopped: the search that called it stopped
]

_ENDINGS: dict[CancelKind, EventKind] = {
    CancelKind.SUPERSEDED: "superseded",
    CancelKind.REQUESTED: "cancelled",  # by id: the Stop button
    CancelKind.CLIENT_DISCONNECTED: "client_gone",
}


class LogEvent(BaseModel):
    """One line of the server's log.

    Attributes:
        seq: the event's number, counting from 1 (also its SSE id).
        kind: what happened.
        query: the search query.
        op: the search's operation id.
        user: the tab that sent it.
        at: when, as :func:`time.time`.
        detail: more about it: the number of matches, or why the search stopped.
        worker: which worker process did it (on Redis; empty in memory).
    """

    seq: int
    kind: EventKind
    query: str
    op: str
    user: str
    at: float
    detail: str = ""
    worker: str = ""


class EventLog:
    """A bounded ring of :class:`LogEvent`, which readers can follow as it grows.

    Args:
        size: the most events kept; older ones drop off.
    """

    def __init__(self, size: int = 1000) -> None:
        """Make an empty log."""
        self._events: deque[LogEvent] = deque(maxlen=size)
        self._seq = 0
        self._changed: anyio.Event | None = None  # made by the first reader that waits

    def add(self, kind: EventKind, *, query: str, op: str, user: str, detail: str = "") -> LogEvent:
        """Append an event and wake the readers."""
        self._seq += 1
        event = LogEvent(
            seq=self._seq, kind=kind, query=query, op=op, user=user, at=time.time(), detail=detail
        )
        self._events.append(event)
        if self._changed is not None:
            self._changed.set()
            self._changed = None
        return event

    def append(self, event: LogEvent) -> None:
        """Append an event numbered elsewhere (by Redis); ignore one already seen."""
        if event.seq <= self._seq:
            return
        self._seq = event.seq
        self._events.append(event)
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def since(self, after: int = 0, *, user: str | None = None) -> list[LogEvent]:
        """Return the kept events numbered above ``after`` (of ``user`` only, if given)."""
        return [e for e in self._events if e.seq > after and user in (None, e.user)]

    async def follow(
        self, after: int = 0, *, user: str | None = None
    ) -> AsyncGenerator[LogEvent, None]:
        """Yield the events numbered above ``after``, then each new one as it comes; forever."""
        while True:
            if self._changed is None:
                self._changed = anyio.Event()
            changed = self._changed  # taken first: an event added while we yield sets it
            events = [e for e in self._events if e.seq > after]
            if events:
                after = events[-1].seq
            for event in events:
                if user in (None, event.user):
                    yield event
            await changed.wait()


class RedisEventLog:
    """The log of a fleet: one bounded Redis stream that every worker appends to and follows.

    Each event gets its number from a counter in the same Lua script that appends it, so
    numbers follow the stream's order across workers. Every worker mirrors the stream into its
    own :class:`EventLog` (which its ``/events`` streams follow): a page sees what every
    worker did for its tab, whichever worker serves its event stream.

    Args:
        client: a connected coredis client (decoding responses).
        mirror: this worker's local log, fed by :meth:`run`.
        prefix: the Redis key prefix.
        size: about how many events the stream keeps (``MAXLEN ~``).
        ttl: seconds the log lives after its last event.
    """

    _APPEND = """
        local seq = redis.call('INCR', KEYS[1])
        redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], seq .. '-0', 'event', ARGV[2])
        redis.call('EXPIRE', KEYS[1], ARGV[3])
        redis.call('EXPIRE', KEYS[2], ARGV[3])
        return seq
    """

    def __init__(
        self,
        client: Any,
        mirror: EventLog,
        *,
        prefix: str = "cancelkit-demo",
        size: int = 1000,
        ttl: int = 24 * 3600,
    ) -> None:
        """Prepare; nothing is sent to Redis until the first call."""
        self._client = client
        self._mirror = mirror
        self._counter = f"{prefix}:log:seq"
        self.stream = f"{prefix}:log"
        self._size = size
        self._ttl = ttl
        self._append = client.register_script(self._APPEND)

    async def add(
        self, kind: EventKind, *, query: str, op: str, user: str, detail: str, worker: str
    ) -> None:
        """Append an event to the stream (the mirrors, this worker's too, pick it up)."""
        event = LogEvent(
            seq=0, kind=kind, query=query, op=op, user=user, at=time.time(), detail=detail
        )
        body = event.model_copy(update={"worker": worker}).model_dump_json()
        keys = [self._counter, self.stream]
        await self._append(keys=keys, args=[str(self._size), body, str(self._ttl)])

    @staticmethod
    def _decode(entry: Any) -> LogEvent:
        data = dict(entry.field_values)["event"]
        seq = int(str(entry.identifier).split("-")[0])
        return LogEvent.model_validate_json(data).model_copy(update={"seq": seq})

    async def since(self, after: int = 0, *, user: str | None = None) -> list[LogEvent]:
        """The kept events numbered above ``after`` (of ``user`` only), straight from Redis."""
        entries = await self._client.xrange(self.stream, f"{after + 1}-0", "+")
        events = [self._decode(entry) for entry in entries]
        return [e for e in events if user in (None, e.user)]

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Mirror the stream into the local log: what is kept, then each new event; forever."""
        kept = await self._client.xrevrange(self.stream, "+", "-", count=self._size)
        last = "0-0"
        for entry in reversed(kept):
            self._mirror.append(self._decode(entry))
            last = str(entry.identifier)
        task_status.started()
        while True:
            # Block at most a second per call: a short wait keeps the connection's read
            # timeout out of play; the loop ends when the lifespan cancels it.
            reply = await self._client.xread({self.stream: last}, count=100, block=1000)
            for entries in (reply or {}).values():
                for entry in entries:
                    self._mirror.append(self._decode(entry))
                    last = str(entry.identifier)


# -- the search -------------------------------------------------------------------------------


class SearchResult(BaseModel):
    """The answer to a search that completed."""

    query: str
    op: str
    matches: list[str]


async def find_words(query: str, work_seconds: float) -> list[str]:
    """Look for ``query`` in :data:`WORDS`, slowly: ``STEPS`` steps over ``work_seconds``.

    Each step awaits, so a cancellation stops the search between steps.
    """
    needle = query.lower()
    matches: list[str] = []
    chunk = -(-len(WORDS) // STEPS)  # ceiling division: every word is looked at
    for step in range(STEPS):
        await anyio.sleep(work_seconds / STEPS)  # stands in for real work: a query, a model
        matches += [w for w in WORDS[step * chunk : (step + 1) * chunk] if needle in w]
    return matches


async def export_words(operations: BackgroundOperations, work_seconds: float) -> dict[str, int]:
    """The background export: "write" every word, reporting progress after each step.

    It takes ``EXPORT_LENGTH * work_seconds`` unless stopped; the request that started it
    answered long before.
    """
    chunk = -(-len(WORDS) // EXPORT_STEPS)
    exported = 0
    for step in range(EXPORT_STEPS):
        await anyio.sleep(EXPORT_LENGTH * work_seconds / EXPORT_STEPS)  # a slow write
        exported = min(len(WORDS), (step + 1) * chunk)
        await operations.report(exported, len(WORDS), f"{exported} of {len(WORDS)} words")
    return {"words": exported}


class SearchRecord:
    """What the log needs to know about one search request while it runs."""

    def __init__(self, query: str, user: str, op: str) -> None:
        """Start a record; ``op`` is the id the client sent (``"-"`` if none)."""
        self.query = query
        self.user = user
        self.op = op
        self.started = False
        self.matches: list[str] | None = None


# -- the backend ------------------------------------------------------------------------------


class DemoConfigError(Exception):
    """The demo cannot run as asked (a missing module, workers without Redis)."""


def make_backend(redis_url: str | None) -> Backend:
    """Choose where the slot and the registry keep their state: the one place that does.

    Args:
        redis_url: ``None`` for the in-memory backend (one process); a Redis URL for
            ``cancelkit.redis.RedisBackend`` (many workers).

    Raises:
        DemoConfigError: when a Redis URL is given but ``cancelkit.redis`` is not available.
    """
    if redis_url is None:
        return MemoryBackend()
    try:
        redis_module = importlib.import_module("cancelkit.redis")
    except ImportError as exc:
        raise DemoConfigError(
            f"--redis needs cancelkit.redis.RedisBackend, which cannot be imported here ({exc}); "
            "install the extra with: pip install -e '.[fastapi,redis]'"
        ) from exc
    backend: Backend = redis_module.RedisBackend(redis_url, prefix="cancelkit-demo")
    return backend


def make_status_store(redis_url: str | None) -> StatusStore:
    """Where the exports' statuses live: in memory, or in Redis (readable by every worker)."""
    if redis_url is None:
        return MemoryStatusStore(retention=600, max_retained=1000)
    redis_module = importlib.import_module("cancelkit.redis")  # make_backend checked it
    store: StatusStore = redis_module.RedisStatusStore(
        redis_url, prefix="cancelkit-demo", retention=600, max_retained=1000
    )
    return store


# -- the application --------------------------------------------------------------------------


class DemoState:
    """What one demo application holds; ``app.state.demo``.

    Attributes:
        log: the event log.
        slot: the latest-only slot (one key per user).
        registry: the operations that Stop can cancel by id.
        closing: cancelled when the server shuts down, to end the event streams.
        work_seconds: how long a search takes when nothing stops it.
        operations: the background exports (tracked in ``registry``).
    """

    def __init__(
        self, backend: Backend, work_seconds: float, store: StatusStore | None = None
    ) -> None:
        """Make the parts, all on one backend."""
        #: The client the search calls the downstream service with (``downstream=True``).
        self.downstream: httpx.AsyncClient | None = None
        # This process's log; on Redis, a mirror of the fleet's (see RedisEventLog).
        self.log = EventLog()
        self.fleet_log: RedisEventLog | None = None  # set by the lifespan on Redis
        self.backend = backend
        self.slot = LatestOnly(backend=backend)
        self.registry = TokenRegistry(backend=backend)
        self.closing = CancellationToken(name="demo closing")
        self.work_seconds = work_seconds
        self.operations = BackgroundOperations(
            registry=self.registry, store=store, max_running_per_owner=2, grace=1
        )
        #: The live panel's numbers (the fleet's on Redis) and the names of this demo's work.
        self.tally: MemoryTally | RedisTally = MemoryTally()
        self.mine = Mine()

    async def record(
        self, kind: EventKind, *, query: str, op: str, user: str, detail: str = ""
    ) -> None:
        """Log what happened: in this process, or on Redis for every worker to see."""
        if self.fleet_log is None:
            self.log.add(kind, query=query, op=op, user=user, detail=detail)
        else:
            worker = str(getattr(self.backend, "worker", None) or os.getpid())
            fields = {"query": query, "op": op, "user": user, "detail": detail}
            await self.fleet_log.add(kind, worker=worker, **fields)

    async def since(self, after: int = 0, *, user: str | None = None) -> list[LogEvent]:
        """The log's kept events above ``after``: this process's, or the fleet's on Redis."""
        if self.fleet_log is None:
            return self.log.since(after, user=user)
        return await self.fleet_log.since(after, user=user)


def create_app(
    *, redis_url: str | None = None, work_seconds: float = 1.5, downstream: bool = False
) -> FastAPI:
    """Build the demo application.

    Args:
        redis_url: run on Redis (several workers) instead of in memory; see
            :func:`make_backend`.
        work_seconds: how long one search takes when nothing stops it.
        downstream: the search gets its matches from the downstream service over HTTP
            (served under ``/downstream``: it needs a real server, not an in-process client).

    Raises:
        DemoConfigError: see :func:`make_backend`.
        ValueError: for a negative ``work_seconds``.
    """
    if not work_seconds >= 0:
        raise ValueError(f"work_seconds must be >= 0, not {work_seconds!r}")
    backend = make_backend(redis_url)
    demo = DemoState(backend, work_seconds, make_status_store(redis_url))
    log = demo.log

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            if hasattr(backend, "__aenter__"):  # RedisBackend connects here, in each worker
                await stack.enter_async_context(backend)  # type: ignore[arg-type]
            await stack.enter_async_context(demo.operations)  # the exports' task group
            if redis_url is not None:  # the fleet's log: one Redis stream, mirrored here
                import coredis

                client = coredis.Redis.from_url(redis_url, decode_responses=True)
                await stack.enter_async_context(client)
                fleet_log = RedisEventLog(client, demo.log)
                tasks = await stack.enter_async_context(anyio.create_task_group())
                stack.callback(tasks.cancel_scope.cancel)  # runs first: stop mirroring
                await tasks.start(fleet_log.run)
                demo.fleet_log = fleet_log
                demo.tally = RedisTally(client)
            await stack.enter_async_context(feed(demo.tally, demo.mine))  # the panel's seam
            if downstream:  # its calls follow the search's token: they stop when it does
                http = httpx.AsyncClient(transport=TokenTransport(), timeout=None)
                demo.downstream = await stack.enter_async_context(http)
            yield

    app = FastAPI(title="cancelkit demo", lifespan=lifespan)
    app.state.demo = demo
    install(app)  # superseded / cancelled → 409, client gone → 499, with a JSON reason

    @app.exception_handler(RequestValidationError)
    async def one_message_per_problem(request: Request, exc: RequestValidationError) -> Any:
        """Report each problem once (``X-User`` feeds three dependencies, hence 3 reports)."""
        unique: list[Any] = []
        for error in exc.errors():
            if error not in unique:
                unique.append(error)
        return JSONResponse({"detail": jsonable_encoder(unique)}, status_code=422)

    # Interrupt a handler the moment its client disconnects (the tab was closed).
    app.add_middleware(CancelOnDisconnect, mode="interrupt")

    # -- who is asking, and what ------------------------------------------------------------

    def current_user(
        x_user: Annotated[str, Header(pattern=USER_PATTERN, description="The tab's id")],
    ) -> str:
        """The demo's stand-in for authentication: the tab's id, from ``X-User``."""
        return x_user

    CurrentUser = Annotated[str, Depends(current_user)]

    def search_key(user: CurrentUser) -> str:
        """One latest-only key per user: one tab's keystrokes never supersede another's."""
        return f"{user}:search"

    async def journal(
        request: Request,
        q: Annotated[str, Query(min_length=1, max_length=100, description="What to look for")],
        user: CurrentUser,
    ) -> AsyncIterator[SearchRecord]:
        """Log how the search ends, however it ends (declared first, so it sees it all)."""
        record = SearchRecord(q, user, request.headers.get("x-operation-id", "-"))
        demo.mine.add(f"{user}:search", demo.work_seconds)  # the claim's key: for the panel
        demo.mine.add(record.op, demo.work_seconds)  # its id, if the page chose it
        token = await request_level_token(request)  # follows the claim, the op and the disconnect
        try:
            yield record
        except OperationCancelled as exc:  # superseded, or stopped by id (maybe before start)
            await _log_end(record, exc.reason)
            raise
        except BaseException:  # the client left: the middleware interrupted the handler
            if token.reason is not None:
                await _log_end(record, token.reason)
            raise
        else:
            matches = record.matches or []
            detail = f"{len(matches)} matches"
            await demo.record("completed", query=q, op=record.op, user=user, detail=detail)

    async def _log_end(record: SearchRecord, reason: CancelReason) -> None:
        root = reason.root
        kind = _ENDINGS.get(root.kind, "stopped")
        detail = root.message if record.started else f"{root.message}, before it started"
        # The handler may be in a cancelled scope: logging its end must still happen, briefly.
        with anyio.move_on_after(5, shield=True):
            fields = {"query": record.query, "op": record.op, "user": record.user}
            await demo.record(kind, detail=detail, **fields)

    # -- the routes -------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/about")
    async def about() -> dict[str, str | int | None]:
        """Which backend serves this worker, and which worker this is."""
        return {
            "backend": type(backend).__name__,
            "worker": getattr(backend, "worker", None),  # RedisBackend: set per process
            "pid": os.getpid(),
        }

    @app.get("/search")
    async def search(
        request: Request,
        record: Annotated[SearchRecord, Depends(journal, scope="function")],
        claim: Annotated[Claim, latest_only(demo.slot, key=search_key)],
        op: Annotated[TrackedOperation, tracked(demo.registry, owner=current_user)],
    ) -> SearchResult:
        """Search the word list; slowly, so that there is something to cancel."""
        record.started, record.op = True, op.id  # the client's id, or one made up for it
        demo.mine.add(op.id, demo.work_seconds)
        await demo.record("started", query=record.query, op=op.id, user=record.user)
        if demo.downstream is None:
            record.matches = await find_words(record.query, demo.work_seconds)
        else:  # ask the downstream service; a cancel of this search aborts the call
            answer = await demo.downstream.get(
                f"{request.base_url}downstream/find",
                params={"q": record.query, "op": op.id},
                headers={"X-User": record.user},
            )
            answer.raise_for_status()
            record.matches = answer.json()["matches"]
        return SearchResult(query=record.query, op=op.id, matches=record.matches)

    @app.get("/downstream/find", include_in_schema=False)
    async def downstream_find(
        request: Request, q: str, op: str, user: CurrentUser
    ) -> dict[str, list[str]]:
        """The downstream service: the search's slow work, stopped when its caller leaves."""
        token = request_token(request.scope)  # cancelled when the search's call is aborted
        await demo.record("downstream_started", query=q, op=op, user=user)
        try:
            matches = await find_words(q, demo.work_seconds)
        except BaseException:
            if token.reason is not None:
                with anyio.move_on_after(5, shield=True):
                    detail = token.reason.root.message
                    await demo.record(
                        "downstream_stopped", query=q, op=op, user=user, detail=detail
                    )
            raise
        detail = f"{len(matches)} matches"
        await demo.record("downstream_done", query=q, op=op, user=user, detail=detail)
        return {"matches": matches}

    # DELETE /operations/{id}: 202 when it stopped (or, unknown yet, will start stopped),
    # 404 when it is another tab's or has just ended.
    app.include_router(cancel_router(demo.registry, owner=current_user))

    # -- the background export ----------------------------------------------------------------

    StartExport = Annotated[
        OperationStarter, operation_starter(demo.operations, owner=current_user)
    ]

    @app.post("/exports", status_code=202, response_model=OperationStartedBody)
    async def start_export(start: StartExport) -> Response:
        """Start an export that outlives this request; its status is at ``Location``."""
        response = await start(export_words, demo.operations, demo.work_seconds)
        if response.status_code == 202:  # (a refusal names no operation)
            started = json.loads(bytes(response.body))
            demo.mine.add(started["id"], EXPORT_LENGTH * demo.work_seconds)
        return response

    # GET /exports/{id} (?wait=seconds): the status; DELETE /exports/{id}: stop it.
    app.include_router(
        operations_router(demo.operations, owner=current_user, path="/exports/{operation_id}")
    )

    @app.get("/stats")
    async def stats() -> PanelStats:
        """Today's stopped searches and exports: by reason, cancel → exit, work saved.

        On Redis, the whole fleet's.
        """
        return await demo.tally.read()

    @app.get("/log")
    async def read_log(
        after: Annotated[int, Query(ge=0, description="Only events numbered above this")] = 0,
        user: Annotated[str | None, Query(pattern=USER_PATTERN)] = None,
    ) -> list[LogEvent]:
        """The events kept in the log (of one user, if given)."""
        return await demo.since(after, user=user)

    @app.get("/events", response_class=StreamingResponse)
    async def events(
        token: RequestToken,
        user: Annotated[str | None, Query(pattern=USER_PATTERN)] = None,
        last_event_id: Annotated[int, Header(ge=0)] = 0,
    ) -> StreamingResponse:
        """The log, live, as Server-Sent Events; a reconnecting browser resumes where it was."""
        # The stream ends cleanly when the client leaves or the server shuts down.
        until = CancellationToken.any_of(token, demo.closing)

        async def stream() -> AsyncIterator[str]:
            yield "retry: 1000\n\n"  # reconnect after a second if the connection drops
            async for event in until.until_cancelled(log.follow(last_event_id, user=user)):
                yield f"id: {event.seq}\ndata: {event.model_dump_json()}\n\n"

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def app_from_env() -> FastAPI:
    """Build the application from ``CANCELKIT_DEMO_*`` variables (one per uvicorn worker)."""
    return create_app(
        redis_url=os.environ.get(REDIS_ENV) or None,
        work_seconds=float(os.environ.get(WORK_SECONDS_ENV, "1.5")),
        downstream=bool(os.environ.get(DOWNSTREAM_ENV)),
    )


# -- serving ----------------------------------------------------------------------------------


def _demo_state(asgi_app: Any) -> DemoState | None:
    """Find the demo's state inside whatever uvicorn wrapped the application in."""
    while asgi_app is not None and not isinstance(asgi_app, FastAPI):
        asgi_app = getattr(asgi_app, "app", None)
    return None if asgi_app is None else getattr(asgi_app.state, "demo", None)


class DemoServer(uvicorn.Server):
    """uvicorn, ending the live event streams when it shuts down.

    uvicorn waits for open connections to finish before it tells the application that it
    stops, and an event stream never finishes by itself: so the streams are ended first.
    """

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """End the event streams, then shut down as uvicorn does."""
        state = _demo_state(self.config.loaded_app)
        if state is not None:
            state.closing.cancel(CancelReason(CancelKind.SHUTDOWN))
        await super().shutdown(sockets)
