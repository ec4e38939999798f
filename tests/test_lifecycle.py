"""SENT and RECEIVED: what they add, and what Celery keeps seeing.

The pure rules first (property tests over every commit order), then a real
``celery worker`` (prefork, Redis broker) on SQLite and PostgreSQL.
"""

from __future__ import annotations

import io
import json
import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa
from celery import Celery, states
from celery.contrib.testing.worker import start_worker
from celery.exceptions import TimeoutError
from hypothesis import example, given
from hypothesis import strategies as st

from ledger import demo
from ledger.api import Ledger
from ledger.audit import task_history
from ledger.cli import main
from ledger.events import NewEvent, RecordedEvent, TaskReceived, TaskSent, TaskState
from ledger.events import utcnow as now
from ledger.relay import Relay
from ledger.store import postgres
from ledger.store.base import EncodedEvent
from ledger.stream import decode_event, decode_state
from ledger.timeline import QUEUE_CHAR, fold_run
from projections import catalogue, task_meta
from projections.lifecycle import next_state
from tests.kafka import create_topic, kafka, read_all, topic  # noqa: F401
from tests.test_catalogue import _percentile
from tests.test_celery_worker import WAIT, db_url, running_worker, task, worker  # noqa: F401  (fixtures)
from tests.test_projection_equivalence import PROPERTY

T0 = now()
CELERY_STATES = st.sampled_from(["STARTED", "RETRY", "SUCCESS", "FAILURE", "REVOKED", "PROGRESS"])
LIFECYCLE = st.sampled_from([
    TaskSent(task_id="a", name="proj.t", sent_at=T0),
    TaskReceived(task_id="a", hostname="celery@w1"),
])


def recorded(datas) -> list[RecordedEvent]:
    """``datas`` as a log would hold them, in this order, one second apart."""
    return [
        EncodedEvent.of(NewEvent(d)).recorded(i + 1, i + 1, T0 + timedelta(seconds=i), 0)
        for i, d in enumerate(datas)
    ]


@st.composite
def interleaved(draw):
    """Celery's states of one task in their order, with SENT/RECEIVED inserted anywhere."""
    states = [TaskState(task_id="a", status=s) for s in draw(st.lists(CELERY_STATES, max_size=5))]
    merged = list(states)
    for event in draw(st.lists(LIFECYCLE, max_size=4)):
        merged.insert(draw(st.integers(0, len(merged))), event)
    return states, merged


def _celery_view(events: list[RecordedEvent]):
    state = None
    for e in events:
        state = task_meta.fold(state, e)
    return None if state is None else (state.status, state.payload, state.done_at is None)


@PROPERTY
@given(interleaved())
def test_sent_and_received_never_change_what_celery_sees(histories):
    """Task meta (what AsyncResult reads) is the same with or without them, wherever
    they committed: no row (PENDING) until STARTED or a ready state."""
    states, merged = histories
    with_lifecycle = recorded(merged)
    expected = _celery_view([e for e in with_lifecycle if e.type == TaskState.type])
    assert _celery_view(with_lifecycle) == expected
    if not states:
        assert expected is None


#: A retry's SENT committed after the earlier attempt's RECEIVED: drawn by chance
#: only, so every property below also runs it every time.
SENT_AFTER_RECEIVED = ([], [TaskReceived(task_id="a", hostname="celery@w1"),
                            TaskSent(task_id="a", name="proj.t", sent_at=T0)])


@PROPERTY
@given(interleaved())
@example(SENT_AFTER_RECEIVED)
def test_a_lifecycle_state_never_overrides_a_celery_state(histories):
    """The timeline's state: Celery's (SUCCESS sticky) if it stored one, else the
    highest of SENT < RECEIVED, in whatever order they committed."""
    states, merged = histories
    run = fold_run("a", recorded(merged))
    lifecycle = {type(d) for d in merged} - {TaskState}
    if states:
        statuses = [s.status for s in states]
        assert run.state == ("SUCCESS" if "SUCCESS" in statuses else statuses[-1])
    elif TaskReceived in lifecycle:
        assert run.state == "RECEIVED"
    elif TaskSent in lifecycle:
        assert run.state == "SENT"
    else:
        assert run.state == "PENDING"


