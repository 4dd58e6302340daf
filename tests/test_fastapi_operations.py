import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
import httpx
import pytest
from fastapi import FastAPI, Header, Request, Response

from cancelkit import BackgroundOperations, CancelKind, OperationState
from cancelkit.fastapi import (
    OperationStartedBody,
    OperationStarter,
    install,
    operation_starter,
    operations_router,
)

pytestmark = pytest.mark.anyio


def current_user(x_user: Annotated[str, Header()]) -> str:
    """The app's own auth dependency (a header stands in for a session)."""
    return x_user


class Export:
    """An export the test steps through: it reports progress, then waits to be released."""

    def __init__(self) -> None:
        self.reported = anyio.Event()
        self.release = anyio.Event()
        self.cleaned: list[str] = []

    async def __call__(self, ops: BackgroundOperations, table: str) -> dict[str, Any]:
        try:
            await ops.report(1, 2, f"exporting {table}")
            self.reported.set()
            await self.release.wait()
            if table == "broken":
                raise ValueError("no such table")
            if table == "verbose":
                raise ValueError("é" * 1500)
            return {"table": table, "rows": 2}
        finally:
            self.cleaned.append(table)


def make_app(ops: BackgroundOperations, export: Export) -> FastAPI:
    app = FastAPI()
    install(app)
    Start = Annotated[OperationStarter, operation_starter(ops, owner=current_user)]

    @app.post("/exports", status_code=202, response_model=OperationStartedBody)
    async def start_export(table: str, start: Start) -> Response:
        return await start(export, ops, table)

    app.include_router(operations_router(ops, owner=current_user, max_wait=60))
    return app


@asynccontextmanager
async def running(**options: Any) -> AsyncIterator[tuple[BackgroundOperations, Export, Any]]:
    ops = BackgroundOperations(grace=0, **options)
    export = Export()
    app = make_app(ops, export)

    def client(user: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://test", headers={"x-user": user}
        )

    async with ops:  # what the app's lifespan does
        yield ops, export, client


async def test_post_answers_202_with_a_location_and_get_follows_to_the_result() -> None:
    """POST → 202 + Location; GET shows running with progress, then ?wait= gives the result."""
    async with running() as (_, export, client), client("alice") as alice:
        started = await alice.post("/exports", params={"table": "users"})
        assert started.status_code == 202
        body = started.json()
        assert body["state"] == "running"
        assert started.headers["location"] == f"/operations/{body['id']}"  # a path
        assert body["status_url"] == started.headers["location"]
        await export.reported.wait()
        status = (await alice.get(started.headers["location"])).json()
        assert status["state"] == "running"
        assert status["progress"] == {"done": 1, "total": 2, "message": "exporting users"}
        assert [type(status["progress"][n]) for n in ("done", "total")] == [int, int]  # not 1.0
        assert "owner" not in status
        export.release.set()
        final = await alice.get(started.headers["location"], params={"wait": 60})
        assert final.status_code == 200
        assert final.json()["state"] == "completed"
        assert final.json()["result"] == {"table": "users", "rows": 2}


async def test_delete_cancels_only_the_owners_operation() -> None:
    """Another owner gets 404 and the export runs on; the owner gets 202 and it stops."""
    async with running() as (ops, export, client), client("alice") as alice, client("bob") as bob:
        id = (await alice.post("/exports", params={"table": "t"})).json()["id"]
        assert (await bob.get(f"/operations/{id}")).status_code == 404
        other = await bob.delete(f"/operations/{id}")
        assert (other.status_code, other.json()["outcome"]) == (404, "not_found")
        stop = await alice.delete(f"/operations/{id}")
        assert (stop.status_code, stop.json()["outcome"]) == (202, "cancelled")
        status = (await alice.get(f"/operations/{id}", params={"wait": 60})).json()
        assert status["state"] == "cancelled"
        assert status["reason"]["kind"] == "requested"
        assert export.cleaned == ["t"]
        again = await alice.delete(f"/operations/{id}")
        assert again.status_code == 404
        assert ops.statistics().running == 0


