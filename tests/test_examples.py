from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_docs_blocks import assert_shows
from tests.workers import one_client_per_worker, wait_for_key

EXAMPLES = Path(__file__).parent.parent / "docs" / "examples"
PORT = r"(?<=127\.0\.0\.1:)\d+"  # a free port, another one in every run


def run_example(
    name: str, *args: str, stderr: int = subprocess.PIPE
) -> subprocess.CompletedProcess[str]:
    """Run docs/examples/<name> as a script; it must exit 0."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr or result.stdout
    return result


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_quickstart_runs_and_shows_each_reason(backend: str) -> None:
    """The README's example runs on both backends and shows superseded, deadline and shutdown."""
    result = run_example("quickstart.py", backend)
    out = result.stdout
    assert "stopped: superseded: superseded by a newer request (source: search 'cat')" in out
    assert "stopped: deadline" in out
    assert "worker thread stopped: parent:" in out
    assert "shutdown: the application is shutting down" in out
    assert "results for" not in out
    assert result.stderr == ""


def test_naive_global_task_recipe_shows_every_failure() -> None:
    """The tutorial's 'before' example really shows the recipe's failures on a real server."""
    assert_shows("naive_global_task.py", run_example("naive_global_task.py").stdout.splitlines())


def test_fastapi_latest_example_supersedes_per_user() -> None:
    """The guide's first example: alice's older keystroke gets a 409, bob is untouched."""
    assert_shows("fastapi_latest.py", run_example("fastapi_latest.py").stdout.splitlines())


def test_fastapi_cancel_by_id_example_shows_every_answer() -> None:
    """The cancel-by-id example: 404 for another owner, 202 cancelled/pending, 409, 422."""
    out = run_example("fastapi_cancel_by_id.py").stdout.splitlines()
    assert_shows("fastapi_cancel_by_id.py", out)


def test_fastapi_disconnect_example_stops_async_and_sync_handlers() -> None:
    """The disconnect example: both handlers stop when the client leaves, each logs a 499."""
    result = run_example("fastapi_disconnect.py")
    assert result.stdout.splitlines() == [
        "async handler stopped, token: parent: a linked token was cancelled"
        " <- client_disconnected: the client disconnected",
        "sync handler stopped at its next check: client_disconnected",
    ]
    assert result.stderr.count('" 499 client disconnected') == 2
    assert "Traceback" not in result.stderr


def test_threads_example_stops_blocking_code_and_wakes_a_waiting_thread() -> None:
    """The threads page: a sync loop stops at its next check, a blocked wait wakes at once."""
    out = run_example("threads_example.py").stdout.splitlines()
    assert out == [
        "poller woke at once after 0 polls: requested: cancellation was requested",
        "resize stopped at its next check: requested",
    ]


def test_testing_page_examples_are_passing_test_modules() -> None:
    """The testing page's examples are test modules of testing_app.py, and they pass in one
    session, with this project's pytest configuration (anyio's plugin and pytest-asyncio in
    strict mode, side by side): testing_example.py's tests each on asyncio and on trio, then
    the pytest-asyncio recipe's (its lifespan fixture's teardown must not fail), after the
    stream tests' real server has shut the app down."""
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA"),
            *("testing_example.py", "testing_pytest_asyncio.py"),
        ],
        cwd=EXAMPLES,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tests = [
        "test_a_newer_search_supersedes_the_older_one",
        "test_users_do_not_supersede_each_other",
        "test_only_the_owner_sees_and_cancels_an_export",
        "test_a_newer_stream_ends_the_older_one_cleanly",
        "test_a_stream_stops_when_its_client_leaves",
    ]
    recipe = [
        "test_a_newer_search_supersedes",
        "test_the_owner_cancels_an_export",
        "test_anyio_tests_keep_working[asyncio]",
        "test_anyio_tests_keep_working[trio]",
    ]
    passed = re.findall(r"^PASSED (\S+)$", result.stdout, re.M)
    assert sorted(passed) == sorted(
        [f"testing_example.py::{t}[{b}]" for t in tests for b in ("asyncio", "trio")]
        + [f"testing_pytest_asyncio.py::{t}" for t in recipe]
    )


def test_registry_example() -> None:
    """The registry how-to example cancels by id, is owner-scoped, and pre-cancels."""
    out = run_example("registry_example.py").stdout
    assert "bob cancels report-1: not_found" in out
    assert "alice cancels report-1: cancelled" in out
    assert "report-2 -> stopped (requested" in out
    assert "report-2 retried -> stopped (requested" in out


@pytest.mark.parametrize("expected", ["'c': superseded", "'cancel': finished", "'trio': finished"])
def test_latest_example(expected: str) -> None:
    """The latest-only how-to example lets only the newest search of a user finish."""
    assert expected in run_example("latest_example.py").stdout


def test_disconnect_example_runs() -> None:
    """The disconnect example shows the handler stopped for a client disconnect, quietly:
    its prints and the one 499 log line, in the order they were written."""
    result = run_example("disconnect_example.py", stderr=subprocess.STDOUT)
    assert_shows("disconnect_example.py", result.stdout.splitlines(), varying=PORT)