@PROPERTY
@given(interleaved())
@example(SENT_AFTER_RECEIVED)
def test_the_catalogue_lists_celerys_state_else_the_highest_lifecycle_state(histories):
    """The catalogue's row (``tasks --state``): Celery's state (SUCCESS sticky) once one
    was stored, else RECEIVED if any, else SENT -- whatever the commit order; the
    fields of a task only sent or received come from its SENT/RECEIVED."""
    states, merged = histories
    entry = None
    for event in recorded(merged):
        entry = catalogue.fold(entry, event)
    lifecycle = {type(d) for d in merged} - {TaskState}
    if states:
        statuses = [s.status for s in states]
        assert entry.state == ("SUCCESS" if "SUCCESS" in statuses else statuses[-1])
    elif TaskReceived in lifecycle:
        assert (entry.state, entry.worker) == ("RECEIVED", "celery@w1")
    elif TaskSent in lifecycle:
        assert (entry.state, entry.name, entry.worker) == ("SENT", "proj.t", None)
    else:
        assert entry is None


def test_received_replaces_sent_and_nothing_else():
    assert next_state(None, "SENT") == "SENT"
    assert next_state("SENT", "RECEIVED") == "RECEIVED"
    assert next_state("RECEIVED", "SENT") == "RECEIVED"
    assert next_state("STARTED", "RECEIVED") == "STARTED"
    assert next_state("RETRY", "SENT") == "RETRY"  # a retry's new message


def test_queue_wait_and_duration_without_task_track_started():
    """No STARTED: the run starts when the worker received it (or it became due);
    the wait is from the ETA (the countdown asked for is not waiting)."""
    sent = TaskSent(task_id="a", name="proj.t", sent_at=T0, eta=T0 + timedelta(seconds=2))
    events = recorded([sent, TaskReceived(task_id="a", due_at=T0 + timedelta(seconds=2)),
                       TaskState(task_id="a", status="SUCCESS")])
    # recorded one second apart: received at T0+1 s, due at T0+2 s, done at T0+2 s
    run = fold_run("a", events)
    assert run.ready_at == T0 + timedelta(seconds=2)
    assert run.start == T0 + timedelta(seconds=2)
    assert run.queue_wait == 0.0 and run.duration == 0.0
    late = recorded([TaskSent(task_id="a", name="proj.t", sent_at=T0), TaskState(task_id="a", status="PROGRESS"),
                     TaskReceived(task_id="a"), TaskState(task_id="a", status="SUCCESS")])
    run = fold_run("a", late)
    assert run.queue_wait == 2.0 and run.duration == 1.0


# -- a real worker -----------------------------------------------------------------------


@pytest.mark.worker
def test_countdown_task_history_reads_sent_received_started_success(worker, db_url, capsys):  # noqa: F811
    r = task(worker, "add").apply_async((2, 3), countdown=2)
    assert r.get(timeout=WAIT) == 5
    ledger = worker.backend.ledger
    rows = task_history(ledger, r.id)
    assert [row["state"] for row in rows] == ["SENT", "RECEIVED", "STARTED", "SUCCESS"]
    sent, received, started, _ = ledger.history(r.id)
    assert sent.data.name == "workerapp.add" and sent.data.queue == worker.conf.task_default_queue
    assert 1.9 <= sent.data.countdown <= 2.0  # eta - when it was handed to the broker
    assert received.data.due_at == sent.data.eta
    assert received.data.hostname == started.data.worker  # the worker that ran it
    assert started.recorded_at >= sent.data.eta  # ran once due, not when received
    assert "countdown 2.0s" in rows[0]["detail"] and rows[0]["detail"].startswith(
        f"queue {worker.conf.task_default_queue}")
    # Celery saw PENDING throughout: no state until STARTED.
    assert ledger.task_meta(r.id, as_of=received.position) is None
    assert main(["history", r.id, "--db", db_url]) == 0
    out = capsys.readouterr().out
    assert [line.split()[2] for line in out.splitlines()[2:]] == ["SENT", "RECEIVED", "STARTED", "SUCCESS"]
    assert "countdown 2.0s" in out


