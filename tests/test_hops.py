"""Three real server processes A → B → C, each calling the next with cancelkit.httpx.

A and C are uvicorn processes (asyncio), B a hypercorn process on trio (``-k trio``): one
chain, on 127.0.0.1, serves the whole module and has each loop call the other. B runs in
signal mode, so its call to C is stopped by the transport itself. The hops record what they saw
(tests/hops_app.py); the test reads the records with requests that wait on the hop's own
events, bounded, so nothing here sleeps or times anything.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from cancelkit import CancellationToken, OperationCancelled
from cancelkit.httpx import TokenTransport
from tests.hops import chain as hop_chain
from tests.hops import current
from tests.test_asgi_servers import read_response, request

pytestmark = pytest.mark.anyio

LIMIT = 60  # seconds: the most a test here may wait for anything


#: Each hop: its server (and so its event loop) and its CancelOnDisconnect mode. One chain
#: covers both loops: asyncio A calls trio B, trio B calls asyncio C. B runs in signal mode,
#: so its call to C is stopped by the transport itself; A and C interrupt.
HOPS = {
    "A": ("uvicorn", "interrupt"),
    "B": ("hypercorn-trio", "signal"),
    "C": ("uvicorn", "interrupt"),
}


@dataclass
class Chain:
    urls: dict[str, str]  # hop name -> base URL

    def port(self, hop: str) -> int:
        return int(self.urls[hop].rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    """A → B → C, started together, stopped (SIGINT) at the module's end."""
    with hop_chain(HOPS) as urls:
        yield Chain(urls)


@pytest.fixture
def anyio_backend() -> str:
    """The hops run both loops; this side only drives them (the last test runs on both)."""
    return "asyncio"


@asynccontextmanager
async def hops(chain: Chain) -> AsyncIterator[httpx.AsyncClient]:
    """A plain client for the hops' record routes, within LIMIT."""
    with anyio.fail_after(LIMIT):
        async with httpx.AsyncClient(timeout=LIMIT) as client:
            yield client


async def wait_record(
    client: httpx.AsyncClient, chain: Chain, hop: str, id: str, until: str
) -> Any:
    response = await client.get(f"{chain.urls[hop]}/records/{id}", params={"until": until})
    rec = response.json()
    assert until == "" or rec[until], rec
    return rec


async def ended(client: httpx.AsyncClient, chain: Chain, id: str) -> dict[str, Any]:
    return {hop: await wait_record(client, chain, hop, id, "ended") for hop in "ABC"}


def unique(name: str) -> str:
    return f"{name}-{time.monotonic_ns()}"


async def test_a_client_that_leaves_a_stops_b_and_c(chain: Chain) -> None:
    """The client of A disconnects: A's, B's and C's handlers are all cancelled."""
    id = unique("gone")
    async with hops(chain) as client:
        stream = await request(chain.port("A"), f"/work/{id}?hold=1")
        await wait_record(client, chain, "C", id, "started")
        await stream.aclose()
        records = await ended(client, chain, id)
    assert {hop: rec["end"] for hop, rec in records.items()} == {
        "A": "client_disconnected",
        "B": "client_disconnected",
        "C": "client_disconnected",
    }
    # one 499 each, to nobody (the server drops it): an outer middleware needs an answer
    assert all(rec["statuses"] == [499] for rec in records.values())


async def stopped_at_a(
    chain: Chain,
    client: httpx.AsyncClient,
    id: str,
    path: str,
    stop: Callable[[], Awaitable[Any]],
    **options: Any,
) -> tuple[int, dict[str, Any]]:
    """Send ``path`` to A, wait until C's handler runs, ``stop()`` it; A's status, the records."""
    stream = await request(chain.port("A"), path, **options)
    await wait_record(client, chain, "C", id, "started")
    await stop()
    status, _ = await read_response(stream)
    await stream.aclose()
    return status, await ended(client, chain, id)


async def test_a_superseded_search_at_a_stops_b_and_c(chain: Chain) -> None:
    """A newer search at A supersedes the older: B's and C's handlers of it are cancelled."""
    older, newer = unique("older"), unique("newer")
    answers: list[httpx.Response] = []

    async def newer_search() -> None:
        answers.append(await client.get(f"{chain.urls['A']}/search/{newer}"))

    async with hops(chain) as client:
        status, records = await stopped_at_a(
            chain, client, older, f"/search/{older}?hold=1", newer_search
        )
    assert answers[0].json() == {"done": "C"}
    assert status == 409
    assert {hop: rec["end"] for hop, rec in records.items()} == {
        "A": "superseded",
        "B": "client_disconnected",
        "C": "client_disconnected",
    }


async def test_a_cancel_by_id_at_a_stops_b_and_c(chain: Chain) -> None:
    """DELETE /operations/{id} at A: the operation's calls to B and C are cancelled too."""
    id = unique("op")
    cancels: list[httpx.Response] = []

    async def cancel() -> None:
        cancels.append(await client.delete(f"{chain.urls['A']}/operations/{id}"))

    async with hops(chain) as client:
        status, records = await stopped_at_a(
            chain,
            client,
            id,
            f"/report/{id}?hold=1",
            cancel,
            method="POST",
            headers={"X-Operation-Id": id},
        )
    assert cancels[0].status_code == 202
    assert status == 409
    assert {hop: rec["end"] for hop, rec in records.items()} == {
        "A": "requested",
        "B": "client_disconnected",
        "C": "client_disconnected",
    }


