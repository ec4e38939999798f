"""Integrity on SQLite and PostgreSQL: the audit never hangs, never serves a bad event
as clean, and loses nothing (issue 13). Cases that need a real worker are in
tests/test_integrity_worker.py.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

import msgpack
import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory
from celery import Celery
from celery.exceptions import BackendGetMetaError

from ledger import migrate
from ledger.api import Ledger
from ledger.audit import show_record, task_history
from ledger.errors import DowngradeRefused, RebuildError
from ledger.events import TaskState
from ledger.rebuild import prune, rebuild, verify
from ledger.store.engine import engine_for
from ledger.store.schema import LIVE, PRUNE_SETTING, events
from ledger.timeline import find_workflow
from tests.conftest import PG_SERVER, RUN_ID, admin, ensure_postgres

FAR_FUTURE = datetime(2099, 1, 1, tzinfo=timezone.utc)
CLI = str(Path(sys.executable).parent / "celery-ledger")


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``celery-ledger ARGS`` in its own process, as a user runs it."""
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(60)
def test_timeline_walk_ends_on_a_parent_cycle(ledger: Ledger):
    # Bad data: a and b name each other as parent. The walk must end, not spin.
    ledger.append([TaskState(task_id="a", status="SUCCESS", parent_id="b")])
    ledger.append([TaskState(task_id="b", status="SUCCESS", parent_id="a")])
    wf = find_workflow(ledger, "a")
    assert set(wf.tasks) == {"a", "b"}


def test_downgrade_refuses_to_drop_a_log_holding_events_without_yes(any_url):
    ledger = Ledger.open(any_url)
    ledger.append([TaskState(task_id="kept", status="SUCCESS")])
    to_base = f"-{len(list(ScriptDirectory.from_config(migrate.config()).walk_revisions()))}"
    for revision in ("base", to_base):
        done = cli("db", "downgrade", "--db", any_url, "--", revision)
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1 and "holds 1 events; pass --yes" in done.stderr
        assert [e.data.status for e in ledger.history("kept")] == ["SUCCESS"]
    with pytest.raises(DowngradeRefused):
        migrate.downgrade(ledger.engine, "base")
    done = cli("db", "downgrade", "base", "--yes", "--db", any_url)
    assert done.returncode == 0, done.stderr
    assert "ledger_events" not in sa.inspect(ledger.engine).get_table_names()
    # An empty log is dropped without asking.
    migrate.upgrade(ledger.engine)
    assert cli("db", "downgrade", "base", "--db", any_url).returncode == 0


