"""The task catalogue answers an operator's questions without a task id.

A real ``celery worker`` (prefork, Redis broker; the one of tests/test_celery_worker.py,
started for this module) runs a mix: additions, failures, a task that retries twice,
two slow tasks and a chain that fails at its end. ``tasks`` and ``stats`` must return
exactly what a count done by hand from the log says, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import csv
import io
import json
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from celery import chain

from ledger.api import Ledger
from ledger.cli import main
from ledger.errors import BadFilter
from ledger.events import Encoded, ResultExpired, TaskForgotten, TaskReceived, TaskSent, TaskState
from ledger.rebuild import verify
from ledger.store.schema import events as events_table
from projections.memory import MemoryTarget
from tests.test_celery_worker import WAIT, db_url, running_worker, task, worker  # noqa: F401  (fixtures)

READY = {"SUCCESS", "FAILURE", "REVOKED"}


def _wait(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def mix(worker):  # noqa: F811
    add, fail, flaky, sleep = (task(worker, n) for n in ("add", "fail", "flaky", "sleep"))
    ledger: Ledger = worker.backend.ledger
    first = [add.delay(1000 + i, 7) for i in range(4)] + [fail.delay(f"boom-{i}") for i in range(2)]
    for r in first:
        r.get(timeout=WAIT, propagate=False)
    time.sleep(0.2)  # the boundary between the two batches, clear of both
    mid = datetime.now(timezone.utc)
    time.sleep(0.2)
    flaky_r = flaky.delay(f"flaky-{uuid.uuid4().hex[:8]}", 3)
    slow = [sleep.delay(1.0), sleep.delay(0.6)]
    wf = chain(add.si(1, 1), add.si(2, 2), fail.si("workflow failed")).apply_async()
    for r in [flaky_r, *slow, wf]:
        r.get(timeout=WAIT, propagate=False)
    # Celery stores a RETRY after it sent the next attempt: wait, bounded, for all six.
    _wait(lambda: sum(e.type == "task.state" for e in ledger.history(flaky_r.id)) == 6,
          "the flaky task's six states")  # (its SENT and RECEIVED aside)
    root = wf.parent.parent.id
    return {
        "ledger": ledger, "mid": mid, "root": root, "chain": {root, wf.parent.id, wf.id},
        "slow": [r.id for r in slow], "flaky": flaky_r.id, "arg_task": first[3].id,
    }


LIFECYCLE = {"task.sent": "SENT", "task.received": "RECEIVED"}


def by_hand(ledger: Ledger) -> dict[str, dict]:
    """Each task as the log tells it, counted here without the catalogue's code."""
    with ledger.engine.connect() as conn:
        events = ledger.log.read_positions(conn, conn.execute(
            events_table.select().with_only_columns(events_table.c.position)
        ).scalars().all())
    streams: dict[str, list] = {}
    for e in events:
        if e.type == "task.state" or e.type in LIFECYCLE:
            streams.setdefault(e.stream_key, []).append(e)
    out = {}
    for task_id, stream in streams.items():
        states = [e for e in stream if e.type == "task.state"]
        success = next((e for e in states if e.data.status == "SUCCESS"), None)
        # nothing after SUCCESS counts; Celery's state wins over SENT/RECEIVED
        in_effect = stream[: stream.index(success) + 1] if success else stream
        received = [e for e in in_effect if e.type == "task.received"]
        effective = success or (states[-1] if states else (received or in_effect)[-1])
        # the attempt: from the last SENT on (a retry sends the task again)
        sends = [e for e in in_effect if e.type == "task.sent"]
        attempt = in_effect[in_effect.index(sends[-1]):] if sends else in_effect
        starts = [e for e in attempt if e.type == "task.state" and e.data.status == "STARTED"]
        received = [e for e in attempt if e.type == "task.received"]
        ready = sent_at = None
        if sends:
            sent_at = sends[-1].data.sent_at
            ready = max(sent_at, sends[-1].data.eta or sent_at)
        began = (starts or received or [None])[-1]
        d = effective.data
        status = d.status if effective.type == "task.state" else LIFECYCLE[effective.type]
        out[task_id] = {
            "name": d.name, "state": status,
            "worker": d.hostname if effective.type == "task.received" else getattr(d, "worker", None),
            "queue": getattr(d, "queue", None), "retries": d.retries,
            "root_id": getattr(d, "root_id", None), "exc_type": getattr(d, "exc_type", None),
            "first_seen": stream[0].recorded_at,
            "sent_at": sent_at, "ready_at": ready,
            "received_at": received[-1].recorded_at if received else None,
            "runtime": (effective.recorded_at - starts[-1].recorded_at).total_seconds()
            if starts and status in READY else None,
            "queue_wait": max(0.0, (began.recorded_at - ready).total_seconds())
            if ready and began else None,
        }
    return out