async def test_a_cancel_sent_before_the_start_means_it_never_runs() -> None:
    """DELETE of a client-chosen id first → 202 pending; the POST then starts it cancelled."""
    async with running() as (_, export, client), client("alice") as alice:
        early = await alice.delete("/operations/export-1")
        assert (early.status_code, early.json()["outcome"]) == (202, "pending")
        started = await alice.post(
            "/exports", params={"table": "t"}, headers={"X-Operation-Id": "export-1"}
        )
        assert started.status_code == 202
        assert started.json() == {
            "id": "export-1",
            "state": "cancelled",
            "status_url": "/operations/export-1",
        }
        assert export.cleaned == []  # the function never ran


async def test_refusals_use_the_http_table() -> None:
    """A running id → 409 exists; over the per-owner limit → 503 full with Retry-After."""
    async with (
        running(max_running_per_owner=1) as (_, _export, client),
        client("alice") as alice,
        client("bob") as bob,
    ):
        first = await alice.post("/exports", params={"table": "a"}, headers={"X-Operation-Id": "x"})
        assert first.status_code == 202
        same = await alice.post("/exports", params={"table": "a"}, headers={"X-Operation-Id": "x"})
        assert (same.status_code, same.json()["reason"]) == (409, "exists")
        over = await alice.post("/exports", params={"table": "b"})
        assert (over.status_code, over.json()["reason"]) == (503, "full")
        assert over.headers["retry-after"] == "1"
        assert "max_running_per_owner" in over.json()["detail"]
        assert (await bob.post("/exports", params={"table": "c"})).status_code == 202


async def test_a_failure_shows_type_and_message_but_no_traceback() -> None:
    """GET of a failed export gives the error's type and message only."""
    async with running() as (_, export, client), client("alice") as alice:
        id = (await alice.post("/exports", params={"table": "broken"})).json()["id"]
        export.release.set()
        status = (await alice.get(f"/operations/{id}", params={"wait": 60})).json()
        assert status["state"] == "failed"
        assert status["error"] == {"type": "ValueError", "message": "no such table"}
        assert "Traceback" not in str(status)


async def test_an_error_message_is_cut_at_1000_characters() -> None:
    """docs/operations.md: an error's message is cut at 1,000 characters (the last one "…")."""
    async with running() as (_, export, client), client("alice") as alice:
        id = (await alice.post("/exports", params={"table": "verbose"})).json()["id"]
        export.release.set()
        status = (await alice.get(f"/operations/{id}", params={"wait": 60})).json()
        assert status["error"]["type"] == "ValueError"
        assert status["error"]["message"] == "é" * 999 + "…"


@pytest.mark.parametrize("where", ["mount", "root_path"])
async def test_location_includes_the_prefix_of_a_mount_or_a_proxy(where: str) -> None:
    """Location is a path: with the app mounted at /api, or behind a proxy that serves it
    under /proxy (root_path), it keeps that prefix, and the client can follow it."""
    ops = BackgroundOperations(grace=0)
    export = Export()
    app: Any = make_app(ops, export)
    prefix = "/api" if where == "mount" else "/proxy"
    if where == "mount":
        outer = FastAPI()
        outer.mount(prefix, app)
        transport = httpx.ASGITransport(outer)
        start = f"{prefix}/exports"
    else:
        transport = httpx.ASGITransport(app, root_path=prefix)
        start = "/exports"
    headers = {"x-user": "alice"}
    async with ops, httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        started = await http.post(start, params={"table": "t"}, headers=headers)
        location = started.headers["location"]
        assert location == f"{prefix}/operations/{started.json()['id']}"
        assert started.json()["status_url"] == location
        export.release.set()
        if where == "root_path":  # the proxy takes its prefix off before passing it on
            location = location.removeprefix(prefix)
        final = await http.get(location, params={"wait": 60}, headers=headers)
        assert final.json()["state"] == "completed"


