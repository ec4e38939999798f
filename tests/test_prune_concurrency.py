"""prune and rebuild while workers store: no store is lost, the projections equal the log."""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import threading
import time
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa
from celery import Celery, states
from celery.app.task import Context

from ledger.api import Ledger
from ledger.audit import read_events
from ledger.cli import main
from ledger.events import GroupSaved, NewEvent, TaskState
from ledger.rebuild import rebuild, verify
from ledger.store.base import EncodedEvent
from ledger.store.postgres import MAINTENANCE_LOCK
from tests.conftest import admin
from tests.test_rebuild import workload

pytestmark = pytest.mark.postgres

#: What Ledger._retrying logs when the database rolled a write back for a concurrent one.
ROLLED_BACK = "ledger write rolled back by the database"


class _Retries(logging.Handler):
    """Counts the writes the database rolled back (a deadlock) that were run again."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += record.getMessage().startswith(ROLLED_BACK)


def _store_results(url: str, tag: str, stop, done) -> None:
    """A worker's stores through Celery's backend API until ``stop``: STARTED, then
    SUCCESS or FAILURE, every tenth forgotten. Puts ``(tag, tasks, error, retries)``
    on ``done``."""
    retries = _Retries()
    logging.getLogger("ledger").addHandler(retries)
    logging.getLogger("ledger").setLevel(logging.DEBUG)
    app = Celery("prune-writer", broker="memory://", backend=f"ledger+{url}", set_as_current=False)
    backend, i, error = app.backend, 0, None
    try:
        while not stop.is_set():
            t = f"{tag}-{i}"
            request = Context(id=t, task=f"w.t{i % 3}", args=[], kwargs={}, hostname="w",
                              retries=0, delivery_info={"routing_key": "q"})
            i += 1
            backend.store_result(t, None, states.STARTED, request=request)
            if i % 4 == 1:
                backend.mark_as_failure(t, ValueError(t), request=request)
            else:
                backend.mark_as_done(t, t, request=request)
            if i % 10 == 1:
                backend.forget(t)
    except Exception as exc:  # reported to the test: a store must never fail
        error = f"{type(exc).__name__}: {exc} ({exc.__cause__!r})"
    done.put((tag, i, error, retries.count))


def test_prune_while_workers_store_loses_no_result_and_deadlocks_none(pg_url, capsys, caplog):
    """Two worker processes store results while prune runs 15 times: every store
    lands and verify is clean. Before, prune locked the projection tables in another
    order than the stores do: a store deadlocked against it and its task stayed
    STARTED (10 runs of 10). Prune now locks in the stores' order: no deadlock at all
    (none retried, in the workers or in prune)."""
    caplog.set_level(logging.DEBUG, logger="ledger")
    ctx = mp.get_context("fork")
    stop, done = ctx.Event(), ctx.Queue()
    writers = [ctx.Process(target=_store_results, args=(pg_url, tag, stop, done)) for tag in "ab"]
    for p in writers:
        p.start()
    try:
        for _ in range(15):
            assert main(["prune", "--before", "-0d", "--db", pg_url]) == 0, capsys.readouterr().err
    finally:
        stop.set()
        results = []
        for _ in writers:
            try:
                results.append(done.get(timeout=120))
            except queue.Empty:
                break
        for p in writers:
            p.join(timeout=60)
    assert [error for _, _, error, _ in results] == [None, None]
    ledger = Ledger.open(pg_url)
    for tag, stored, _, _ in results:
        for i in range(1, stored + 1):
            meta = ledger.task_meta(f"{tag}-{i - 1}")
            if i % 10 == 1:
                assert meta is None, (tag, i - 1)
            else:
                assert meta is not None and meta.status == ("FAILURE" if i % 4 == 1 else "SUCCESS"), (tag, i - 1)
    assert verify(ledger) == []
    retried = sum(r for *_, r in results) + sum(m.startswith(ROLLED_BACK) for m in caplog.messages)
    assert retried == 0, "a write deadlocked against prune"


def test_a_write_that_loses_a_deadlock_to_prune_is_retried(pg_url, capsys):
    """A transaction that appends a group and then a task state takes the tables in
    another order than prune (groups before the catalogue): with prune between the
    two, PostgreSQL ends the writer as a deadlock. It is run again and both events
    land, after the prune (before: the write failed with DeadlockDetected)."""
    # The writer, waiting last, must be the one that finds the deadlock: it checks
    # after 10 ms, the prune's sessions after 30 s.
    admin(f"ALTER DATABASE \"{pg_url.rsplit('/', 1)[1]}\" SET deadlock_timeout = '30s'")
    ledger = Ledger.open(pg_url)
    attempts: list[int] = []
    pruned: list[int] = []
    prune = threading.Thread(
        target=lambda: pruned.append(main(["prune", "--before", "-0d", "--db", pg_url]))
    )

    def prune_waits_for_groups(conn: sa.Connection) -> bool:
        return conn.execute(sa.text(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'ledger_groups'::regclass"
        )).scalar_one() > 0

    def work(conn: sa.Connection) -> None:
        attempts.append(1)
        conn.execute(sa.text("SET LOCAL deadlock_timeout = '10ms'"))
        ledger.store.append(conn, [EncodedEvent.of(NewEvent(GroupSaved(group_id="g", result=["t"])))])
        if len(attempts) == 1:
            prune.start()
            deadline = time.monotonic() + 60
            with ledger.engine.connect() as other:
                while not prune_waits_for_groups(other):
                    assert time.monotonic() < deadline, "prune never waited for ledger_groups"
                    time.sleep(0.01)
        ledger.store.append(conn, [EncodedEvent.of(NewEvent(TaskState(task_id="t", status="SUCCESS")))])

    try:
        ledger.write(work)
    finally:
        if prune.ident is not None:
            prune.join(timeout=120)
    assert pruned == [0], capsys.readouterr().err
    assert len(attempts) == 2
    assert ledger.task_meta("t").status == "SUCCESS" and ledger.group("g") is not None
    assert verify(ledger) == []


class _PruneDuringFill:
    """A rebuild's progress that starts ``prune --before cutoff`` at the fill's first
    step and lets the fill go on once the prune has committed or waits for a lock."""

    total = 0

    def __init__(self, url: str, cutoff: datetime) -> None:
        self.url, self.codes = url, []
        self.prune = threading.Thread(target=lambda: self.codes.append(
            main(["prune", "--before", cutoff.isoformat(), "--db", url])
        ))
        self._once = threading.Lock()

    def advance(self, n: int) -> None:
        if not self._once.acquire(blocking=False):
            return
        self.prune.start()
        ledger, deadline = Ledger.open(self.url), time.monotonic() + 60
        with ledger.engine.connect() as conn:
            while self.prune.is_alive() and not conn.execute(sa.text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            )).scalar_one():
                assert time.monotonic() < deadline, "prune neither finished nor waited"
                time.sleep(0.01)


def test_prune_during_a_rebuild_waits_for_it_and_verify_is_clean(pg_url, capsys):
    """A prune that commits while a rebuild fills would be undone by the swap: the
    rebuild's tables come from a snapshot before the prune (verify then found every
    catalogue row different, and the pruned chord back). The prune now waits for the
    rebuild, then prunes the rebuilt tables."""
    ledger = Ledger.open(pg_url)
    workload(ledger, "old")
    cutoff = max(e.recorded_at for e in read_events(ledger)) + timedelta(microseconds=1)
    workload(ledger, "new")
    during = _PruneDuringFill(pg_url, cutoff)
    report = rebuild(ledger, progress=during)
    during.prune.join(timeout=120)
    assert during.codes == [0], capsys.readouterr().err
    assert report.rows["ledger_tasks"] == 40
    assert ledger.chord("old-c1") is None  # the prune's, not undone
    assert verify(ledger) == []


def test_a_rebuild_waits_for_a_prune_in_progress(pg_url):
    """A rebuild started while a prune runs waits for its commit before taking its
    snapshot (else the prune, committed before the swap, would be undone by it). The
    prune is stood in for by a session holding what a prune holds."""
    ledger = Ledger.open(pg_url)
    workload(ledger)
    done: list = []
    with ledger.engine.connect() as pruning:
        pruning.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MAINTENANCE_LOCK})
        rebuilding = threading.Thread(target=lambda: done.append(rebuild(ledger)))
        rebuilding.start()
        deadline = time.monotonic() + 60
        while not pruning.execute(sa.text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        )).scalar_one():
            assert rebuilding.is_alive(), "the rebuild ran beside the prune"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not done
        pruning.rollback()
    rebuilding.join(timeout=120)
    assert done[0].rows["ledger_task_meta"] == 19
    assert verify(ledger) == []


def test_a_partial_rebuild_while_workers_store_succeeds(pg_url, capsys):
    """``rebuild --projection catalogue`` while two workers store: its catch-up
    applied their task states to the live task rows too, in REPEATABLE READ, and
    failed on a row a worker had changed (SerializationFailure, 3 runs of 3), leaving
    ``ledger_tasks__rebuild`` behind. It now writes the catalogue only."""
    ctx = mp.get_context("fork")
    stop, done = ctx.Event(), ctx.Queue()
    writers = [ctx.Process(target=_store_results, args=(pg_url, tag, stop, done)) for tag in "xy"]
    for p in writers:
        p.start()
    ledger = Ledger.open(pg_url)
    try:
        while ledger.read(lambda c: c.execute(sa.text("SELECT count(*) FROM ledger_tasks")).scalar_one()) < 500:
            time.sleep(0.05)
        code = main(["rebuild", "--projection", "catalogue", "--db", pg_url])
        _, err = capsys.readouterr()
        assert code == 0, err
        assert ledger.read(lambda c: c.execute(sa.text("SELECT count(*) FROM ledger_tasks")).scalar_one()) > 500
    finally:
        stop.set()
        results = [done.get(timeout=120) for _ in writers]
        for p in writers:
            p.join(timeout=60)
    assert [error for _, _, error, _ in results] == [None, None]
    assert verify(ledger) == []
    assert main(["db", "check", "--db", pg_url]) == 0