def _ids(rows) -> set[str]:
    return {r.task_id for r in rows}


def _keep(expected: dict[str, dict], **match) -> set[str]:
    return {t for t, row in expected.items() if all(test(row) for test in match.values())}


@pytest.mark.worker
def test_tasks_lists_every_task_as_the_log_says_newest_first(mix):
    ledger = mix["ledger"]
    expected = by_hand(ledger)
    rows = ledger.tasks(limit=None)
    assert len(expected) == 4 + 2 + 1 + 2 + 3 + 1  # the mix and the fixture's ping
    found = {
        r.task_id: {
            **{k: getattr(r.entry, k) for k in ("name", "state", "worker", "queue", "retries",
                                                 "root_id", "exc_type", "first_seen", "sent_at",
                                                 "ready_at", "received_at")},
            "runtime": r.entry.runtime, "queue_wait": r.entry.queue_wait,
        }
        for r in rows
    }
    assert found == expected
    assert [r.task_id for r in rows] == sorted(expected, key=lambda t: expected[t]["first_seen"], reverse=True)
    assert [r.task_id for r in ledger.tasks(limit=3)] == [r.task_id for r in rows[:3]]


@pytest.mark.worker
def test_each_filter_keeps_exactly_the_tasks_the_log_says(mix):
    ledger, mid = mix["ledger"], mix["mid"]
    expected = by_hand(ledger)
    worker_name = expected[mix["flaky"]]["worker"]
    cases = {
        "name exact": ({"name": "workerapp.add"}, _keep(expected, n=lambda r: r["name"] == "workerapp.add")),
        "name glob": ({"name": "workerapp.f*"}, _keep(expected, n=lambda r: r["name"].startswith("workerapp.f"))),
        "state": ({"state": "FAILURE"}, _keep(expected, s=lambda r: r["state"] == "FAILURE")),
        "exception": ({"exception": "ValueError"}, _keep(expected, e=lambda r: r["exc_type"] == "ValueError")),
        "worker": ({"worker": worker_name}, _keep(expected, w=lambda r: r["worker"] == worker_name)),
        "since": ({"since": mid}, _keep(expected, t=lambda r: r["first_seen"] >= mid)),
        "until": ({"until": mid}, _keep(expected, t=lambda r: r["first_seen"] < mid)),
        "since+state": ({"since": mid, "state": ["FAILURE"]},
                        _keep(expected, t=lambda r: r["first_seen"] >= mid, s=lambda r: r["state"] == "FAILURE")),
        "root": ({"root": mix["root"]}, mix["chain"]),
        "args": ({"args": "1003"}, {mix["arg_task"]}),
    }
    for label, (filters, ids) in cases.items():
        assert ids, label  # every case keeps something
        assert _ids(ledger.tasks(limit=None, **filters)) == ids, label
    by_runtime = sorted((t for t in expected if expected[t]["runtime"] is not None),
                        key=lambda t: expected[t]["runtime"], reverse=True)
    assert [r.task_id for r in ledger.tasks(slowest=2)] == by_runtime[:2]
    assert set(by_runtime[:2]) == set(mix["slow"])  # the two sleeping tasks, as they should be


def _percentile(values: list[float], p: float) -> float:
    v = sorted(values)
    at = p * (len(v) - 1)
    lo = int(at)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (at - lo)


