"""prune while workers store: no store is lost, the projections equal the log."""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import threading
import time

import pytest
import sqlalchemy as sa
from celery import Celery, states
from celery.app.task import Context

from ledger.api import Ledger
from ledger.cli import main
from ledger.events import GroupSaved, NewEvent, TaskState
from ledger.rebuild import verify
from ledger.store.base import EncodedEvent
from tests.conftest import admin

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