def _store_one(url: str, barrier, task_id: str) -> None:
    """A process that starts with ledger_auto_upgrade and stores one result at once."""
    from celery import Celery

    app = Celery("race", backend=f"ledger+{url}", set_as_current=False)
    app.conf.ledger_auto_upgrade = True
    barrier.wait(60)
    app.backend.mark_as_done(task_id, task_id)


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request, tmp_path):
    """An empty database, never migrated."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    ensure_postgres()
    name = f"ledger_fresh_{RUN_ID}_{uuid.uuid4().hex[:8]}"
    admin(f'CREATE DATABASE "{name}"')
    yield f"{PG_SERVER}/{name}"
    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize("round_", range(4))
def test_processes_starting_together_on_a_fresh_database_all_store(fresh_url, round_):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    ids = [str(uuid.uuid4()) for _ in range(3)]
    procs = [ctx.Process(target=_store_one, args=(fresh_url, barrier, t)) for t in ids]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    ledger = Ledger.open(fresh_url)
    assert migrate.current(ledger.engine) == migrate.head()
    assert [ledger.task_meta(t).status for t in ids] == ["SUCCESS"] * 3


def tamper(url: str, *statements) -> None:
    """Change stored rows behind the ledger's back, as someone with database access could.

    On PostgreSQL the log refuses UPDATE and DELETE unless the transaction says
    it is a prune (``SET LOCAL ledger.prune = 'on'``); so does this.
    """
    engine = engine_for(url)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text(f"SET LOCAL {PRUNE_SETTING} = 'on'"))
        for statement in statements:
            conn.execute(statement)


def _stored(url: str, n: int = 3) -> tuple[Celery, list[str]]:
    app = Celery("integrity", backend=f"ledger+{url}", set_as_current=False)
    ids = [str(uuid.uuid4()) for _ in range(n)]
    for i, task_id in enumerate(ids):
        app.backend.mark_as_started(task_id)
        app.backend.mark_as_done(task_id, i)
    return app, ids


NOT_AN_EVENT = msgpack.packb({"task_id": "x"})  # valid msgpack, no state: not a task.state


def test_rebuild_and_verify_refuse_valid_msgpack_that_is_not_an_event(any_url):
    app, ids = _stored(any_url)
    ledger = Ledger.open(any_url)
    bad = ledger.history(ids[1])[-1].position
    tamper(any_url, sa.update(events).where(events.c.position == bad).values(payload=NOT_AN_EVENT))
    with pytest.raises(RebuildError, match=rf"corrupt event at log position {bad} \(task:{ids[1]}\)"):
        rebuild(ledger)
    assert app.backend.get_task_meta(ids[1])["result"] == 1  # the good live row is kept
    problems = verify(ledger)
    assert any(f"corrupt event at log position {bad} (task:{ids[1]})" in p for p in problems), problems
    done = cli("verify", "--db", any_url)
    assert done.returncode == 1 and f"position {bad}" in done.stdout


def test_a_bad_projection_row_is_a_get_meta_error_naming_the_position(any_url):
    app, ids = _stored(any_url)
    row = Ledger.open(any_url).task_meta(ids[0])
    tamper(any_url, sa.update(LIVE.task_meta).where(LIVE.task_meta.c.task_id == ids[0])
           .values(payload=NOT_AN_EVENT))
    app.backend._cache.clear()
    with pytest.raises(BackendGetMetaError, match=rf"corrupt event at log position {row.position}"):
        app.AsyncResult(ids[0]).get(timeout=10)
    done = cli("show", ids[0], "--db", any_url)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"corrupt event at log position {row.position}" in done.stderr
    assert [app.backend.get_task_meta(t)["result"] for t in ids[1:]] == [1, 2]


@pytest.mark.postgres
def test_the_log_refuses_update_delete_and_truncate_except_through_prune(pg_url):
    app, ids = _stored(pg_url)
    ledger = Ledger.open(pg_url)
    first = ledger.history(ids[0])[0].position
    for statement in (
        sa.update(events).where(events.c.position == first).values(payload=NOT_AN_EVENT),
        sa.delete(events).where(events.c.position == first),
        sa.text("TRUNCATE ledger_events"),
    ):
        with pytest.raises(sa.exc.DBAPIError, match="ledger_events is append-only"), \
                ledger.engine.begin() as conn:
            conn.execute(statement)
    assert [len(ledger.history(t)) for t in ids] == [2, 2, 2]
    report = prune(ledger, FAR_FUTURE)  # prune passes (its own transaction says so)
    assert report.events_deleted == 3 and verify(ledger) == []


def test_verify_and_history_report_an_event_deleted_outside_prune(any_url, capsys):
    app, ids = _stored(any_url)
    ledger = Ledger.open(any_url)
    started, done = ledger.history(ids[0])
    tamper(any_url, sa.delete(events).where(events.c.position == started.position))
    problems = verify(ledger)
    gap = (
        f"stream-version gap at log position {done.position} (task:{ids[0]}): version 1 missing, "
        "deleted outside prune"
    )
    # The catalogue row was folded from the deleted STARTED too: a rebuild of what is
    # left differs from it (its started time), and verify says that as well.
    assert problems[0] == gap
    assert len(problems) == 2 and problems[1].startswith(f"catalogue['{ids[0]}']")
    rows = task_history(ledger, ids[0])
    assert [(r["version"], r["state"]) for r in rows] == [("1", "MISSING"), (2, "SUCCESS")]
    # What prune deletes is its own: no gap reported after it.
    tamper(any_url, sa.insert(events).values(
        position=started.position, event_id=started.event_id, stream_id=started.stream_id,
        stream_version=1, type=started.type, schema_version=1, recorded_at=started.recorded_at,
        task_state="STARTED", payload=started.payload, tx_id=started.tx_id))
    assert verify(ledger) == []
    prune(ledger, FAR_FUTURE)
    assert verify(ledger) == []
    assert [r["state"] for r in task_history(ledger, ids[0])] == ["PRUNED", "SUCCESS"]


def test_show_says_forgotten_and_pruned_instead_of_pending(any_url):
    app, ids = _stored(any_url, 2)
    ledger = Ledger.open(any_url)
    app.backend.forget(ids[0])
    tombstone = ledger.history(ids[0])[-1]
    record = show_record(ledger, ids[0], None)
    assert (record["state"], record["position"]) == ("FORGOTTEN", tombstone.position)
    assert record["date_done"] == tombstone.recorded_at
    done = cli("show", ids[0], "--db", any_url)
    assert done.returncode == 0 and "state: FORGOTTEN" in done.stdout
    assert f"position: {tombstone.position}" in done.stdout

    started = ledger.history(ids[1])[0]
    prune(ledger, FAR_FUTURE)
    record = show_record(ledger, ids[1], started.position)
    assert record["state"] == "PRUNED" and "history at that time was pruned" in record["note"]
    done = cli("show", ids[1], "--as-of", f"@{started.position}", "--db", any_url)
    assert "state: PRUNED" in done.stdout and "was pruned" in done.stdout
    assert show_record(ledger, ids[1], None)["state"] == "SUCCESS"


def test_verify_json_summary_counts_every_difference_and_describes_the_first(any_url):
    ledger = Ledger.open(any_url)
    ledger.append([TaskState(task_id=f"t{i:03}", status="SUCCESS") for i in range(300)])
    tamper(any_url, sa.update(LIVE.task_meta).values(status="TAMPERED"))  # every row differs
    done = cli("verify", "--format", "json", "--limit", "5", "--db", any_url)
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    assert doc["clean"] is False and doc["total"] == 300
    assert doc["counts"] == {"corrupt_events": 0, "version_gaps": 0, "task_meta": 300,
                             "groups": 0, "chords": 0, "chord_parts": 0, "chord_counts": 0,
                             "catalogue": 0}
    assert doc["shown"] == 5 and [d.split("]")[0] for d in doc["differences"]] == [
        f"task_meta['t{i:03}'" for i in range(5)]
    assert "celery-ledger rebuild" in doc["hint"]
    text = cli("verify", "--limit", "3", "--db", any_url)
    assert text.stdout.splitlines()[-1] == "... and 297 more"
    assert "300 difference(s)" in text.stderr and "task_meta 300" in text.stderr
    rebuild(ledger)
    doc = json.loads(cli("verify", "--format", "json", "--db", any_url).stdout)
    assert doc["clean"] and doc["total"] == 0 and doc["hint"] is None