@pytest.mark.worker
@pytest.mark.parametrize("by", ["name", "worker", "queue"])
def test_stats_are_the_counts_and_percentiles_of_the_log(mix, by):
    ledger = mix["ledger"]
    expected = by_hand(ledger)
    groups = {g.key: g for g in ledger.stats(by=by)}
    keys = {row[by] for row in expected.values()}
    assert set(groups) == keys
    for key in keys:
        rows = [r for r in expected.values() if r[by] == key]
        g = groups[key]
        states: dict[str, int] = {}
        for r in rows:
            states[r["state"]] = states.get(r["state"], 0) + 1
        assert (g.total, g.states) == (len(rows), states), key
        assert g.failure_rate == states.get("FAILURE", 0) / len(rows)
        assert g.retry_rate == sum(1 for r in rows if r["retries"] or r["state"] == "RETRY") / len(rows)
        runtimes = [r["runtime"] for r in rows if r["runtime"] is not None]
        figures = g.durations["runtime"]
        assert figures["count"] == len(runtimes)
        for p in (0.5, 0.95, 0.99):
            assert figures[f"p{round(p * 100)}"] == pytest.approx(_percentile(runtimes, p), abs=2e-6)
        assert figures["max"] == pytest.approx(max(runtimes), abs=2e-6)
        # every task of the mix was sent and started: each has its queue wait
        waits = [r["queue_wait"] for r in rows if r["queue_wait"] is not None]
        figures = g.durations["queue_wait"]
        assert figures["count"] == len(waits) == len(rows)
        for p in (0.5, 0.95, 0.99):
            assert figures[f"p{round(p * 100)}"] == pytest.approx(_percentile(waits, p), abs=2e-6)
        assert figures["max"] == pytest.approx(max(waits), abs=2e-6)
    if by == "name":
        assert groups["workerapp.flaky"].retry_rate == 1.0
        assert groups["workerapp.fail"].failure_rate == 1.0


@pytest.mark.worker
def test_stats_over_a_period_count_only_its_tasks(mix):
    ledger, mid = mix["ledger"], mix["mid"]
    expected = by_hand(ledger)
    later = [r for r in expected.values() if r["first_seen"] >= mid]
    assert sum(g.total for g in ledger.stats(since=mid)) == len(later)
    assert ledger.stats(since=mid + timedelta(days=1)) == []


