"""Cancel on disconnect under real servers: uvicorn, hypercorn (asyncio, trio), granian.

Servers listen on 127.0.0.1; the client is a raw socket, so the test decides exactly when it
closes. Handlers report progress through anyio events (in-process servers) or stdout lines
(granian, which only runs as a subprocess). Everything is bounded by ``anyio.fail_after``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.abc
import anyio.from_thread
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from fastapi import FastAPI, Request

from cancelkit import (
    CancelKind,
    CancellationToken,
    CancelOnDisconnect,
    request_token,
    shielded_cleanup,
)

pytestmark = pytest.mark.anyio

App = Callable[[Any, Any, Any], Awaitable[None]]
LIMIT = 10  # seconds: the most any test here may take

SERVERS = [("uvicorn", "asyncio"), ("hypercorn", "asyncio"), ("hypercorn", "trio")]


@pytest.fixture(params=SERVERS, ids=["-".join(s) for s in SERVERS])
def server_kind(request: pytest.FixtureRequest) -> tuple[str, str]:
    kind: tuple[str, str] = request.param
    return kind


@pytest.fixture
def anyio_backend(server_kind: tuple[str, str]) -> str:
    return server_kind[1]


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


@asynccontextmanager
async def serve(
    kind: tuple[str, str], mw: CancelOnDisconnect, outer: App | None = None
) -> AsyncIterator[int]:
    """Run ``mw`` (or ``outer``, an app around it) under a real server on 127.0.0.1; yield
    its port; stop it on exit.

    Stopping goes through the middleware's shutdown(), as the docs recommend.
    """
    app: Any = mw if outer is None else outer
    sock = listening_socket()
    port: int = sock.getsockname()[1]
    stop = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:
            if kind[0] == "uvicorn":
                import uvicorn

                class Server(uvicorn.Server):
                    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
                        await mw.shutdown()
                        await super().shutdown(sockets)

                config = uvicorn.Config(app, lifespan="on", log_config=None, log_level="warning")
                server = Server(config)

                async def run_uvicorn() -> None:
                    await server.serve([sock])

                async def stop_uvicorn() -> None:
                    await stop.wait()
                    server.should_exit = True

                tg.start_soon(run_uvicorn)
                tg.start_soon(stop_uvicorn)
            else:
                from hypercorn.config import Config

                hconfig = Config()
                hconfig.bind = [f"fd://{os.dup(sock.fileno())}"]
                hconfig.graceful_timeout = LIMIT
                hconfig.accesslog = None
                hconfig.errorlog = None

                async def trigger() -> None:
                    await stop.wait()
                    await mw.shutdown()

                if kind[1] == "trio":
                    from hypercorn.trio import serve as hypercorn_serve
                else:
                    from hypercorn.asyncio import serve as hypercorn_serve  # type: ignore[assignment]
                tg.start_soon(lambda: hypercorn_serve(app, hconfig, shutdown_trigger=trigger))
            try:
                yield port
            finally:
                stop.set()
    finally:
        sock.close()


async def request(
    port: int,
    path: str = "/",
    *,
    method: str = "GET",
    body: bytes = b"",
    close: bool = False,
    headers: dict[str, str] | None = None,
) -> anyio.abc.SocketStream:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    head = f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    if close:
        head += "Connection: close\r\n"
    await stream.send(head.encode() + b"\r\n")
    for i in range(0, len(body), 65536):
        await stream.send(body[i : i + 65536])
    return stream


async def read_response(stream: anyio.abc.SocketStream) -> tuple[int, bytes]:
    """Read one HTTP/1.1 response (content-length or chunked) and return status and body."""
    buffered = BufferedByteReceiveStream(stream)
    head = await buffered.receive_until(b"\r\n\r\n", 65536)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    if "content-length" in headers:
        return status, await buffered.receive_exactly(int(headers["content-length"]))
    data = b""
    while True:
        size = int(await buffered.receive_until(b"\r\n", 100), 16)
        chunk = await buffered.receive_exactly(size + 2)
        if size == 0:
            return status, data
        data += chunk[:-2]


async def respond(send: Any, text: bytes = b"ok", status: int = 200) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-length", str(len(text)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": text})


class Handler:
    """A plain ASGI handler that reports what happened to the test."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.ended = anyio.Event()
        self.release = anyio.Event()
        self.token: CancellationToken | None = None
        self.cleanup_ran = False
        self.completed = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        self.token = request_token(scope)
        self.started.set()
        try:
            await self.release.wait()
            self.completed = True
            await respond(send)
        finally:
            with shielded_cleanup(1.0):
                await anyio.lowlevel.checkpoint()
                self.cleanup_ran = True
            self.ended.set()


async def lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        else:
            await send({"type": "lifespan.shutdown.complete"})
            return