@pytest.mark.worker
def test_task_sent_to_a_queue_nobody_consumes_is_sent_and_pending(worker, db_url, capsys):  # noqa: F811
    """Listed by ``tasks --state SENT --until <a while ago>`` (sent, never received),
    while Celery sees PENDING; a task that ran beside it is not listed."""
    queue = f"{worker.conf.task_default_queue}-nobody"
    r = task(worker, "add").apply_async((1, 1), queue=queue)
    ran = task(worker, "add").delay(2, 2)
    assert ran.get(timeout=WAIT) == 4
    ledger = worker.backend.ledger
    (sent,) = ledger.history(r.id)
    assert sent.type == "task.sent" and sent.data.queue == queue
    assert r.state == states.PENDING and worker.backend.get_task_meta(r.id)["status"] == states.PENDING
    with pytest.raises(TimeoutError):
        r.get(timeout=0.5)
    assert fold_run(r.id, ledger.history(r.id)).state == "SENT"
    # "sent before <until> and never received": the lost task, not the one that ran
    until = now()
    (lost,) = [row for row in ledger.tasks(state="SENT", until=until) if row.task_id in (r.id, ran.id)]
    assert lost.task_id == r.id
    assert (lost.entry.name, lost.entry.queue, lost.entry.sent_at) == ("workerapp.add", queue, sent.data.sent_at)
    assert lost.entry.received_at is None and lost.entry.queue_wait is None
    assert ledger.tasks(state="SENT", until=sent.recorded_at) == []  # not sent before that
    assert main(["tasks", "--state", "SENT", "--until", until.isoformat(), "--format", "json",
                 "--db", db_url]) == 0
    listed = {row["task_id"]: row for row in json.loads(capsys.readouterr().out)}
    assert r.id in listed and ran.id not in listed
    assert listed[r.id]["state"] == "SENT" and listed[r.id]["queue"] == queue
    assert main(["tasks", "--state", "SENT", "--until", "-10m", "--db", db_url]) == 0
    assert r.id not in capsys.readouterr().out  # sent less than ten minutes ago
    assert worker.backend.get_task_meta(r.id)["status"] == states.PENDING


@pytest.mark.worker
def test_queue_wait_is_the_time_between_the_histories_events(worker, db_url, capsys):  # noqa: F811
    """Three slow tasks on a worker of three processes, then three more: the second
    three wait in the queue; the timeline's wait is what the histories say."""
    sleep = task(worker, "sleep")
    before = now()
    results = [sleep.delay(0.5) for _ in range(6)]
    assert [r.get(timeout=WAIT) for r in results] == [0.5] * 6
    ledger = worker.backend.ledger
    waits = []
    for r in results:
        events = ledger.history(r.id)
        sent = next(e.data for e in events if e.type == "task.sent")
        started = next(e.recorded_at for e in events if e.type == "task.state"
                       and e.data.status == states.STARTED)
        run = fold_run(r.id, events)
        assert run.queue_wait == max(0.0, (started - sent.sent_at).total_seconds())
        assert ledger.tasks(root=r.id)[0].entry.queue_wait == run.queue_wait  # the catalogue's
        waits.append(run.queue_wait)
    assert max(waits) >= 0.4  # at least one waited for a busy process
    # stats: the percentiles of exactly these waits, computed by the database
    (group,) = [g for g in ledger.stats(by="name", since=before) if g.key == "workerapp.sleep"]
    figures = group.durations["queue_wait"]
    assert figures["count"] == 6 and figures["max"] == pytest.approx(max(waits), abs=2e-6)
    for p in (0.5, 0.95, 0.99):
        assert figures[f"p{round(p * 100)}"] == pytest.approx(_percentile(waits, p), abs=2e-6)
    assert main(["stats", "--since", before.isoformat(), "--db", db_url]) == 0
    out = capsys.readouterr().out
    assert "wait p50" in out.splitlines()[0]
    (line,) = [line for line in out.splitlines() if line.startswith("workerapp.sleep")]
    assert f"{max(waits) * 1000:.1f}ms" in line or f"{max(waits):.2f}s" in line  # wait max



