"""A fault race's history, and a checker that fails on any answer that contradicts it.

Every process of a race records what it did and saw as :class:`Event` s: the calls it made
and their answers (``cancel`` answered cancelled / pending / not_found / committed /
unavailable; a body's ``commit`` answered ok / refused / unavailable), the life of each body
(``started``, ``stopping`` when its token was cancelled, ``exiting`` when it left its block,
then ``completed``, ``cancelled`` or ``failed`` when the exit answered), its backend's
``offline`` / ``online`` changes (the ``cancelkit.redis`` warnings), and at the end the
``owners`` that Redis names running for a latest-only key. :func:`check` replays them over
a small model (id -> pending, running, cancelled, committed, finished; key -> newest
admitted claim) and returns one human-readable line per anomaly.

Times are ``time.monotonic()`` of each process. All processes of a race run on one host,
where that clock is the same system-wide clock (``CLOCK_MONOTONIC``), so times of different
processes compare. (Processes on different machines would need a common clock.)

Interval semantics: a call is the interval from its start to its answer; an answer
contradicts a body event only if that event happened strictly *after* the answer was
received (or strictly before the call started), never while the call was in flight.

Documented fail-open trade-offs (docs/redis.md, docs/commit.md) are *excused*, not
anomalies, and only when the process's backend was offline during the deciding step: a
completion or commit whose step overlaps an outage of its process, or, after ``PENDING``, a
body that was admitted during an outage (registered only locally). The excuses are listed
separately so a run can report how many it needed.
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

__all__ = ["Body", "Event", "History", "Outages", "check", "spinners"]

#: ``offline(process, start, end)``: whether the process was offline at some time in between.
_Offline = Callable[[str, float, float], bool]

#: The body events that end a body's run (with the exit's answer).
ENDS = frozenset({"completed", "cancelled", "failed"})


@dataclass(frozen=True, slots=True)
class Event:
    """One thing a process did or saw.

    Attributes:
        process: who recorded it ("test", "w1", ...).
        time: ``time.monotonic()`` when it happened (for a call: when the answer came).
        kind: ``cancel``, ``commit``, ``started``, ``stopping``, ``exiting``, ``completed``,
            ``cancelled``, ``failed``, ``offline``, ``online`` or ``owners``.
        id: the operation id or claim tag ("" for ``offline`` / ``online``).
        value: the answer, a reason, a generation, or the owners (space-separated tags).
        start: for a call (``cancel``, ``commit``, ``owners``): when it was made.
        key: the latest-only key of a claim's ``started`` event and of ``owners``.
    """

    process: str
    time: float
    kind: str
    id: str = ""
    value: str = ""
    start: float | None = None
    key: str = ""

    @property
    def began(self) -> float:
        """When the call was made (an instant event: its time)."""
        return self.time if self.start is None else self.start


@dataclass(slots=True)
class Body:
    """One run of a body: an operation id or a claim, in one process."""

    process: str
    id: str
    started: float
    key: str = ""
    generation: int = 0
    stopping: float = math.inf  # its token was cancelled
    exiting: float = math.inf  # it left its block (the exit then asks the backend)
    end: str = ""  # completed / cancelled / failed ("" while it runs)
    ended: float = math.inf
    commits: list[Event] = field(default_factory=list)

    @property
    def stopped(self) -> float:
        """When it stopped running: cancelled or out of its block, whichever came first."""
        return min(self.stopping, self.exiting)


@dataclass(slots=True)
class History:
    """The events of a race, appended as they happen (one list for all processes)."""

    events: list[Event] = field(default_factory=list)
    _committing: dict[tuple[str, str], float] = field(default_factory=dict)

    def add(self, event: Event) -> None:
        """Record an event."""
        self.events.append(event)

    def line(self, process: str, line: str, *, keys: dict[str, str] | None = None) -> None:
        """Record a worker's stdout line: ``TIME KIND ID [VALUE...]`` (tests/redis_worker.py).

        ``claimed TAG CLAIM_ID GENERATION`` is a claim's ``started`` (its key from ``keys``,
        TAG -> key); ``tracking ID`` an operation's; ``committed ID`` / ``refused ID`` /
        ``unavailable ID`` answer the body's commit started at ``committing ID``. Other
        lines (``ready``, ``outcome``...) are not body events and are ignored.
        """
        time_text, kind, *rest = line.split()
        time = float(time_text)
        id = rest[0] if rest else ""
        if kind == "claimed":
            key = (keys or {}).get(id, "")
            self.add(Event(process, time, "started", id, rest[2], key=key))
        elif kind == "tracking":
            self.add(Event(process, time, "started", id))
        elif kind == "committing":
            self._committing[(process, id)] = time
        elif kind in ("committed", "refused", "unavailable"):
            answer = {"committed": "ok"}.get(kind, kind)
            start = self._committing.pop((process, id), time)
            self.add(Event(process, time, "commit", id, answer, start=start))
        elif kind in ("stopping", "exiting", "offline", "online", *ENDS):
            self.add(Event(process, time, kind, id, " ".join(rest[1:2])))

    def __len__(self) -> int:
        return len(self.events)

    def around(self, anomaly: str, width: float = 0.05) -> str:
        """The events within ``width`` seconds of the first time an anomaly line names."""
        times = [float(w) for w in anomaly.replace(",", " ").split() if _is_time(w)]
        if not times:
            return ""
        near = [e for e in self.events if abs(e.time - times[0]) <= width]
        return "\n".join(
            f"{e.time:.6f} {e.process} {e.kind} {e.id} {e.value} {e.key}".rstrip()
            for e in sorted(near, key=lambda e: e.time)
        )

    def summary(self) -> str:
        """What the history holds: events by kind (calls by kind and answer), outages excused."""
        kinds = Counter(
            f"{e.kind} {e.value}" if e.kind in ("cancel", "commit") else e.kind for e in self.events
        )
        excused: list[str] = []
        anomalies = check(self, excused=excused)
        counts = ", ".join(f"{kind}: {n}" for kind, n in sorted(kinds.items()))
        return (
            f"{len(self.events)} events ({counts}); "
            f"anomalies: {len(anomalies)}, excused: {len(excused)}"
        )


def _is_time(word: str) -> bool:
    head, dot, tail = word.partition(".")
    return bool(dot) and head.isdigit() and tail.isdigit()


def _bodies(events: list[Event]) -> dict[str, list[Body]]:
    """Every body by id, from its events in time order (a process's bodies of one id in turn)."""
    bodies: dict[str, list[Body]] = defaultdict(list)
    current: dict[tuple[str, str], Body] = {}
    for event in sorted(events, key=lambda e: e.time):
        where = (event.process, event.id)
        if event.kind == "started":
            generation = int(event.value) if event.value else 0
            new = Body(event.process, event.id, event.time, event.key, generation)
            current[where] = new
            bodies[event.id].append(new)
        elif (body := current.get(where)) is None:
            continue  # an end with no start: the registration was refused
        elif event.kind == "stopping":
            body.stopping = min(body.stopping, event.time)
        elif event.kind == "exiting":
            body.exiting = event.time
        elif event.kind == "commit":
            body.commits.append(event)
        elif event.kind in ENDS:
            body.end, body.ended = event.kind, event.time
            body.exiting = min(body.exiting, event.time)
            del current[where]
    return bodies


def _outages(events: list[Event]) -> dict[str, list[tuple[float, float]]]:
    """Each process's offline intervals (the last may still be open)."""
    outages: dict[str, list[tuple[float, float]]] = defaultdict(list)
    down: dict[str, float] = {}
    for event in sorted(events, key=lambda e: e.time):
        if event.kind == "offline":
            down.setdefault(event.process, event.time)
        elif event.kind == "online" and event.process in down:
            outages[event.process].append((down.pop(event.process), event.time))
    for process, since in down.items():
        outages[process].append((since, math.inf))
    return outages


def check(
    history: History | Iterable[Event],
    *,
    max_concurrency: int = 1,
    excused: list[str] | None = None,
) -> list[str]:
    """Every answer of ``history`` that contradicts what happened; ``[]`` if none does.

    Args:
        history: the events of a race (any order).
        max_concurrency: the latest-only keys' limit of running bodies per worker.
        excused: if given, gets a line for each contradiction that a documented fail-open
            trade-off explains (its process was offline during the deciding step).

    Returns:
        One line per anomaly, naming the rule, the id or key and the times.
    """
    events = list(history.events if isinstance(history, History) else history)
    bodies = _bodies(events)
    outages = _outages(events)
    anomalies: list[str] = []
    notes = excused if excused is not None else []

    def offline(process: str, start: float, end: float) -> bool:
        return any(start <= up and end >= down for down, up in outages.get(process, ()))

    for call in events:
        if call.kind == "cancel":
            anomalies += _cancel(call, bodies.get(call.id, []), offline, notes)
        elif call.kind == "owners":
            anomalies += _owners(call, bodies, max_concurrency)
    anomalies += _overlaps(bodies, max_concurrency)
    return anomalies


def _cancel(call: Event, bodies: list[Body], offline: _Offline, notes: list[str]) -> list[str]:
    """The rules for one cancel's answer against the bodies of its id."""
    found: list[str] = []
    answer, at = call.value, f"answered at {call.time:.6f} (asked at {call.began:.6f})"
    for body in bodies:
        where = f"{call.id!r} in {body.process}"
        if answer in ("cancelled", "pending"):
            # PENDING says nothing of the id ran when Redis answered: an exit already under
            # way then (its registration lost, it completed first) agrees with it. CANCELLED
            # needs a registration, which a completed exit deletes: no order excuses it.
            decided = body.ended if answer == "cancelled" else body.exiting
            if body.end == "completed" and decided > call.time:
                step = offline(body.process, body.exiting, body.ended) or any(
                    c.value == "ok" and offline(body.process, c.began, c.time)
                    for c in body.commits  # a commit decided offline: it runs to its end
                )
                local = answer == "pending" and offline(body.process, body.started, body.started)
                line = f"cancel {answer.upper()} {at}, then {where} completed at {body.ended:.6f}"
                (notes if step or local else found).append(line)
            for commit in body.commits:
                if commit.value == "ok" and commit.time > call.time:
                    line = (
                        f"cancel {answer.upper()} {at}, then {where} committed at {commit.time:.6f}"
                    )
                    local = offline(body.process, commit.began, commit.time)
                    (notes if local else found).append(line)
            if answer == "pending" and body.started < call.began and body.stopped > call.time:
                line = f"cancel PENDING {at} while {where} ran (from {body.started:.6f})"
                (notes if offline(body.process, body.started, call.time) else found).append(line)
        elif answer == "not_found" and body.started < call.began and body.exiting > call.time:
            found.append(f"cancel NOT_FOUND {at} while {where} ran (from {body.started:.6f})")
    if answer == "committed" and not any(c.value == "ok" for b in bodies for c in b.commits):
        found.append(f"cancel COMMITTED {at} for {call.id!r}, but no body of it committed")
    return found


def _owners(call: Event, bodies: dict[str, list[Body]], max_concurrency: int) -> list[str]:
    """The end state of a key (read after the faults stopped and a resync)."""
    found: list[str] = []
    claims = [b for runs in bodies.values() for b in runs if b.key == call.key]
    named = call.value.split()
    for tag in named:
        runs = bodies.get(tag, [])
        if not any(b.stopped > call.began for b in runs):
            found.append(f"key {call.key!r}: Redis names {tag!r} running, a body that had stopped")
    if claims:
        by_age = sorted(claims, key=lambda b: b.generation, reverse=True)
        found.extend(
            f"key {call.key!r}: {old.id!r} in {old.process} (generation {old.generation}) "
            "still runs after the resync, behind a newer claim"
            for old in by_age[max_concurrency:]
            if old.stopped > call.time
        )
        newest = by_age[0]
        alive = newest.stopped > call.time
        if not alive and newest.end != "completed":
            found.append(
                f"key {call.key!r}: the newest admitted claim {newest.id!r} "
                f"(generation {newest.generation}) was lost: it ended {newest.end or 'stopped'}"
            )
        elif alive and newest.id not in named:
            found.append(
                f"key {call.key!r}: the newest claim {newest.id!r} runs, "
                f"but Redis names {named or 'no owner'}"
            )
    return found


def _overlaps(bodies: dict[str, list[Body]], max_concurrency: int) -> list[str]:
    """Two runs of one id at once; more than ``max_concurrency`` bodies of a key in a worker."""
    found: list[str] = []
    for id, runs in bodies.items():
        for a, b in _pairs(sorted(runs, key=lambda r: r.started)):
            if b.started < a.exiting:
                found.append(
                    f"{id!r} ran twice at once: in {a.process} from {a.started:.6f} and in "
                    f"{b.process} from {b.started:.6f}"
                )
    by_key: dict[tuple[str, str], list[Body]] = defaultdict(list)
    for runs in bodies.values():
        for body in runs:
            if body.key:
                by_key[(body.process, body.key)].append(body)
    for (process, key), runs in by_key.items():
        edges = sorted([(b.started, 1) for b in runs] + [(b.stopped, -1) for b in runs])
        running = 0
        for time, step in edges:  # at equal times, a stop (-1) sorts before a start
            running += step
            if running > max_concurrency:
                found.append(
                    f"key {key!r}: {running} bodies ran at once in {process} at {time:.6f} "
                    f"(max_concurrency={max_concurrency})"
                )
                break
    return found


def _pairs(runs: list[Body]) -> Iterator[tuple[Body, Body]]:
    for i, a in enumerate(runs):
        for b in runs[i + 1 :]:
            yield a, b


class Outages(logging.Handler):
    """Reports a backend's outages, its ``cancelkit.redis`` warnings, as ``offline`` / ``online``.

    Attach it to the ``cancelkit.redis`` logger; ``report`` gets the event's kind.
    """

    def __init__(self, report: Callable[[str], object]) -> None:
        super().__init__()
        self.report = report

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if " is unreachable " in message:
            self.report("offline")
        elif " is reachable again" in message:
            self.report("online")


@contextmanager
def spinners(n: int) -> Iterator[None]:
    """``n`` processes that keep a core busy (a starved machine), killed on the way out."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for process in busy:
            process.kill()
            process.wait()