def reason_kind(token: CancellationToken | None) -> CancelKind | None:
    assert token is not None
    return None if token.reason is None else token.reason.kind


async def test_client_close_cancels_handler(server_kind: tuple[str, str]) -> None:
    """A client that sends a request and closes: handler cancelled, cleanup ran, reason right."""
    handler = Handler()
    mw = CancelOnDisconnect(handler)
    with anyio.fail_after(LIMIT):
        async with serve(server_kind, mw) as port:
            stream = await request(port, "/slow")
            await handler.started.wait()
            await stream.aclose()
            await handler.ended.wait()
    assert handler.cleanup_ran
    assert not handler.completed
    assert reason_kind(handler.token) is CancelKind.CLIENT_DISCONNECTED
    stats = mw.statistics()
    assert (stats.disconnects, stats.interrupted, stats.shutdown_cancelled) == (1, 1, 0)


async def test_slow_upload_arrives_whole(server_kind: tuple[str, str]) -> None:
    """A 1 MB upload read slowly by the handler arrives byte for byte (same checksum)."""
    payload = os.urandom(1 << 20)
    digests: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        digest = hashlib.sha256()
        more = True
        while more:
            message = await receive()
            digest.update(message.get("body", b""))
            more = message.get("more_body", False)
            await anyio.sleep(0.001)  # a slow consumer
        digests.append(digest.hexdigest())
        await respond(send, digests[-1].encode())

    with anyio.fail_after(LIMIT):
        async with serve(server_kind, CancelOnDisconnect(app, max_buffer=16384)) as port:
            stream = await request(port, "/upload", method="POST", body=payload)
            status, answer = await read_response(stream)
            await stream.aclose()
    assert status == 200
    assert answer.decode() == hashlib.sha256(payload).hexdigest()


async def test_keep_alive_close_after_response_cancels_nothing(
    server_kind: tuple[str, str],
) -> None:
    """A completed response followed by a close cancels nothing, background work included."""
    tokens: list[CancellationToken] = []
    background_done = anyio.Event()
    client_closed = anyio.Event()
    seen_after_response: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        token = request_token(scope)
        tokens.append(token)
        assert (await receive())["type"] == "http.request"
        await anyio.lowlevel.checkpoint()
        await respond(send)
        if len(tokens) == 1:  # "background task" of the first request
            seen_after_response.append((await receive())["type"])
            await client_closed.wait()
            await anyio.lowlevel.checkpoint()
            background_done.set()

    mw = CancelOnDisconnect(app)
    with anyio.fail_after(LIMIT):
        async with serve(server_kind, mw) as port:
            stream = await request(port, "/a")
            assert await read_response(stream) == (200, b"ok")
            await stream.send(b"GET /b HTTP/1.1\r\nHost: test\r\n\r\n")
            assert await read_response(stream) == (200, b"ok")
            await stream.aclose()
            client_closed.set()
            await background_done.wait()
    assert seen_after_response == ["http.disconnect"]
    assert [t.cancelled for t in tokens] == [False, False]
    assert mw.statistics().disconnects == 0