async def test_a_300_ms_budget_reaches_c_less_what_was_spent_and_ends_in_504s(
    chain: Chain,
) -> None:
    """300 ms at A: C gets at most 300 ms less what A and B spent; A answers 504 once, marked
    Deadline-Expired. B and C stop at their deadline, 4 ms before their caller's less the
    time the request took to reach them, answering one 504 (on a quiet machine 50 of 50
    times, benchmarks/bench_hops.py); a hop whose request took longer than those 4 ms to
    reach its application (a starved machine) has a deadline after its caller's, so it sees
    its caller leave first and answers one 499, to nobody. None runs on or answers twice."""
    id = unique("budget")
    async with hops(chain) as client:
        answer = await client.get(
            f"{chain.urls['A']}/work/{id}",
            params={"hold": "1", "spend_ms": "20"},
            headers={"Request-Timeout-Ms": "300"},
        )
        records = await ended(client, chain, id)
    assert answer.status_code == 504
    assert answer.headers["deadline-expired"] == "true"
    a, b, c = records["A"], records["B"], records["C"]
    assert a["left_ms"] <= 300
    spent_ms = (a["call"] - a["entry"] + b["call"] - b["entry"]) * 1000
    assert spent_ms >= 20  # A spent 20 ms before it called B (B did not wait: hold passes on)
    assert 0 < c["left_ms"] <= 300 - spent_ms
    assert a["statuses"] == [504]
    assert a["end"] == "deadline"
    for rec in (b, c):
        # A hop's deadline is its caller's less RETURN_MS less the request's way there: when
        # that way took longer than RETURN_MS, the caller's deadline comes first and the hop
        # sees its client leave (before its own deadline: after it, the deadline would win).
        assert rec["end"] in ("deadline", "client_disconnected"), rec
        assert rec["statuses"] in ([504], [499]), rec  # 499: to nobody, the caller is gone
        if rec["end"] == "client_disconnected":
            assert rec["statuses"] == [499], rec


async def test_a_request_with_nothing_left_never_runs(chain: Chain) -> None:
    """0 ms left on arrival at A: 504 Deadline-Expired, A's handler never runs, nor B's."""
    id = unique("late")
    async with hops(chain) as client:
        answer = await client.get(
            f"{chain.urls['A']}/work/{id}", headers={"Request-Timeout-Ms": "0"}
        )
        a = await wait_record(client, chain, "A", id, "ended")
        b = await wait_record(client, chain, "B", id, "")
    assert answer.status_code == 504
    assert answer.headers["deadline-expired"] == "true"
    assert answer.json()["reason"] == "deadline"
    assert (a["started"], a["statuses"], a["end"]) == (False, [504], "deadline")
    assert not b["started"]


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_1000_cancelled_calls_leave_no_open_connection(chain: Chain) -> None:
    """1,000 calls to C cancelled in flight (half waiting for the answer, half mid-stream),
    ten at a time: the client's pool keeps no connection, and C saw every client go. Half
    run in the token's own scope (its cancel ends the call; httpcore closes the connection),
    half signalled (the token current, no scope of its own: the transport aborts the call
    and raises OperationCancelled)."""
    pool = httpx.AsyncHTTPTransport()
    url = f"{chain.urls['C']}/work"
    cancelled: list[bool] = []

    async def call(caller: httpx.AsyncClient, i: int) -> None:
        token = CancellationToken()

        async def cancel_once_sent(event: str, info: dict[str, Any]) -> None:
            if event == "http11.receive_response_headers.started":  # the request is all out
                token.cancel()

        async def send() -> None:
            if i % 2:
                trace = {"trace": cancel_once_sent}
                await caller.get(f"{url}/{unique('many')}?hold=1", extensions=trace)
            else:
                async with caller.stream("GET", f"{url}/{unique('many')}?hold=2") as streamed:
                    async for _ in streamed.aiter_raw():
                        token.cancel()  # after the first chunk

        if i % 4 < 2:
            with token.move_on() as scope:
                await send()
            cancelled.append(scope.cancelled_caught)
        else:
            with current(token):
                try:
                    await send()
                except OperationCancelled as exc:
                    cancelled.append(exc.reason is token.reason)

    async def calls(caller: httpx.AsyncClient, first: int) -> None:
        for i in range(first, 1000, 10):
            await call(caller, i)

    async with hops(chain) as client:
        before = (await client.get(f"{chain.urls['C']}/counts")).json()["ended"]
        async with httpx.AsyncClient(transport=TokenTransport(pool), timeout=LIMIT) as caller:
            async with anyio.create_task_group() as tg:
                for first in range(10):
                    tg.start_soon(calls, caller, first)
            assert sum(not c.is_closed() for c in pool._pool.connections) == 0
        after = await client.get(f"{chain.urls['C']}/counts", params={"ended": before + 1000})
    assert cancelled == [True] * 1000
    assert after.json()["ended"] - before == 1000