@pytest.mark.worker
def test_cli_prints_the_same_rows_as_text_json_and_csv(mix, capsys):
    ledger = mix["ledger"]
    url = ledger.engine.url.render_as_string(hide_password=False)
    api = [r.record() for r in ledger.tasks(state="FAILURE")]

    assert main(["tasks", "--state", "FAILURE", "--format", "json", "--db", url]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(api, default=str))
    assert main(["tasks", "--state", "FAILURE", "--format", "csv", "--db", url]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["task_id"] for r in rows] == [r["task_id"] for r in api]
    assert main(["tasks", "--name", "workerapp.sl*", "--since", "-1h", "--db", url]) == 0
    out = capsys.readouterr().out
    assert out.count("workerapp.sleep") == 2 and "first seen" in out
    assert main(["stats", "--by", "name", "--format", "json", "--db", url]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert {g["key"]: g["total"] for g in stats["groups"]} == {g.key: g.total for g in ledger.stats()}
    assert main(["stats", "--db", url]) == 0
    assert "workerapp.flaky" in capsys.readouterr().out


# -- without a worker ----------------------------------------------------------------------


def test_bad_filters_are_one_line_naming_the_problem(ledger, capsys):
    with pytest.raises(BadFilter, match="unknown filter colour"):
        ledger.tasks(colour="red")
    with pytest.raises(BadFilter, match="cannot group by 'host'"):
        ledger.stats(by="host")
    url = ledger.engine.url.render_as_string(hide_password=False)
    assert main(["tasks", "--since", "2030-01-01", "--until", "2020-01-01", "--db", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "since (2030-01-01T00:00:00+00:00) is not before until" in err
    assert main(["tasks", "--since", "-1 hour", "--db", url]) == 2
    assert "'-1 hour' is not a time" in capsys.readouterr().err


def test_a_glob_matches_wildcards_only_where_written(ledger):
    for name in ("shop.charge", "shop_charge", "shop%charge", "shopXcharge"):
        ledger.append([TaskState(task_id=name, status="SUCCESS", name=name)])
    assert _ids(ledger.tasks(name="shop_charge")) == {"shop_charge"}
    assert _ids(ledger.tasks(name="shop%charge")) == {"shop%charge"}
    assert _ids(ledger.tasks(name="shop?charge")) == {"shop.charge", "shop_charge", "shop%charge", "shopXcharge"}
    assert _ids(ledger.tasks(name="shop_*")) == {"shop_charge"}
    assert _ids(ledger.tasks(name="*charge")) == {"shop.charge", "shop_charge", "shop%charge", "shopXcharge"}


def test_args_text_is_found_in_json_and_msgpack_args(ledger):
    import msgpack

    as_json = Encoded(content_type="application/json", data=b'["order-17", 3]')
    as_msgpack = Encoded(content_type="application/x-msgpack", data=msgpack.packb({"sku": "order-17"}))
    ledger.append([
        TaskState(task_id="j", status="SUCCESS", args=as_json),
        TaskState(task_id="m", status="SUCCESS", kwargs=as_msgpack),
        TaskState(task_id="other", status="SUCCESS", args=Encoded(content_type="application/json", data=b"[1]")),
    ])
    assert _ids(ledger.tasks(args="order-17")) == {"j", "m"}
    assert ledger.tasks(args="order-17", name="x") == []
    assert {r.task_id: r.record()["kwargs"] for r in ledger.tasks(args="order-17")}["m"] == {"sku": "order-17"}


def test_a_forgotten_task_stays_listed_and_a_new_life_starts_over(ledger):
    """The SQL forms must agree with the fold one event at a time (each event is its own
    append: on PostgreSQL that is the fused single-statement path)."""
    for data in (
        TaskState(task_id="t", status="STARTED", name="a", worker="w1"),
        TaskState(task_id="t", status="FAILURE", name="a", exc_type="KeyError"),
        TaskForgotten(task_id="t"),
    ):
        ledger.append([data])
    (row,) = ledger.tasks()
    assert (row.entry.state, row.entry.forgotten, row.entry.exc_type) == ("FAILURE", True, "KeyError")
    assert row.entry.runtime is not None
    assert ledger.task_meta("t") is None  # Celery sees PENDING; the catalogue still lists it
    ledger.append([TaskState(task_id="t", status="RETRY", name="a")])  # a new life, not started
    (row,) = ledger.tasks()
    assert (row.entry.state, row.entry.forgotten, row.entry.started_at) == ("RETRY", False, None)
    ledger.append([ResultExpired(task_id="t", expired_before=datetime.now(timezone.utc))])
    assert ledger.tasks()[0].entry.expired
    memory = MemoryTarget()
    with ledger.engine.connect() as conn:
        memory.apply(ledger.log.read_stream(conn, "task:t"))
    assert memory.state.catalogue == ledger.snapshot().catalogue


def test_db_upgrade_back_fills_the_catalogue_of_an_existing_ledger(any_url, capsys):
    """A ledger before the catalogue, full of events (made by downgrading one): ``db upgrade`` fills
    the catalogue from the log, equal to the fold of it."""
    from ledger import migrate
    from ledger.audit import read_events
    from tests.test_rebuild import workload

    ledger = Ledger.open(any_url)
    for tag in ("a", "b", "c"):
        workload(ledger, tag)
    # Every payload column, and a redelivery after SUCCESS (its late STARTED moves
    # neither state nor runtime): the migration's own copy of the rule must hold.
    full = dict(name="shop.charge", worker="celery@w7", queue="payments", retries=1, parent_id="p",
                root_id="r", group_id="g", args=Encoded(content_type="application/json", data=b'["order-17"]'),
                kwargs=Encoded(content_type="application/json", data=b'{"n": 1}'))
    for status in ("STARTED", "SUCCESS", "STARTED", "FAILURE"):
        ledger.append([TaskState(task_id="redelivered", status=status, **full)])
    ledger.append([TaskState(task_id="failed", status="FAILURE", exc_type="KeyError", **full)])
    migrate.downgrade(ledger.engine, "0002_integrity")
    assert "ledger_tasks" not in sa.inspect(ledger.engine).get_table_names()
    assert main(["db", "upgrade", "--db", ledger.engine.url.render_as_string(hide_password=False)]) == 0
    assert "schema at revision" in capsys.readouterr().out
    memory = MemoryTarget()
    memory.apply(read_events(ledger))
    live = ledger.snapshot()
    assert len(live.catalogue) == 62 and any(e.forgotten for e in live.catalogue.values())
    assert (live.catalogue["redelivered"].state, live.catalogue["failed"].exc_type) == ("SUCCESS", "KeyError")
    assert memory.state.differences(live) == []
    migrate.check(ledger.engine)


def lifecycle_workload(ledger: Ledger) -> None:
    """Tasks only sent, only received, run after a countdown, retried, and a SENT that
    committed after the worker's STARTED: every lifecycle row and time."""
    t0 = datetime.now(timezone.utc)
    ledger.append([TaskSent(task_id="lost", name="shop.charge", sent_at=t0, queue="nobody",
                            args=Encoded(content_type="application/json", data=b"[7]"))])
    ledger.append([TaskReceived(task_id="held", name="shop.sync", hostname="celery@w2")])
    # received, not started: the worker and name are the RECEIVED's, the queue and
    # arguments still the SENT's (also when the SENT committed second)
    for task_id, order in (("waiting", 1), ("waiting-late-sent", -1)):
        ledger.append([TaskSent(task_id=task_id, name="shop.sync", sent_at=t0, queue="q9", root_id="r9",
                                args=Encoded(content_type="application/json", data=b"[9]")),
                       TaskReceived(task_id=task_id, name="shop.sync", hostname="celery@w3")][::order])
    ledger.append([TaskSent(task_id="eta", name="shop.sync", sent_at=t0, eta=t0 + timedelta(seconds=3)),
                   TaskReceived(task_id="eta", hostname="celery@w1", due_at=t0 + timedelta(seconds=3))])
    ledger.append([TaskState(task_id="eta", status="STARTED", worker="celery@w1"),
                   TaskState(task_id="eta", status="SUCCESS", worker="celery@w1")])
    ledger.append([TaskSent(task_id="retried", name="shop.charge", sent_at=t0),
                   TaskReceived(task_id="retried", hostname="celery@w1"),
                   TaskState(task_id="retried", status="STARTED"),
                   TaskSent(task_id="retried", name="shop.charge", sent_at=t0, retries=1,
                            eta=t0 + timedelta(seconds=1)),
                   TaskState(task_id="retried", status="RETRY")])
    ledger.append([TaskState(task_id="late", status="STARTED", worker="celery@w1"),
                   TaskSent(task_id="late", name="shop.charge", sent_at=t0)])


def test_db_upgrade_to_0004_fills_lifecycle_rows_and_times(any_url):
    """A ledger at 0003 holding SENT/RECEIVED events: ``db upgrade`` adds the columns
    and fills the catalogue again, equal to the fold of the log (tasks only sent or
    received included); a downgrade leaves 0003's catalogue."""
    from ledger import migrate
    from ledger.audit import read_events
    from tests.test_rebuild import workload

    ledger = Ledger.open(any_url)
    workload(ledger, "a")
    lifecycle_workload(ledger)
    stored = "SELECT * FROM ledger_tasks ORDER BY task_id"
    with ledger.engine.connect() as conn:
        # as the live path stored them (SQLite: the very text of each time)
        live_rows = conn.execute(sa.text(stored)).all()
    migrate.downgrade(ledger.engine, "0003_catalogue")
    columns = {c["name"] for c in sa.inspect(ledger.engine).get_columns("ledger_tasks")}
    assert "ready_at" not in columns
    with ledger.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM ledger_tasks WHERE state = 'SENT'")).scalar() == 0
    migrate.upgrade(ledger.engine)
    memory = MemoryTarget()
    memory.apply(read_events(ledger))
    live = ledger.snapshot()
    assert memory.state.differences(live) == []
    assert {t: live.catalogue[t].state for t in ("lost", "held", "eta", "retried", "late")} == {
        "lost": "SENT", "held": "RECEIVED", "eta": "SUCCESS", "retried": "RETRY", "late": "STARTED"}
    assert live.catalogue["eta"].queue_wait is not None
    for task_id in ("waiting", "waiting-late-sent"):
        e = live.catalogue[task_id]
        assert (e.state, e.worker, e.queue, e.root_id, e.args) == ("RECEIVED", "celery@w3", "q9", "r9", b"[9]")
    with ledger.engine.connect() as conn:
        assert conn.execute(sa.text(stored)).all() == live_rows
    migrate.check(ledger.engine)


def test_rebuild_stores_the_catalogue_rows_exactly_as_the_live_path_did(any_url):
    """The rebuild writes the rows through the driver (binary COPY, executemany): every
    value as stored, SQLite's time text included, equals what the appends stored."""
    from ledger.rebuild import rebuild
    from tests.test_rebuild import workload

    ledger = Ledger.open(any_url)
    workload(ledger, "a")
    lifecycle_workload(ledger)
    stored = sa.text("SELECT * FROM ledger_tasks ORDER BY task_id")
    with ledger.engine.connect() as conn:
        live_rows = conn.execute(stored).all()
    assert rebuild(ledger).rows["ledger_tasks"] == len(live_rows)
    with ledger.engine.connect() as conn:
        assert conn.execute(stored).all() == live_rows


def test_timeline_finds_a_workflow_through_the_catalogues_root_ids(ledger):
    """No children lists here: only the catalogue's root ids link x and y to r; z's
    args mention r but it belongs to another workflow."""
    from ledger.timeline import find_workflow

    mentions_r = Encoded(content_type="application/json", data=b'["r"]')
    ledger.append([
        TaskState(task_id="r", status="SUCCESS", root_id="r"),
        TaskState(task_id="x", status="SUCCESS", root_id="r"),
        TaskState(task_id="y", status="FAILURE", root_id="r", exc_type="KeyError"),
        TaskState(task_id="z", status="SUCCESS", root_id="other", args=mentions_r),
    ])
    assert set(find_workflow(ledger, "y").tasks) == {"r", "x", "y"}
    assert set(find_workflow(ledger, "r").tasks) == {"r", "x", "y"}


def test_a_redelivery_after_success_changes_nothing_live_or_rebuilt(ledger):
    """SUCCESS is sticky: a late STARTED/FAILURE of a redelivered message is in the log
    but moves neither the state nor the runtime, in the live row or a rebuilt one."""
    from ledger.rebuild import rebuild

    for status in ("STARTED", "SUCCESS", "STARTED", "FAILURE"):
        ledger.append([TaskState(task_id="t", status=status, name="a")])
    first_start = ledger.history("t")[0].recorded_at
    (row,) = ledger.tasks()
    assert (row.entry.state, row.entry.started_at) == ("SUCCESS", first_start)
    assert verify(ledger, ["catalogue"]) == []
    rebuild(ledger, ["catalogue"])
    assert ledger.tasks()[0].entry == row.entry


@pytest.mark.worker
def test_without_result_extended_finished_tasks_keep_their_name_worker_queue_and_retries(db_url):  # noqa: F811
    """Celery's default (``result_extended = False``) stores no name in a result. The
    catalogue must still find a finished task by name, worker and queue: its states
    carry them from the worker's request -- never its arguments, and Celery's own
    view of the result stays as Celery has it without result_extended."""
    with running_worker(db_url, extended=False) as app:
        add, fail, flaky = (task(app, n) for n in ("add", "fail", "flaky"))
        done, failed = add.delay(2, 3), fail.delay("no extended")
        retried = flaky.delay(f"flaky-{uuid.uuid4().hex[:8]}", 2)
        assert done.get(timeout=WAIT) == 5
        failed.get(timeout=WAIT, propagate=False)
        retried.get(timeout=WAIT)
        ledger: Ledger = app.backend.ledger
        queue = app.conf.task_default_queue
        rows = {r.task_id: r.entry for r in ledger.tasks(name="workerapp.*")}
        for r, name, state in [(done, "workerapp.add", "SUCCESS"), (failed, "workerapp.fail", "FAILURE"),
                               (retried, "workerapp.flaky", "SUCCESS")]:
            entry = rows[r.id]
            assert (entry.name, entry.state, entry.queue) == (name, state, queue)
            assert entry.worker and entry.worker.startswith(queue + "@"), entry.worker
            assert entry.args is None and entry.kwargs is None
        assert rows[retried.id].retries == 1 and rows[done.id].retries == 0
        assert rows[failed.id].exc_type == "ValueError"
        assert {r.task_id for r in ledger.tasks(name="workerapp.add", worker=rows[done.id].worker,
                                                 queue=queue)} >= {done.id}
        # Celery's view without result_extended: no name, no arguments
        meta = app.backend.get_task_meta(done.id)
        assert meta["result"] == 5 and meta.get("name") is None and meta.get("args") is None
        assert done.name is None
        assert verify(ledger, ["catalogue"]) == []