async def test_streaming_response_then_disconnect(server_kind: tuple[str, str]) -> None:
    """A streaming response whose client leaves is stopped; its cleanup runs."""
    handler = Handler()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        handler.token = request_token(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            while True:
                await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
                handler.started.set()
                await anyio.sleep(0.005)  # pacing, not ordering
        finally:
            handler.cleanup_ran = True
            handler.ended.set()

    with anyio.fail_after(LIMIT):
        async with serve(server_kind, CancelOnDisconnect(app)) as port:
            stream = await request(port, "/stream")
            await handler.started.wait()
            assert b"tick" in await stream.receive()
            await stream.aclose()
            await handler.ended.wait()
    assert reason_kind(handler.token) is CancelKind.CLIENT_DISCONNECTED


async def test_starlette_streaming_response_then_disconnect(
    server_kind: tuple[str, str],
) -> None:
    """A Starlette StreamingResponse under the middleware stops when the client leaves."""
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    handler = Handler()

    async def ticks() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"tick\n"
                handler.started.set()
                await anyio.sleep(0.005)  # pacing, not ordering
        finally:
            handler.cleanup_ran = True
            handler.ended.set()

    async def endpoint(request: Any) -> StreamingResponse:
        handler.token = request_token(request.scope)
        return StreamingResponse(ticks())

    app = Starlette(routes=[Route("/stream", endpoint)])
    with anyio.fail_after(LIMIT):
        async with serve(server_kind, CancelOnDisconnect(app)) as port:
            stream = await request(port, "/stream")
            await handler.started.wait()
            await stream.aclose()
            await handler.ended.wait()
    assert reason_kind(handler.token) is CancelKind.CLIENT_DISCONNECTED


async def test_shutdown_with_request_in_flight(server_kind: tuple[str, str]) -> None:
    """Shutdown cancels an in-flight request with reason shutdown; the client gets a 503."""
    handler = Handler()
    mw = CancelOnDisconnect(handler, shutdown_grace=0)
    with anyio.fail_after(LIMIT):
        async with serve(server_kind, mw) as port:
            stream = await request(port, "/slow")
            await handler.started.wait()
        # the server has stopped: the handler ended and the client got its answer
        status, _ = await read_response(stream)
        await stream.aclose()
    assert status == 503
    assert handler.cleanup_ran
    assert reason_kind(handler.token) is CancelKind.SHUTDOWN
    assert mw.statistics().shutdown_cancelled == 1


async def test_shutdown_ends_streaming_response(server_kind: tuple[str, str]) -> None:
    """A streaming response does not hold up shutdown: it is cut short (visibly to the client:
    no final chunk) and the server stops."""
    streaming = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first\n", "more_body": True})
        streaming.set()
        await anyio.sleep_forever()

    with anyio.fail_after(LIMIT):
        async with serve(server_kind, CancelOnDisconnect(app, shutdown_grace=0)) as port:
            stream = await request(port, "/events")
            await streaming.wait()
        raw = b""
        while True:
            try:
                raw += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                break
        await stream.aclose()
    head, _, chunks = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"first\n" in chunks
    assert not chunks.endswith(b"0\r\n\r\n")  # no terminating chunk: visibly incomplete


async def test_signal_mode_leaves_handler_running(server_kind: tuple[str, str]) -> None:
    """In signalling mode the handler keeps running after the client left; its token is
    cancelled."""
    handler = Handler()
    finished = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        handler.token = token = request_token(scope)
        handler.started.set()
        await token.wait()
        await anyio.lowlevel.checkpoint()  # still running: finishing the "transaction"
        handler.completed = True
        await respond(send)
        finished.set()

    with anyio.fail_after(LIMIT):
        async with serve(server_kind, CancelOnDisconnect(app, mode="signal")) as port:
            stream = await request(port, "/tx")
            await handler.started.wait()
            await stream.aclose()
            await finished.wait()
    assert handler.completed
    assert reason_kind(handler.token) is CancelKind.CLIENT_DISCONNECTED


async def test_fastapi_endpoint_cancelled(server_kind: tuple[str, str]) -> None:
    """A FastAPI async endpoint under the middleware is cancelled when its client leaves."""
    handler = Handler()
    api = FastAPI()

    @api.get("/work")
    async def work(request: Request) -> dict[str, str]:
        handler.token = request_token(request.scope)
        handler.started.set()
        try:
            await anyio.sleep_forever()
        finally:
            handler.cleanup_ran = True
            handler.ended.set()
        return {}  # pragma: no cover

    with anyio.fail_after(LIMIT):
        async with serve(server_kind, CancelOnDisconnect(api)) as port:
            stream = await request(port, "/work")
            await handler.started.wait()
            await stream.aclose()
            await handler.ended.wait()
    assert reason_kind(handler.token) is CancelKind.CLIENT_DISCONNECTED


# Starlette before it closed Request.stream() with aclosing (0.49.3, our floor, does not)
# leaves that generator half-read in BaseHTTPMiddleware: trio warns when it is collected, for
# every request, with or without cancelkit. (Later versions never emit it.)
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in.*Request.stream:pytest.PytestUnraisableExceptionWarning"
)
@pytest.mark.parametrize("mode", ["interrupt", "signal"])
async def test_a_disconnect_under_an_outer_base_http_middleware_raises_nothing(
    server_kind: tuple[str, str], mode: Literal["interrupt", "signal"]
) -> None:
    """Starlette's BaseHTTPMiddleware outside the guard relays the response: a request whose
    client left got none, and its call_next raised "No response returned" (a traceback in
    the log for every disconnect). Now the guard answers 499 to nobody."""
    from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
    from starlette.responses import Response

    handler = Handler()
    errors: list[BaseException] = []
    outer_done = anyio.Event()

    async def answering(scope: Any, receive: Any, send: Any) -> None:
        """Signal mode: the handler sees the token fire and answers anyway (to nobody)."""
        if scope["type"] != "http":
            return await handler(scope, receive, send)
        handler.token = token = request_token(scope)
        handler.started.set()
        await token.wait()
        await respond(send, b"late")

    async def passthrough(request: Request, call_next: RequestResponseEndpoint) -> Response:
        return await call_next(request)

    mw = CancelOnDisconnect(handler if mode == "interrupt" else answering, mode=mode)
    relayed = BaseHTTPMiddleware(mw, dispatch=passthrough)

    async def recorder(scope: Any, receive: Any, send: Any) -> None:
        try:
            await relayed(scope, receive, send)
        except Exception as exc:
            errors.append(exc)
            raise
        finally:
            if scope["type"] == "http":
                outer_done.set()

    with anyio.fail_after(LIMIT):
        async with serve(server_kind, mw, recorder) as port:
            stream = await request(port, "/hang")
            await handler.started.wait()
            await stream.aclose()
            await outer_done.wait()
    assert errors == []
    assert reason_kind(handler.token) is CancelKind.CLIENT_DISCONNECTED


