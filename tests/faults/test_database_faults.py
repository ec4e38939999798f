"""The database goes away under a real worker, or rejects an append: nothing is lost.

* 2,000 results stored by a real prefork worker while the private PostgreSQL
  cluster is stopped and started, or while a TCP proxy cuts every connection:
  each task ends with exactly one SUCCESS event and one SUCCESS row, the worker
  logged its retries, and it still serves tasks afterwards.
* A commit whose reply is lost (it committed; the client saw a disconnect) is
  retried by Celery's retry loop without storing the state twice.
* An append the database rejects (a failing statement, a lost connection
  mid-transaction, a full disk) reaches the caller as ``BackendStoreError``,
  writes nothing, and leaves the projections equal to a rebuild (``verify``).
"""

from __future__ import annotations

import re
import secrets
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
import sqlalchemy as sa
from celery import Celery, states
from celery.exceptions import BackendStoreError

from ledger.api import Ledger
from ledger.events import ChordStarted
from ledger.rebuild import verify
from ledger.store import engine as database
from ledger.store.schema import events
from tests.faults.conftest import forget_engine

#: PostgreSQL's Sync message (extended query protocol): a pipeline's implicit commit.
SYNC = b"S\x00\x00\x00\x04"

RESULTS = 2000
#: the worker's log lines of a retried store: the ledger's own attempts (ledger/api.py)
#: and Celery's retry loop (result_backend_always_retry) once those are used up
LEDGER_RETRIED = re.compile(r"ledger write failed \(\w+\); retry \d+/\d+")
CELERY_RETRIED = re.compile(r"Failed operation _store_result\. Retrying \d+ more times\.")
WAIT = 180  # hang guard for the whole run, not a timing assertion

#: Celery's own retry settings: enough to outlast a restart of a few seconds.
RETRYING = {
    "result_backend_always_retry": True,
    "result_backend_max_retries": 40,
    "result_backend_base_sleep_between_retries_ms": 50,
    "result_backend_max_sleep_between_retries_ms": 1000,
}


def _libpq(url: str) -> str:
    return database.normalize_url(url).set(drivername="postgresql").render_as_string(
        hide_password=False)


def _success_counts(url: str) -> tuple[int, int]:
    """(SUCCESS rows in the task-meta projection, SUCCESS events in the log)."""
    with psycopg.connect(_libpq(url), connect_timeout=3) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM ledger_task_meta WHERE status = 'SUCCESS'").fetchone()[0]
        evs = conn.execute(
            "SELECT count(*) FROM ledger_events WHERE task_state = 'SUCCESS'").fetchone()[0]
    return rows, evs


def _stored_so_far(url: str) -> int | None:
    try:
        return _success_counts(url)[0]
    except psycopg.OperationalError:
        return None  # the server is down right now


def _store_2000_with_faults(workers, backend_url: str, direct_url: str, inject) -> dict:
    """Send RESULTS tasks to a real worker; ``inject(stored)`` injects faults as they land."""
    w = workers(f"ledger+{backend_url}", dict(RETRYING))
    worker = w.start(concurrency=3)
    app = w.client(f"ledger+{direct_url}")
    assert app.tasks["workerapp.ping"].delay().get(timeout=60) == "pong"
    echo = app.tasks["faults.echo"]
    ids = [echo.delay(i).id for i in range(RESULTS)]
    deadline = time.monotonic() + WAIT
    stored = 0
    while stored < RESULTS + 1 and time.monotonic() < deadline:
        now = _stored_so_far(direct_url)
        stored = stored if now is None else now
        inject(stored)
        if stored >= RESULTS + 1:  # the ping counts too
            break
        time.sleep(0.1)
    assert worker.poll() is None, "the worker died"
    # still serving after the faults
    assert app.tasks["workerapp.add"].delay(20, 22).get(timeout=60) == 42
    return {"app": app, "ids": ids, "log": w.log_text()}


