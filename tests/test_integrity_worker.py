"""Integrity of the audit with a real ``celery worker``: what issue 13 found broken.

The worker (prefork, Redis broker) is the one from tests/test_celery_worker.py,
started for this module on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from celery import chord, group
from celery.exceptions import BackendGetMetaError
from celery.result import GroupResult

from ledger import migrate
from ledger.events import LIFECYCLE_TYPES
from ledger.store.engine import engine_for
from ledger.timeline import find_workflow, fold_run, render_text, to_json
from tests.faults.workers import Workers
from tests.test_celery_worker import WAIT, db_url, task, worker  # noqa: F401  (fixtures)
from tests.test_integrity import fresh_url  # noqa: F401  (fixture)

pytestmark = [pytest.mark.worker]

CLI = str(Path(sys.executable).parent / "celery-ledger")


def cli(*args: str, timeout: float = WAIT) -> subprocess.CompletedProcess:
    """``celery-ledger ARGS`` in its own process (a hang fails the test, bounded)."""
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout)


def wait_for_events(ledger, task_id: str, n: int) -> list:
    """The task's first ``n`` stored states (its SENT/RECEIVED left out), waited for."""
    deadline = time.monotonic() + WAIT
    history = stored(ledger, task_id)
    while len(history) < n and time.monotonic() < deadline:
        time.sleep(0.05)
        history = stored(ledger, task_id)
    return history


def stored(ledger, task_id: str) -> list:
    return [e for e in ledger.history(task_id) if e.type not in LIFECYCLE_TYPES]


def test_timeline_of_a_task_retried_on_its_own_returns(worker, db_url):  # noqa: F811
    r = task(worker, "flaky").delay(f"flaky-{uuid.uuid4()}", 3)
    assert r.get(timeout=WAIT) == "ok on attempt 3"
    ledger = worker.backend.ledger
    history = wait_for_events(ledger, r.id, 6)
    # What made the walk loop: Celery gives each retry the task's own id as parent.
    assert r.id in {e.data.parent_id for e in history}
    done = cli("timeline", r.id, "--db", db_url, "--format", "json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert [t["task_id"] for t in out["tasks"]] == [r.id]
    assert out["tasks"][0]["retries"] == 2 and out["tasks"][0]["parent_id"] is None
    assert out["tree"][0]["task"]["task_id"] == r.id


def test_timeline_durations_without_started(worker, db_url):  # noqa: F811
    r = task(worker, "untracked").delay(7)
    assert r.get(timeout=WAIT) == 7
    ledger = worker.backend.ledger
    assert [e.data.status for e in stored(ledger, r.id)] == ["SUCCESS"]
    wf = find_workflow(ledger, r.id)
    run = wf.tasks[r.id]
    # The worker's RECEIVED says when the run began: a duration without STARTED.
    assert run.started_at is None and run.duration is not None and run.duration >= 0
    assert wf.notes == []
    # Without RECEIVED either (ledger_track_received = False) it is unknown, and said so.
    wf.tasks[r.id] = fold_run(r.id, stored(ledger, r.id))
    run = wf.tasks[r.id]
    assert run.duration is None and run.ended_at is not None
    text = render_text(wf)
    # (folded from its task states alone: no SENT either, so the note for that case)
    assert "task_track_started all off" in text and "unknown" in text
    row = next(line for line in text.splitlines() if line.startswith("└─"))
    assert r.id in row and re.search(r"SUCCESS\s+\+0ms\s+-\s+-\s+0\s", row), row  # wait, duration "-"
    assert to_json(wf)["notes"] and to_json(wf)["tasks"][0]["duration_s"] is None
    # A task that stores STARTED has a duration and no note.
    tracked = task(worker, "add").delay(1, 2)
    assert tracked.get(timeout=WAIT) == 3
    wf = find_workflow(ledger, tracked.id)
    assert wf.tasks[tracked.id].duration is not None and wf.notes == []


def test_an_unmigrated_database_is_named_with_its_fix_in_one_line(fresh_url, tmp_path):  # noqa: F811
    w = Workers(f"ledger+{fresh_url}", {}, tmp_path)
    try:
        w.start(concurrency=1)
        app = w.client()
        r = app.tasks["workerapp.add"].delay(1, 2)
        fix = f"run `celery-ledger db upgrade --db {fresh_url}`"
        with pytest.raises(BackendGetMetaError, match=re.escape(fix)):
            r.get(timeout=WAIT)
        deadline = time.monotonic() + WAIT
        while fix not in w.log_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        log = w.log_text()
        assert "has no ledger schema" in log and fix in log
        # No SQL error chain: the worker logs the one line, not the driver's traceback.
        assert "no such table" not in log and "UndefinedTable" not in log
        for command in (["history", r.id], ["verify"], ["rebuild"], ["prune", "--before", "2099-01-01"]):
            done = cli(*command, "--db", fresh_url)
            assert done.returncode == 1 and done.stderr.strip().endswith(fix), done.stderr
            assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
        # Nothing was created implicitly; once migrated, the same worker stores.
        assert migrate.current(engine_for(fresh_url)) is None
        assert cli("db", "upgrade", "--db", fresh_url).returncode == 0
        assert app.tasks["workerapp.add"].delay(2, 3).get(timeout=WAIT) == 5
    finally:
        w.close()


def test_timeline_finds_every_member_from_any_member(worker, db_url):  # noqa: F811
    add, tsum = task(worker, "add"), task(worker, "tsum")
    ledger = worker.backend.ledger
    # A plain group (never saved): each member carries its group id.
    g = group(add.s(i, i) for i in range(3)).apply_async()
    assert g.get(timeout=WAIT) == [0, 2, 4]
    members = [r.id for r in g.results]
    wf = find_workflow(ledger, members[1])
    assert set(members) <= set(wf.tasks) and sorted(wf.groups[g.id]) == sorted(members)
    assert "group " + g.id + " (3 tasks)" in render_text(wf)
    # A chord, from one of its header parts: the body is there too.
    c = chord([add.si(1, 1), add.si(2, 2)], tsum.s()).apply_async()
    assert c.get(timeout=WAIT) == 6
    header = [r.id for r in c.parent.results]
    for start in header:
        wf = find_workflow(ledger, start)
        assert {*header, c.id} <= set(wf.tasks)
        assert wf.chords[c.parent.id]["body"] == [c.id]
    # A saved group whose tasks have not run yet: its members, PENDING.
    saved = GroupResult(str(uuid.uuid4()), [worker.AsyncResult(str(uuid.uuid4())) for _ in range(2)],
                        app=worker)
    saved.save()
    done = cli("timeline", saved.id, "--db", db_url, "--format", "json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert sorted(t["task_id"] for t in out["tasks"]) == sorted(r.id for r in saved.results)
    assert {t["state"] for t in out["tasks"]} == {"PENDING"}


def test_timeline_of_a_chord_whose_body_failed_before_it_ran(worker):  # noqa: F811
    add, fail, tsum = task(worker, "add"), task(worker, "fail"), task(worker, "tsum")
    c = chord([add.si(1, 1), fail.si("header part failed")], tsum.s()).apply_async()
    with pytest.raises(Exception, match="header part failed"):
        c.get(timeout=WAIT)
    ledger = worker.backend.ledger
    header = [r.id for r in c.parent.results]
    for start in (c.id, *header):
        wf = find_workflow(ledger, start)
        assert {*header, c.id} <= set(wf.tasks), start
        assert wf.chords[c.parent.id]["body"] == [c.id]
        assert wf.tasks[c.id].state == "FAILURE"