@pytest.mark.parametrize("dependency", ["latest_only", "tracked"])
async def test_current_token_in_a_sync_dependency_endpoint_sees_the_disconnect(
    server_kind: tuple[str, str], dependency: str
) -> None:
    """In a sync latest_only/tracked endpoint (threadpool), current_token() is cancelled by a
    client disconnect, as RequestToken is (issue 12 item 2)."""
    from cancelkit import LatestOnly, TokenRegistry, current_token
    from cancelkit.fastapi import install, latest_only, tracked

    started = anyio.Event()
    ended = anyio.Event()
    seen: list[object] = []
    marker = (
        latest_only(LatestOnly(), key=lambda request: "k")
        if dependency == "latest_only"
        else tracked(TokenRegistry())
    )
    api = FastAPI()
    install(api)

    @api.get("/work")
    def work(held: Any = marker) -> dict[str, str]:  # (annotations are strings here)
        token = current_token()
        assert token is held.token
        anyio.from_thread.run_sync(started.set)
        try:
            seen.append(token.wait_blocking(timeout=LIMIT / 2))  # True: cancelled in time
            seen.append(None if token.reason is None else token.reason.root.kind)
        finally:
            anyio.from_thread.run_sync(ended.set)
        return {}

    with anyio.fail_after(LIMIT):
        async with serve(server_kind, CancelOnDisconnect(api)) as port:
            stream = await request(port, "/work")
            await started.wait()
            await stream.aclose()
            await ended.wait()
    assert seen == [True, CancelKind.CLIENT_DISCONNECTED]


# --------------------------------------------------------------------------- granian

GRANIAN_APP = textwrap.dedent(
    """
    import hashlib, sys
    import anyio
    from cancelkit import CancelOnDisconnect, request_token

    def say(*words):
        print(*words, flush=True)

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].split(".")[1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        token = request_token(scope)
        if scope["path"] == "/upload":
            digest, more = hashlib.sha256(), True
            while more:
                message = await receive()
                digest.update(message.get("body", b""))
                more = message.get("more_body", False)
                await anyio.sleep(0.001)
            body = digest.hexdigest().encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        say("started", scope["path"])
        try:
            await anyio.sleep(30)
        finally:
            say("ended", scope["path"], token.reason.kind if token.reason else None)

    app = CancelOnDisconnect(app)
    """
)


@pytest.fixture
def granian_port(tmp_path: Path) -> Any:
    if shutil.which("granian", path=os.path.dirname(sys.executable)) is None:
        if os.environ.get("CI") == "true":  # pragma: no cover - CI installs every server
            pytest.fail("granian is missing: CI must not skip it (it is in the test group)")
        pytest.skip("granian is not installed")  # pragma: no cover
    (tmp_path / "granian_app.py").write_text(GRANIAN_APP)
    sock = listening_socket()
    port = sock.getsockname()[1]
    sock.close()
    return tmp_path, port


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_granian_client_close_and_upload(granian_port: Any) -> None:
    """Under granian (a subprocess): client close cancels the handler; an upload arrives whole."""
    app_dir, port = granian_port
    granian = os.path.join(os.path.dirname(sys.executable), "granian")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(app_dir), os.getcwd()])}
    command = [granian, "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", "1", "--log-level", "warning", "granian_app:app"]
    process = await anyio.open_process(command, env=env)
    assert process.stdout is not None
    lines = BufferedByteReceiveStream(process.stdout)
    try:
        with anyio.fail_after(LIMIT):
            while True:  # wait until granian accepts connections
                try:
                    stream = await anyio.connect_tcp("127.0.0.1", port)
                except OSError:
                    await anyio.sleep(0.05)
                else:
                    await stream.aclose()
                    break
            stream = await request(port, "/slow")
            assert await lines.receive_until(b"\n", 1000) == b"started /slow"
            await stream.aclose()
            assert await lines.receive_until(b"\n", 1000) == b"ended /slow client_disconnected"

            payload = os.urandom(1 << 20)
            stream = await request(port, "/upload", method="POST", body=payload)
            status, answer = await read_response(stream)
            await stream.aclose()
            assert (status, answer.decode()) == (200, hashlib.sha256(payload).hexdigest())
    finally:
        process.terminate()
        with anyio.move_on_after(LIMIT):
            await process.wait()
        await process.aclose()
