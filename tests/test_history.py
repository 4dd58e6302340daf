"""The history checker (tests/history.py) on hand-written histories.

Every rule gets a history that breaks it (exactly that anomaly) and a legal, concurrent one
(no anomaly): a checker that cannot fail proves nothing.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.history import Event, History, check


def cancel(answer: str, start: float, end: float, id: str = "op") -> Event:
    return Event("test", end, "cancel", id, answer, start=start)


def body(
    *,
    start: float = 1.0,
    end: float = 9.0,
    how: str = "completed",
    process: str = "w1",
    id: str = "op",
    commit: tuple[float, float, str] | None = None,
) -> list[Event]:
    """A body that starts, maybe commits, leaves its block at ``end - 0.5`` and ends at ``end``."""
    events = [Event(process, start, "started", id)]
    if commit is not None:
        began, answered, answer = commit
        events.append(Event(process, answered, "commit", id, answer, start=began))
    events += [Event(process, end - 0.5, "exiting", id), Event(process, end, how, id)]
    return events


def claim(
    tag: str, generation: int, start: float, stop: float, *, process: str = "w1", key: str = "k"
) -> list[Event]:
    return [
        Event(process, start, "started", tag, str(generation), key=key),
        Event(process, stop, "stopping", tag),
        Event(process, stop + 0.1, "exiting", tag),
        Event(process, stop + 0.2, "cancelled", tag, "superseded"),
    ]


def outage(start: float, end: float, process: str = "w1") -> list[Event]:
    return [Event(process, start, "offline"), Event(process, end, "online")]


def only(anomalies: list[str], *words: str) -> None:
    assert len(anomalies) == 1, anomalies
    assert all(word in anomalies[0] for word in words), anomalies


# -- CANCELLED / PENDING, then it completed or committed anyway ----------------------------------


def test_completed_after_cancelled() -> None:
    only(check([cancel("cancelled", 2, 3), *body(end=5)]), "CANCELLED", "completed at 5")


def test_completed_while_the_cancel_was_in_flight_is_concurrent() -> None:
    assert check([cancel("cancelled", 2, 6), *body(end=5)]) == []


def test_completed_after_pending() -> None:
    only(check([cancel("pending", 0.2, 0.5), *body(end=5)]), "PENDING", "completed")


def test_completed_by_an_exit_under_way_when_pending_was_answered_agrees() -> None:
    """The exit (from 4.5) may have run first on the server: nothing ran when it answered."""
    assert check([cancel("pending", 4, 4.7), *body(end=5)]) == []
    found = check([cancel("pending", 4, 4.4), *body(end=5)])  # answered before it left
    assert any("completed" in line for line in found), found


def test_committed_after_cancelled() -> None:
    events = [cancel("cancelled", 2, 3), *body(end=9, how="cancelled", commit=(4, 4.5, "ok"))]
    only(check(events), "CANCELLED", "committed at 4.5")


def test_a_refused_commit_after_cancelled_is_the_truth() -> None:
    events = [cancel("cancelled", 2, 3), *body(end=9, how="cancelled", commit=(4, 4.5, "refused"))]
    assert check(events) == []


def test_a_commit_answered_during_the_cancel_is_concurrent() -> None:
    events = [cancel("committed", 2, 3), *body(end=9, commit=(1.5, 2.5, "ok"))]
    assert check(events) == []


def test_a_completion_whose_exit_met_an_outage_is_excused() -> None:
    excused: list[str] = []
    events = [cancel("cancelled", 2, 3), *body(end=5), *outage(4.7, 6)]
    assert check(events, excused=excused) == []
    assert len(excused) == 1
    assert "completed" in excused[0]


def test_an_outage_elsewhere_excuses_nothing() -> None:
    events = [cancel("cancelled", 2, 3), *body(end=5), *outage(4.7, 6, process="w2")]
    only(check(events), "CANCELLED")


def test_an_outage_before_the_exit_excuses_nothing() -> None:
    events = [cancel("cancelled", 2, 3), *body(end=5), *outage(2.5, 3.5)]
    only(check(events), "CANCELLED")


def test_a_commit_decided_offline_is_excused() -> None:
    excused: list[str] = []
    events = [
        cancel("cancelled", 2, 3),
        *body(end=9, commit=(4, 4.5, "ok")),
        *outage(3.9, 8),  # the commit was decided locally: the body then runs to its end
    ]
    assert check(events, excused=excused) == []
    assert len(excused) == 2


def test_pending_for_a_body_that_started_offline_is_excused() -> None:
    excused: list[str] = []
    events = [*outage(0.5, 3), cancel("pending", 2, 2.5), *body(start=1, end=5)]
    assert check(events, excused=excused) == []
    assert len(excused) == 2  # PENDING while it ran, and it completed after


# -- PENDING or NOT_FOUND while it ran ------------------------------------------------------------


def test_pending_while_it_ran() -> None:
    only(check([cancel("pending", 2, 3), *body(end=9, how="cancelled")]), "PENDING", "while")


def test_not_found_while_it_ran() -> None:
    only(check([cancel("not_found", 2, 3), *body(end=9, how="cancelled")]), "NOT_FOUND")


def test_not_found_around_a_start_or_an_exit_is_concurrent() -> None:
    assert check([cancel("not_found", 0.5, 3), *body(start=1, end=9)]) == []
    assert check([cancel("not_found", 2, 8.6), *body(start=1, end=9)]) == []  # exiting at 8.5
    assert check([cancel("not_found", 9.5, 10), *body(start=1, end=9)]) == []


# -- COMMITTED ------------------------------------------------------------------------------------


def test_committed_but_nothing_committed() -> None:
    only(check([cancel("committed", 2, 3), *body(end=9)]), "COMMITTED", "no body")
    only(check([cancel("committed", 2, 3), *body(end=9, commit=(1, 1.5, "unavailable"))]), "no")


def test_committed_after_a_commit_answered_later_is_the_truth() -> None:
    assert check([cancel("committed", 2, 3), *body(end=9, commit=(2.5, 3.5, "ok"))]) == []


# -- one id, one body -----------------------------------------------------------------------------


def test_two_bodies_of_one_id_at_once() -> None:
    events = [*body(start=1, end=5), *body(start=4, end=8, process="w2")]
    only(check(events), "ran twice at once")


def test_one_id_run_again_after_its_exit() -> None:
    assert check([*body(start=1, end=5), *body(start=4.6, end=8, process="w2")]) == []


# -- latest-only keys -----------------------------------------------------------------------------


def test_two_bodies_of_a_key_at_once_in_one_worker() -> None:
    events = [*claim("c1", 1, 1, 3), *claim("c2", 2, 2, 4)]
    only(check(events), "2 bodies ran at once in w1")
    assert check(events, max_concurrency=2) == []


def test_a_newer_body_starting_as_the_older_stops_is_one_at_a_time() -> None:
    assert check([*claim("c1", 1, 1, 2), *claim("c2", 2, 2, 4)]) == []


def test_two_workers_may_overlap_on_a_key() -> None:
    assert check([*claim("c1", 1, 1, 3), *claim("c2", 2, 2, 4, process="w2")]) == []


def owners(*tags: str, key: str = "k", at: float = 10) -> Event:
    return Event("test", at, "owners", "", " ".join(tags), start=at - 0.1, key=key)


def running(tag: str, generation: int, start: float, process: str = "w1") -> Event:
    return Event(process, start, "started", tag, str(generation), key="k")


def test_the_end_state_names_the_newest_running_claim() -> None:
    events = [*claim("c1", 1, 1, 2), running("c2", 2, 2, "w2"), owners("c2")]
    assert check(events) == []


def test_a_lost_newest_claim() -> None:
    events = [*claim("c1", 1, 1, 2), *claim("c2", 2, 2, 3, process="w2"), owners()]
    only(check(events), "newest admitted claim 'c2'", "lost")


def test_a_ghost_owner() -> None:
    events = [running("c1", 1, 1), *claim("c2", 2, 2, 3, process="w2"), owners("c2")]
    anomalies = check(events)
    assert any("names 'c2' running, a body that had stopped" in a for a in anomalies), anomalies
    events = [*claim("c1", 1, 1, 2), running("c2", 2, 2), owners("c2", "c9")]
    only(check(events), "names 'c9'")


def test_the_newest_runs_but_redis_names_no_owner() -> None:
    events = [*claim("c1", 1, 1, 2, process="w2"), running("c2", 2, 2), owners()]
    only(check(events), "newest claim 'c2' runs", "no owner")


def test_an_older_claim_still_running_at_the_end() -> None:
    events = [
        running("c1", 1, 1, "w2"),
        *claim("c0", 0, 0.5, 0.9),
        running("c2", 2, 2),
        owners("c2"),
    ]
    only(check(events), "'c1' in w2", "still runs")
    assert check(events, max_concurrency=2) == []


# -- worker lines ---------------------------------------------------------------------------------


def test_worker_lines() -> None:
    history = History()
    for line in [
        "1.5 ready W",
        "2.0 tracking op",
        "2.5 committing op",
        "3.0 committed op",
        "3.5 exiting op",
        "4.0 completed op",
        "4.5 claimed c1 CLAIMID 17",
        "5.0 stopping c1",
        "5.5 offline",
        "6.0 cancelled c1 superseded SOURCE",
        "6.5 outcome op not_found",
    ]:
        history.line("w1", line, keys={"c1": "k"})
    assert history.events == [
        Event("w1", 2.0, "started", "op"),
        Event("w1", 3.0, "commit", "op", "ok", start=2.5),
        Event("w1", 3.5, "exiting", "op"),
        Event("w1", 4.0, "completed", "op"),
        Event("w1", 4.5, "started", "c1", "17", key="k"),
        Event("w1", 5.0, "stopping", "c1"),
        Event("w1", 5.5, "offline"),
        Event("w1", 6.0, "cancelled", "c1", "superseded"),
    ]
    assert len(history) == 8
    assert history.summary() == (
        "8 events (cancelled: 1, commit ok: 1, completed: 1, exiting: 1, offline: 1, "
        "started: 2, stopping: 1); anomalies: 0, excused: 0"
    )


# -- any legal history passes ---------------------------------------------------------------------


@st.composite
def linearizable(draw: st.DrawFn) -> list[Event]:
    """One operation, a cancel and a commit decided atomically at random points in time.

    The answers follow from which decision came first; the calls' intervals and the body's
    events are drawn around their decision points, as a correct backend would produce them.
    """
    started = draw(st.floats(1, 2))
    cancel_at = draw(st.floats(0, 10))
    commit_at = draw(st.one_of(st.none(), st.floats(started, 10)))
    finish_at = draw(st.floats(started, 12))
    if cancel_at < started:
        return [cancel("pending", cancel_at - 0.3, cancel_at + 0.3)]  # it never starts
    events = [Event("w1", started, "started", "op")]
    slack = draw(st.floats(0, 0.5))
    committed = commit_at is not None and commit_at < min(cancel_at, finish_at)
    if finish_at < cancel_at:
        outcome, end, exit_at = "not_found", "completed", finish_at
    elif committed:
        outcome, end, exit_at = "committed", "completed", finish_at
    else:
        outcome, end, exit_at = "cancelled", "cancelled", cancel_at
    if commit_at is not None and commit_at < exit_at:
        answer = "ok" if committed else "refused"
        events.append(Event("w1", commit_at + slack, "commit", "op", answer, start=commit_at))
    events += [
        cancel(outcome, cancel_at - slack, cancel_at + slack),
        Event("w1", exit_at, "exiting", "op"),
        Event("w1", exit_at + slack, end, "op"),
    ]
    return events


@given(linearizable())
def test_a_linearizable_history_has_no_anomaly(events: list[Event]) -> None:
    assert check(events) == []