async def test_bad_requests_are_refused() -> None:
    """Unknown ids → 404, malformed ids or waits → 422, a start while shutting down → 503."""
    ops = BackgroundOperations(grace=3600)
    export = Export()
    app = make_app(ops, export)
    transport = httpx.ASGITransport(app)

    async def during_shutdown(alice: httpx.AsyncClient) -> None:
        await anyio.wait_all_tasks_blocked()  # ops is in its grace period now
        late = await alice.post("/exports", params={"table": "late"})
        assert (late.status_code, late.json()["reason"]) == (503, "shutdown")
        export.release.set()

    async with (
        httpx.AsyncClient(
            transport=transport, base_url="http://test", headers={"x-user": "alice"}
        ) as alice,
        anyio.create_task_group() as tg,
        ops,
    ):
        assert (await alice.get("/operations/nope")).status_code == 404
        assert (await alice.get("/operations/no%20spaces")).status_code == 422
        assert (await alice.get("/operations/x", params={"wait": 61})).status_code == 422
        bad = await alice.post("/exports", params={"table": "t"}, headers={"X-Operation-Id": "a b"})
        assert bad.status_code == 422
        for segment in (".", ".."):  # a Location with them would point elsewhere
            refused = await alice.post(
                "/exports", params={"table": "t"}, headers={"X-Operation-Id": segment}
            )
            assert refused.status_code == 422, segment
        await alice.post("/exports", params={"table": "t"})
        await export.reported.wait()
        tg.start_soon(during_shutdown, alice)
    assert export.cleaned == ["t"]


async def test_the_router_state_maps_every_operation_state() -> None:
    """The status body's state literal accepts every OperationState."""
    from cancelkit.fastapi import OperationStatusBody

    for state in OperationState:
        body = OperationStatusBody(id="x", state=state.value, started_at=0.0)
        assert body.state == state.value


@pytest.mark.parametrize("user", ["two words", "x" * 257, "tab\there"])
async def test_an_owner_cancelkit_refuses_answers_a_clear_500(
    user: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The app's auth gives an owner cancelkit cannot use: start, status and cancel answer 500
    with a body naming the problem (not a bare 500), the log has the owner, nothing starts."""
    async with running() as (ops, _, client), client(user) as http:
        answers = [
            await http.post("/exports", params={"table": "users"}),
            await http.get("/operations/some-id"),
            await http.delete("/operations/some-id"),
        ]
        assert ops.statistics().started == 0
    for answer in answers:
        assert answer.status_code == 500
        assert "not a valid cancelkit owner" in answer.json()["detail"]
        assert user not in answer.text
    assert any("invalid owner" in record.getMessage() for record in caplog.records)


async def test_an_operation_does_not_inherit_the_deadline_of_the_request_that_started_it() -> None:
    """The request had 30 ms; its operation runs past that with no deadline, and completes."""
    from cancelkit import CancellationToken, CancelOnDisconnect, current_token, request_token

    ops = BackgroundOperations(grace=0)
    app = FastAPI()
    install(app)
    seen: list[float] = []
    request_tokens: list[CancellationToken] = []

    async def export(ops: BackgroundOperations, request: CancellationToken) -> str:
        token = current_token()
        assert token is not None
        seen.append(token.deadline)
        await request.wait()  # the request's deadline passes...
        assert not token.cancelled  # ...and the operation runs on
        return "done"

    Start = Annotated[OperationStarter, operation_starter(ops, owner=current_user)]

    @app.post("/exports", status_code=202, response_model=OperationStartedBody)
    async def start_export(start: Start, request: Request) -> Response:
        request_tokens.append(request_token(request.scope))
        return await start(export, ops, request_tokens[-1])

    app.include_router(operations_router(ops, owner=current_user, max_wait=60))
    transport = httpx.ASGITransport(CancelOnDisconnect(app))
    headers = {"x-user": "alice", "Request-Timeout-Ms": "30"}
    async with ops, httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        with anyio.fail_after(10):
            started = await http.post("/exports", headers=headers)
            assert started.status_code == 202
            status = await http.get(
                started.headers["location"], params={"wait": 60}, headers={"x-user": "alice"}
            )
    assert status.json()["state"] == "completed"
    assert status.json()["result"] == "done"
    assert seen == [math.inf]
    (token,) = request_tokens
    assert token.reason is not None
    assert token.reason.kind is CancelKind.DEADLINE
