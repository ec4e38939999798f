"""Following the ledger without Kafka: Ledger.follow and ``celery-ledger tail``."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time
import uuid

import psycopg

from ledger.api import Ledger
from ledger.events import (
    ChordFired,
    ChordPartReturned,
    ChordStarted,
    GroupSaved,
    TaskForgotten,
    TaskState,
)
from ledger.store.base import START
from ledger.store.postgres import NOTIFY_CHANNEL
from tests.conftest import _libpq
from tests.relay_process import CLI, HORIZON_WAIT, eventually
from tests.stream_workload import task_lives


def test_follow_yields_every_event_once_in_order_while_writers_append(any_url):
    ledger = Ledger.open(any_url)
    writers = [
        threading.Thread(target=lambda p=p: [
            ledger.append(chunk) for chunk in _chunks(task_lives(p, 60), 7)
        ])
        for p in ("w1", "w2", "w3", "w4")
    ]
    stop = threading.Event()
    seen = []

    def follower() -> None:
        for event in ledger.follow(START, stop=stop, poll_interval=0.05, batch=25):
            seen.append(event)

    t = threading.Thread(target=follower)
    t.start()
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    final = eventually(lambda: _visible_all(ledger), HORIZON_WAIT, "every event to be visible")
    eventually(lambda: len(seen) >= len(final), what="the follower to catch up")
    stop.set()
    t.join(30)

    assert [e.event_id for e in seen] == [e.event_id for e in final]
    per_stream: dict[str, list[int]] = {}
    for e in seen:
        per_stream.setdefault(e.stream_id, []).append(e.stream_version)
    assert all(v == list(range(1, len(v) + 1)) for v in per_stream.values())


def test_follow_on_postgresql_wakes_on_notify_not_on_its_poll(pg_url):
    ledger = Ledger.open(pg_url)
    got: queue.Queue = queue.Queue()
    stop = threading.Event()

    def follower() -> None:
        # An hour between polls: only LISTEN/NOTIFY can deliver the event in time.
        for event in ledger.follow(START, stop=stop, poll_interval=3600):
            got.put(event)

    t = threading.Thread(target=follower, daemon=True)
    t.start()
    ledger.append([TaskState(task_id="first", status="FAILURE")])
    assert got.get(timeout=60).stream_id == "task:first"
    ledger.append([TaskState(task_id="woken", status="SUCCESS")])
    assert got.get(timeout=60).stream_id == "task:woken"
    stop.set()
    ledger.append([TaskState(task_id="last", status="SUCCESS")])  # wakes it to see stop
    t.join(60)
    assert not t.is_alive()


def _notified_streams(pg_url: str, ledger: Ledger, events) -> set[str]:
    """The stream ids PostgreSQL notified for ``events``, each appended on its own."""
    with psycopg.connect(_libpq(pg_url), autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        for event in events:
            ledger.append([event])
        marker = GroupSaved(group_id=f"marker-{uuid.uuid4()}", result=[])
        ledger.append([marker])  # notifies in any mode, after all the others
        seen = set()
        for note in listener.notifies(timeout=60):
            if note.payload == marker.stream_id:
                return seen
            seen.add(note.payload)
    raise AssertionError("the marker's notification never came")


NON_READY = ("STARTED", "RETRY", "PROGRESS", "PENDING")

READY = ("SUCCESS", "FAILURE", "REVOKED")


def _one_of_each(run: str) -> list:
    return [TaskState(task_id=f"{run}-{s}", status=s) for s in NON_READY + READY] + [
        TaskForgotten(task_id=f"{run}-SUCCESS"),
        GroupSaved(group_id=f"{run}-g", result=[f"{run}-SUCCESS"]),
        ChordStarted(chord_id=f"{run}-c", size=1),
        ChordPartReturned(chord_id=f"{run}-c", task_id=f"{run}-SUCCESS", status="SUCCESS"),
        # a chord stream with only a claim (and a part, in its own stream)
        ChordPartReturned(chord_id=f"{run}-parts", task_id=f"{run}-FAILURE", status="SUCCESS"),
        ChordFired(chord_id=f"{run}-parts"),
    ]


def test_by_default_every_event_notifies_except_non_ready_task_states_and_chord_returns(pg_url):
    run = uuid.uuid4().hex[:8]
    notified = _notified_streams(pg_url, Ledger.open(pg_url), _one_of_each(run))
    assert notified == {f"task:{run}-{s}" for s in READY} | {
        f"group:{run}-g", f"chord:{run}-c"
    }


def test_notify_all_notifies_every_event(pg_url):
    run = uuid.uuid4().hex[:8]
    notified = _notified_streams(pg_url, Ledger.open(pg_url, notify="all"), _one_of_each(run))
    assert notified == {f"task:{run}-{s}" for s in NON_READY + READY} | {
        f"group:{run}-g", f"chord:{run}-c", f"chord:{run}-parts",
        f"part:{run}-SUCCESS", f"part:{run}-FAILURE",
    }


def test_a_follower_still_gets_events_that_do_not_notify(pg_url):
    ledger = Ledger.open(pg_url)
    got: queue.Queue = queue.Queue()
    stop = threading.Event()
    run = uuid.uuid4().hex[:8]

    def follower() -> None:
        try:
            for event in ledger.follow(ledger.read(ledger.log.head), stop=stop):
                got.put(event.stream_id)
        except BaseException as exc:  # reported by the test, not lost with the thread
            got.put(exc)
            raise

    t = threading.Thread(target=follower, daemon=True)
    t.start()
    # A notifying event first: once the follower has it, it is in its wait loop, so
    # the events below can only reach it through its poll (not a first read racing them).
    ledger.append([TaskState(task_id=f"{run}-ready", status="SUCCESS")])
    eventually(lambda: ledger.follower_lag()["held_back"] == 0, timeout=HORIZON_WAIT,
               what="the server's oldest open transaction to end")
    assert got.get(timeout=60) == f"task:{run}-ready"
    # Let the follower go idle (several empty polls) so that what follows arrives while
    # it waits: correctness does not depend on this pause, only that a follower that
    # stopped polling is caught.
    time.sleep(1.0)
    for status in NON_READY:
        ledger.append([TaskState(task_id=f"{run}-{status}", status=status)])
    # A follower sees an event only once every older transaction on the server
    # has ended, in any database (ledger/log.py): another job's long transaction
    # holds these back for as long as it runs. Wait for that, bounded generously;
    # from then on the follower's 0.1 s poll must find them (none notifies).
    eventually(lambda: ledger.follower_lag()["held_back"] == 0, timeout=HORIZON_WAIT,
               what="the server's oldest open transaction to end")
    assert [got.get(timeout=60) for _ in NON_READY] == [f"task:{run}-{s}" for s in NON_READY]
    stop.set()
    t.join(60)
    assert not t.is_alive()


def test_tail_follow_prints_events_as_they_happen_as_json(any_url):
    ledger = Ledger.open(any_url)
    ledger.append([TaskState(task_id="old", status="SUCCESS")])
    proc = subprocess.Popen(
        [CLI, "tail", "--db", any_url, "--follow", "--format", "json"],
        stdout=subprocess.PIPE, text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    assert json.loads(lines.get(timeout=60))["stream_id"] == "task:old"
    ledger.append([TaskState(task_id="new", status="FAILURE", exc_type="KeyError")])
    line = json.loads(lines.get(timeout=60))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert (line["stream_id"], line["type"], line["data"]["status"]) == (
        "task:new", "task.state", "FAILURE"
    )
    assert line["data"]["exc_type"] == "KeyError"


def test_tail_task_prints_only_that_task_history_first(any_url):
    ledger = Ledger.open(any_url)
    ledger.append([TaskState(task_id="mine", status="STARTED"),
                   TaskState(task_id="other", status="STARTED")])
    ledger.append([TaskState(task_id="mine", status="SUCCESS")])
    out = subprocess.run(
        [CLI, "tail", "--db", any_url, "--task", "mine"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    rows = out.stdout.splitlines()
    assert [r.split()[2:] for r in rows] == [
        ["task:mine", "task.state", "STARTED"], ["task:mine", "task.state", "SUCCESS"]
    ]


def _chunks(items: list, n: int) -> list[list]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def _visible_all(ledger: Ledger):
    head = ledger.read(ledger.log.head)
    events = ledger.read_from(START, 100_000)
    return events if events and (events[-1].tx_id, events[-1].position) >= head else None


def test_follow_read_interval_gathers_a_stream_of_commits_into_few_reads(pg_url):
    """``read_interval``: at most one read per interval while commits stream in, and
    every event still arrives once, in order (the web console's feed relies on it)."""
    ledger = Ledger.open(pg_url)
    start = ledger.read(ledger.log.head)
    interval = 0.25
    reads: list[float] = []
    read = ledger.read

    def counted(fn):
        reads.append(time.monotonic())
        return read(fn)

    ledger.read = counted  # type: ignore[method-assign]
    stop = threading.Event()
    seen: list = []
    ids = [f"paced-{uuid.uuid4().hex[:8]}-{i}" for i in range(400)]

    def follower() -> None:
        for event in ledger.follow(start, stop=stop, poll_interval=0.05, read_interval=interval):
            seen.append(event)

    t = threading.Thread(target=follower, daemon=True)
    t.start()
    began = time.monotonic()
    for task_id in ids:  # one commit each, as workers store results
        ledger.append([TaskState(task_id=task_id, status="SUCCESS")])
    eventually(lambda: len(seen) >= len(ids), what="the follower to see every event")
    stop.set()
    t.join(30)
    during = [at for at in reads if at >= began]
    elapsed = max(during) - began
    assert [e.stream_id for e in seen] == [f"task:{i}" for i in ids]
    # One read per interval, plus the one that found nothing new at the end.
    assert len(during) <= elapsed / interval + 3, (len(during), elapsed)
    assert len(during) < len(ids) / 4


def test_following_after_a_position_with_no_event_resumes_after_it_not_at_the_start(any_url):
    """On PostgreSQL a position with no event (pruned, past the head) became the
    checkpoint (0, position), which sorts before every event in (tx_id, position)
    order: read_from(99) and follow(99) gave the whole log again to a follower
    resuming from a position prune had deleted. SQLite gave nothing, as it should."""
    import sqlalchemy as sa

    from ledger.store.schema import events
    from tests.test_integrity import tamper

    ledger = Ledger.open(any_url)
    for i in range(4):
        ledger.append([TaskState(task_id=f"t{i}", status="SUCCESS")])
    positions = [ledger.history(f"t{i}")[0].position for i in range(4)]
    past_head = positions[-1] + 50
    assert ledger.read_from(past_head) == []
    assert list(ledger.follow(past_head, idle_timeout=0)) == []
    tamper(any_url, sa.delete(events).where(events.c.position.in_(positions[:2])))  # as prune does
    assert [e.position for e in ledger.read_from(positions[1])] == positions[2:]
    assert [e.position for e in ledger.follow(positions[1], idle_timeout=0)] == positions[2:]
    assert [e.position for e in ledger.read_from(positions[0])] == positions[2:]  # none before it: the start