def test_fastapi_redis_example_across_two_real_uvicorn_workers(redis: Any) -> None:
    """uvicorn --workers 2 with a lifespan backend: supersede and cancel-by-id cross workers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "CANCELKIT_REDIS_URL": redis.url, "PYTHONPATH": str(EXAMPLES)}
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "uvicorn", "fastapi_redis:app", "--workers", "2"),
            *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"),
        ],
        cwd=EXAMPLES,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    clients: dict[str, httpx.Client] = {}
    deadline = time.monotonic() + 120  # workers import slowly on a loaded 2-core machine
    try:
        clients = one_client_per_worker(
            f"http://127.0.0.1:{port}",
            lambda client: str(client.get("/worker").json()["worker"]),
            workers=2,
            headers={"x-user": "alice"},
            deadline=deadline,
        )
        first, second = clients.values()
        with ThreadPoolExecutor(2) as pool:
            older = pool.submit(first.get, "/search", params={"q": "ca"})
            wait_for_key(redis, "cancelkit:k:alice:/search", deadline)  # it holds the key
            newer = second.get("/search", params={"q": "cat"})
            assert older.result().status_code == 409
            assert older.result().json()["reason"] == "superseded"
            assert newer.status_code == 200
            assert newer.json()["worker"] == list(clients)[1]  # ran on the other worker

            export = pool.submit(first.post, "/exports", headers={"X-Operation-Id": "op-42"})
            wait_for_key(redis, "cancelkit:i:op-42", deadline)  # registered on the first
            stop = second.delete("/operations/op-42")
            assert stop.status_code == 202
            assert stop.json()["outcome"] == "cancelled"
            assert export.result().status_code == 409
    finally:
        for client in clients.values():
            client.close()
        server.send_signal(signal.SIGINT)
        _, stderr = server.communicate(timeout=30)
    assert server.returncode == 0
    assert b"Traceback" not in stderr, stderr.decode()


def test_disconnect_recipes_run_on_uvicorn_hypercorn_and_the_guard() -> None:
    """The disconnect page's recipes: per-route modes, bounded cleanup, shutdown hooks, guard."""
    out = run_example("disconnect_recipes.py").stdout.splitlines()
    assert out[0] == "excluded route: {'status': 'ok'}"
    assert out[1] == "signalling route: {'status': 'paid', 'client_left': False}"
    assert out[2] == "interrupted handler cleaned up: ['order']"
    assert out[3].startswith("uvicorn stopped; statistics: DisconnectStatistics(requests=2,")
    assert "interrupted=1" in out[3]
    assert out[4:] == ["hypercorn on trio: {'status': 'ok'}", "guard: {'status': 'ok'}"]


def test_token_scopes_example() -> None:
    """The token page's example: scope() raises with the reason, move_on() records it."""
    out = run_example("token_scopes.py").stdout.splitlines()
    assert out == ["scope(): requested", "move_on(): cancelled_caught = True"]


def test_fastapi_operations_example_starts_reads_and_cancels() -> None:
    """The background-operations how-to: 202 + Location, the result, Stop, owner scoping."""
    result = run_example("fastapi_operations.py")
    assert_shows("fastapi_operations.py", result.stdout.splitlines())
    assert "Traceback" in result.stderr  # the server's log has it; the client never does


def test_naive_background_tasks_recipe_shows_every_failure() -> None:
    """The tutorial's 'before' for background work really fails on a real server."""
    out = run_example("naive_background_tasks.py").stdout.splitlines()
    assert_shows("naive_background_tasks.py", out)


def test_latest_policies_example_shows_each_policy_and_the_clients_order() -> None:
    """docs/examples/latest_policies.py: order, replace x2, reject, keep_latest, enqueue."""
    assert_shows("latest_policies.py", run_example("latest_policies.py").stdout.splitlines())


def test_commit_payment_example() -> None:
    """The commit-points example: Stop before the commit cancels, after it answers committed."""
    assert_shows("commit_payment.py", run_example("commit_payment.py").stdout.splitlines())


def test_beyond_example_stops_every_hop() -> None:
    """Three services: the budget shrinks hop by hop and ends in a marked 504; a client that
    leaves the frontend stops the search and the ranker too."""
    out = run_example("beyond_hops.py").stdout
    cat = [line for line in out.splitlines() if "'cat' started" in line]
    assert [line.split(":")[0] for line in cat] == ["frontend", "search", "ranker"]
    left = [int(line.split(", ")[1].split()[0]) for line in cat]
    assert 250 >= left[0] > left[1] > left[2] > 0
    assert "caller: HTTP 504, Deadline-Expired: true, deadline" in out
    after_leaving = out.split("caller: leaves")[1]
    for hop in ("frontend", "search", "ranker"):
        assert f"{hop}: stopped: client_disconnected" in after_leaving
        # stopped by the deadline, or (a moment earlier) by its caller giving up
        assert out.split("caller: HTTP 504")[0].count(f"{hop}: stopped:") == 1
    # what the page shows: the numbers, and which of the two a hop saw first, vary
    varying = r"\d+ ms left|stopped: (deadline|client_disconnected)"
    assert_shows("beyond_hops.py", out.splitlines(), varying=varying, any_order=True)