@pytest.mark.worker
def test_a_quiet_worker_records_received_too(sqlite_url):
    """``celery -q worker`` prints no banner, which is what otherwise builds the backend
    in the worker's main process: the plugin's worker_init hook builds it."""
    with running_worker(sqlite_url, "-q") as app:
        r = task(app, "add").delay(1, 2)
        assert r.get(timeout=WAIT) == 3
        assert [e.type for e in app.backend.ledger.history(r.id)][:2] == ["task.sent", "task.received"]

# -- settings, other apps, the demo (in-process worker, memory broker) -------------------------


def in_process_app(url: str, **conf) -> Celery:
    app = Celery("lifecycle", broker="memory://", backend=f"ledger+{url}", set_as_current=False)
    app.conf.update(task_track_started=True, worker_hijack_root_logger=False,
                    task_default_queue=f"lifecycle-{uuid.uuid4().hex[:8]}",
                    broker_transport_options={"polling_interval": 0.01}, **conf)
    app.task(name="lifecycle.add")(add)
    return app


def add(x: int, y: int) -> int:
    return x + y


@pytest.mark.parametrize("setting, left_out", [("ledger_track_sent", "task.sent"),
                                               ("ledger_track_received", "task.received")])
def test_each_setting_turns_its_event_off(sqlite_url, setting, left_out):
    app = in_process_app(sqlite_url, **{setting: False})
    with start_worker(app, pool="solo", perform_ping_check=False, loglevel="CRITICAL"):
        r = app.tasks["lifecycle.add"].delay(1, 2)
        assert r.get(timeout=WAIT, interval=0.02) == 3
    expected = ["task.sent", "task.received", "task.state", "task.state"]
    expected.remove(left_out)
    assert [e.type for e in app.backend.ledger.history(r.id)] == expected


def test_an_app_on_another_backend_is_left_alone(sqlite_url):
    """Celery's signals are process-wide: an app on another backend that publishes a
    task of the same name, to a queue of the same name, records nothing and works."""
    tracked = in_process_app(sqlite_url)
    queue = tracked.conf.task_default_queue
    mine = tracked.tasks["lifecycle.add"].delay(1, 1)
    other = Celery("other", broker="memory://", backend="cache+memory://", set_as_current=False)
    other.conf.task_default_queue = queue
    other.task(name="lifecycle.add")(add)
    theirs = other.tasks["lifecycle.add"].delay(1, 1)
    ledger = tracked.backend.ledger
    assert [e.type for e in ledger.history(mine.id)] == ["task.sent"]
    assert ledger.history(theirs.id) == []


def test_the_demo_shows_sent_received_and_a_queue_wait_segment(tmp_path):
    from celery import _state

    default, current = _state.default_app, _state._tls.current_app
    out = io.StringIO()
    assert demo.run(f"sqlite:///{tmp_path / 'demo.db'}", out) == 0
    # the demo's worker sets Celery's fast tracer up as `celery worker` does; the
    # process's apps are as they were after it
    assert (_state.default_app, _state._tls.current_app) == (default, current)
    text = out.getvalue()
    assert "SENT" in text and "RECEIVED" in text
    # every state names the worker's node, as under `celery worker` (not the machine)
    first_task = text.split("== a task\n")[1].split("\n\n")[0].splitlines()
    rows = [line.split() for line in first_task if line[:1].isdigit()]
    workers = {r[3] for r in rows if r[2] in ("RECEIVED", "STARTED", "SUCCESS")}
    assert len(workers) == 1 and "@" in workers.pop(), first_task
    chart = text.split("as a timeline")[1]
    bars = [line.rsplit("|", 2)[1] for line in chart.splitlines() if "demo.slow" in line]
    assert len(bars) == 3 and sum(QUEUE_CHAR in bar for bar in bars) >= 2  # two queued behind one