def _assert_each_stored_exactly_once(url: str, app: Celery, ids: list[str]) -> None:
    ledger = Ledger.open(url)
    with ledger.engine.connect() as conn:
        per_task = dict(conn.execute(
            sa.select(events.c.stream_id, sa.func.count())
            .where(events.c.stream_id.in_([f"task:{t}" for t in ids]),
                   events.c.task_state == states.SUCCESS)
            .group_by(events.c.stream_id)
        ).all())
    missing = [t for t in ids if f"task:{t}" not in per_task]
    twice = {s: n for s, n in per_task.items() if n != 1}
    assert not missing, f"{len(missing)} results lost, e.g. {missing[:3]}"
    assert not twice, f"{len(twice)} results stored more than once, e.g. {list(twice.items())[:3]}"
    metas = ledger.task_metas(ids)
    assert len(metas) == RESULTS
    assert {m.status for m in metas.values()} == {states.SUCCESS}
    # the value too, not just the state
    for i in (0, RESULTS // 2, RESULTS - 1):
        assert app.AsyncResult(ids[i]).get(timeout=10) == i
    assert verify(ledger) == []


def test_2000_results_stored_exactly_once_while_postgres_is_restarted(private_pg, private_url,
                                                                      workers):
    plan = [300, 1200]  # restart when this many results have landed
    restarts = []

    def inject(stored: int) -> None:
        if plan and stored >= plan[0]:
            plan.pop(0)
            private_pg.restart(down_for=2.0, mode="fast")
            restarts.append(stored)

    run = _store_2000_with_faults(workers, private_url, private_url, inject)
    assert len(restarts) == 2, f"the run ended before the faults: {restarts}"
    _assert_each_stored_exactly_once(private_url, run["app"], run["ids"])
    # the backend logged what happened and retried: the ledger's attempts, then
    # (2 s down outlasts them) Celery's retry loop
    assert LEDGER_RETRIED.search(run["log"]), run["log"][-3000:]
    assert CELERY_RETRIED.search(run["log"]), run["log"][-3000:]
    print(f"\nFAULTS restarts={len(restarts)} results={RESULTS} lost=0")


def test_2000_results_stored_exactly_once_while_every_connection_is_cut(private_url, workers,
                                                                       proxy_to):
    proxy = proxy_to(private_url)
    name = private_url.rsplit("/", 1)[1]
    plan = [("cut", 200), ("cut", 600), ("refuse", 1000), ("cut", 1500)]
    done = []

    def inject(stored: int) -> None:
        if plan and stored >= plan[0][1]:
            kind, _ = plan.pop(0)
            if kind == "cut":
                done.append(("cut", proxy.cut()))
            else:
                proxy.refuse()
                time.sleep(1.5)  # a server that is unreachable for a while
                proxy.resume()
                done.append(("refused", proxy.refused))

    run = _store_2000_with_faults(workers, proxy.url(name), private_url, inject)
    assert len(done) == 4, f"the run ended before the faults: {done}"
    assert proxy.cut_connections > 0
    _assert_each_stored_exactly_once(private_url, run["app"], run["ids"])
    assert LEDGER_RETRIED.search(run["log"]), run["log"][-3000:]
    print(f"\nFAULTS cut_connections={proxy.cut_connections} refused={proxy.refused} "
          f"results={RESULTS} lost=0")


# -- one store at a time, through the backend API ------------------------------------------


def _backend(url: str, **conf) -> Celery:
    app = Celery("faults", backend=f"ledger+{url}", set_as_current=False)
    app.conf.update(conf)
    return app


def _task_events(url: str, task_id: str) -> list[str]:
    return [e.data.status for e in Ledger.open(url).history(task_id)]


def test_a_commit_whose_reply_is_lost_is_retried_without_storing_twice(pg_url, proxy_to):
    proxy = proxy_to(pg_url)
    url = proxy.url(pg_url.rsplit("/", 1)[1])
    backend = _backend(url, **RETRYING).backend
    backend.mark_as_started(warm := str(uuid.uuid4()))  # a pooled connection exists
    celery_retries = []
    backend.on_backend_retryable_error = celery_retries.append
    attempts = backend.ledger.retry.attempts
    # A store is one autocommitted statement (ledger/log.py, append_fused): its
    # reply arrives after the commit. Its row description names the column
    # prior_tx, which no other statement returns: every attempt of the ledger
    # loses its reply (the first one committed, the others found the duplicate),
    # so Celery's retry loop stores the state again, with the same event id.
    proxy.drop_when(b"prior_tx", upstream=False, times=attempts)
    task_id = str(uuid.uuid4())
    backend.mark_as_done(task_id, "once")
    assert proxy.dropped == attempts
    assert len(celery_retries) == 1, "Celery's retry loop did not run"
    assert _task_events(pg_url, task_id) == [states.SUCCESS]
    assert _task_events(pg_url, warm) == [states.STARTED]
    assert verify(Ledger.open(pg_url)) == []
    forget_engine(url)


def test_reads_survive_every_pooled_connection_being_cut(pg_url, proxy_to):
    """get_task_meta (a point read on a pooled driver connection) and the chord
    header read reconnect after a cut, without Celery's retry settings."""
    proxy = proxy_to(pg_url)
    url = proxy.url(pg_url.rsplit("/", 1)[1])
    backend = _backend(url).backend
    ids = [str(uuid.uuid4()) for _ in range(4)]
    for i, t in enumerate(ids):
        backend.mark_as_done(t, i)
    assert [backend.get_task_meta(t)["result"] for t in ids] == [0, 1, 2, 3]
    ledger = Ledger.open(url)
    for _ in range(3):
        # Fill the pool: more idle connections than the ledger's retry attempts,
        # so a read that only discarded its own dead one would run out of tries.
        _fill_pool(ledger, 8)
        assert proxy.cut() >= 8  # every pooled connection is dead now
        assert [backend.get_task_meta(t)["result"] for t in ids] == [0, 1, 2, 3]
        assert backend.get_task_meta(str(uuid.uuid4()))["status"] == states.PENDING
        assert ledger.chord_header(str(uuid.uuid4())) == (None, {})
    assert proxy.cut_connections >= 3
    forget_engine(url)


def _fill_pool(ledger: Ledger, n: int) -> None:
    """Leave ``n`` idle connections in the ledger's pool (n threads hold one at once)."""
    barrier = threading.Barrier(n)

    def hold(_):
        with ledger.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
            barrier.wait(timeout=30)

    with ThreadPoolExecutor(n) as pool:
        list(pool.map(hold, range(n)))


def _poison(url: str, task_id: str) -> None:
    """A trigger that makes the database reject any event of ``task_id``."""
    ledger = Ledger.open(url)
    with ledger.engine.begin() as conn:
        if ledger.engine.dialect.name == "postgresql":
            conn.exec_driver_sql(
                "CREATE FUNCTION faults_reject() RETURNS trigger LANGUAGE plpgsql AS $$ "
                "BEGIN RAISE EXCEPTION 'rejected by the fault test'; END $$")
            conn.exec_driver_sql(
                "CREATE TRIGGER faults_reject BEFORE INSERT ON ledger_events FOR EACH ROW "
                f"WHEN (NEW.stream_id = 'task:{task_id}') EXECUTE FUNCTION faults_reject()")
        else:
            conn.exec_driver_sql(
                "CREATE TRIGGER faults_reject BEFORE INSERT ON ledger_events "
                f"WHEN NEW.stream_id = 'task:{task_id}' "
                "BEGIN SELECT RAISE(ABORT, 'rejected by the fault test'); END")


def test_append_rejected_by_a_failing_statement_is_backend_store_error_and_log_stays_consistent(
        any_url):
    backend = _backend(any_url, **RETRYING).backend
    before = [str(uuid.uuid4()) for _ in range(3)]
    for t in before:
        backend.mark_as_done(t, t)
    poisoned = str(uuid.uuid4())
    backend.mark_as_started(poisoned)
    _poison(any_url, poisoned)
    snapshot = Ledger.open(any_url).snapshot()
    with pytest.raises(BackendStoreError) as raised:
        backend.mark_as_done(poisoned, "never stored")
    assert raised.value.__cause__ is not None
    assert "rejected by the fault test" in str(raised.value.__cause__)
    ledger = Ledger.open(any_url)
    assert _task_events(any_url, poisoned) == [states.STARTED]
    assert ledger.snapshot().differences(snapshot) == []
    assert backend.get_task_meta(poisoned)["status"] == states.STARTED
    assert [backend.get_task_meta(t)["result"] for t in before] == before
    assert verify(ledger) == []
    # the database still takes everything else
    backend.mark_as_done(after := str(uuid.uuid4()), 1)
    assert backend.get_task_meta(after)["result"] == 1


def test_connection_lost_mid_transaction_is_backend_store_error_and_nothing_partly_written(
        pg_url, proxy_to):
    proxy = proxy_to(pg_url)
    url = proxy.url(pg_url.rsplit("/", 1)[1])
    backend = _backend(url, result_backend_always_retry=True, result_backend_max_retries=2,
                       result_backend_base_sleep_between_retries_ms=1,
                       result_backend_max_sleep_between_retries_ms=10).backend
    backend.mark_as_started(task_id := str(uuid.uuid4()))
    snapshot = Ledger.open(pg_url).snapshot()
    # A store is one autocommitted statement: cut it on its way to the server
    # (its Bind message carries the task id) on every attempt.
    proxy.drop_when(task_id.encode(), upstream=True, times=1000)
    with pytest.raises(BackendStoreError) as raised:
        backend.mark_as_done(task_id, "lost")
    attempts = proxy.dropped
    proxy._triggers.clear()
    assert attempts == 3 * 3  # 3 Celery attempts x 3 ledger attempts
    assert database.is_disconnect(raised.value.__cause__.__cause__ or raised.value.__cause__)
    ledger = Ledger.open(pg_url)
    assert _task_events(pg_url, task_id) == [states.STARTED]
    assert ledger.snapshot().differences(snapshot) == []
    assert verify(ledger) == []
    backend.mark_as_done(task_id, "stored later")
    assert backend.get_task_meta(task_id)["result"] == "stored later"
    forget_engine(url)


def test_transaction_cut_before_commit_writes_nothing_of_it(pg_url, proxy_to):
    """A multi-statement unit (a chord part: lock, event, counters, claim) cut before it
    commits. It goes out as one pipeline, an implicit transaction that commits at the
    protocol's Sync message: the bytes carrying that Sync never reach the server."""
    proxy = proxy_to(pg_url)
    url = proxy.url(pg_url.rsplit("/", 1)[1])
    ledger = Ledger.open(url)
    ledger.append([ChordStarted(chord_id="c", size=1)])
    snapshot = Ledger.open(pg_url).snapshot()
    proxy.drop_when(SYNC, upstream=True, times=1000)
    with pytest.raises(sa.exc.DBAPIError) as raised:
        ledger.return_chord_part("c", "p1", states.SUCCESS)
    attempts = proxy.dropped
    proxy._triggers.clear()
    assert attempts == ledger.retry.attempts  # every attempt of the ledger was cut
    assert database.is_disconnect(raised.value)
    direct = Ledger.open(pg_url)
    assert direct.snapshot().differences(snapshot) == []  # no part, no claim, no counter
    assert verify(direct) == []
    assert ledger.return_chord_part("c", "p1", states.SUCCESS) is True  # stored later, fires once
    forget_engine(url)


def test_full_disk_is_backend_store_error_and_log_stays_consistent(private_pg, private_url):
    disk = private_pg.root / f"tiny-{uuid.uuid4().hex[:6]}"  # a path the postgres user can reach
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(disk)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tiny tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        subprocess.run(["chown", "postgres:postgres", str(disk)], check=True)
        name = private_url.rsplit("/", 1)[1]
        private_pg.admin(f"CREATE TABLESPACE faults_tiny LOCATION '{disk}'")
        private_pg.admin("ALTER TABLE ledger_events SET TABLESPACE faults_tiny", database=name)
        backend = _backend(private_url).backend
        stored: list[str] = []
        with pytest.raises(BackendStoreError) as raised:
            for _ in range(10_000):
                t = str(uuid.uuid4())
                backend.mark_as_done(t, secrets.token_urlsafe(60_000))  # incompressible
                stored.append(t)
        assert "space" in str(raised.value.__cause__).lower()
        assert stored, "the disk was full before the first result"
        ledger = Ledger.open(private_url)
        assert len(ledger.task_metas(stored)) == len(stored)
        assert verify(ledger) == []
        print(f"\nFAULTS full-disk after {len(stored)} results, lost=0")
    finally:
        forget_engine(private_url)
        private_pg.admin(f'DROP DATABASE IF EXISTS "{private_url.rsplit("/", 1)[1]}" WITH (FORCE)')
        private_pg.admin("DROP TABLESPACE IF EXISTS faults_tiny")
        subprocess.run(["umount", str(disk)], check=False)