# -- the stream ------------------------------------------------------------------------------


@pytest.mark.kafka
def test_sent_and_received_reach_the_event_topic_and_leave_the_state_topic_alone(
        any_url, kafka, topic):  # noqa: F811
    """Like every event, they go to the event topic and decode there; the state
    topic holds Celery's view, which they do not change (a late SENT included)."""
    ledger = Ledger.open(any_url)
    state_topic = create_topic(kafka)
    ledger.append([TaskSent(task_id="lost", name="proj.t", sent_at=T0, queue="nobody")])
    ledger.append([TaskSent(task_id="ran", name="proj.t", sent_at=T0),
                   TaskReceived(task_id="ran", hostname="celery@w1")])
    ledger.append([TaskState(task_id="ran", status="STARTED")])
    ledger.append([TaskSent(task_id="ran", name="proj.t", sent_at=T0, retries=1)])  # committed late
    Relay(ledger, kafka, topic, state_topic=state_topic).run(once=True)

    events = [decode_event(r.value) for r in read_all(kafka, topic, expect=5)]
    assert sorted((e.stream_key, e.type) for e in events) == [
        ("lost", "task.sent"), ("ran", "task.received"), ("ran", "task.sent"),
        ("ran", "task.sent"), ("ran", "task.state"),
    ]
    assert next(e for e in events if e.stream_key == "lost").data.queue == "nobody"
    states_ = {r.key: r for r in read_all(kafka, state_topic, expect=1)}
    assert set(states_) == {b"ran"}  # a task only sent has no Celery state
    assert decode_state(states_[b"ran"].value).status == "STARTED"


@pytest.mark.postgres
def test_only_the_lone_lifecycle_event_skips_the_wal_flush_wait(pg_url):
    """SENT/RECEIVED commit without waiting for the WAL flush (ledger/log.py says why);
    the setting is local to that transaction: the next store on the same pooled
    connection waits for its flush as every result does."""
    ledger = Ledger.open(pg_url)
    ledger.append([TaskSent(task_id="a", name="proj.t", sent_at=T0)])
    (setting,) = postgres.pooled_fetch(ledger.engine, [("SHOW synchronous_commit", {})])
    assert setting == ("on",)


def test_on_sqlite_only_the_lone_lifecycle_event_commits_without_the_wal_sync(sqlite_url):
    """A lone SENT or RECEIVED commits at ``synchronous = NORMAL`` (the WAL not synced),
    as PostgreSQL commits it without waiting for the WAL flush; every other
    transaction commits at ``FULL``, also the next one on the same pooled
    connection and one that is not the ledger's write."""
    ledger = Ledger.open(sqlite_url)
    levels: list[int] = []

    @sa.event.listens_for(ledger.engine, "commit")
    def level(conn):
        (sync,) = conn.connection.driver_connection.execute("PRAGMA synchronous").fetchone()
        levels.append(sync)

    normal, full = 1, 2
    for i in range(2):  # twice: the level goes back and forth on the one pooled connection
        sent = TaskSent(task_id=f"a{i}", name="proj.t", sent_at=T0)
        steps = [
            ([sent], normal),
            ([TaskState(task_id=f"a{i}", status="STARTED")], full),
            ([TaskReceived(task_id=f"a{i}")], normal),
            ([TaskSent(task_id=f"b{i}", name="proj.t", sent_at=T0), TaskSent(task_id=f"c{i}", name="proj.t",
                                                                              sent_at=T0)], full),
            ([TaskReceived(task_id=f"b{i}")], normal),
            (None, full),  # a transaction that is not the ledger's write (a migration's, a test's)
        ]
        for events, expected in steps:
            del levels[:]
            if events is None:
                with ledger.engine.begin() as conn:
                    conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS scratch (x)")
                    conn.exec_driver_sql("INSERT INTO scratch VALUES (1)")
            else:
                ledger.append(events)
            assert levels == [expected], (events, levels)
    assert [e.type for e in ledger.history("a1")] == ["task.sent", "task.state", "task.received"]
