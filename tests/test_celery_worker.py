"""The backend with a real ``celery worker`` (prefork, 3 processes) and the Redis broker.

One worker per dialect for this module: it runs ``tests.workerapp.tasks`` with
``result_backend = "ledger+<url>"`` against a database made for it, on a queue
and Redis key prefix unique to this run (Redis database 11).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from celery import chain, chord, group, states
from celery.exceptions import ChordError, TaskRevokedError, TimeoutError
from celery.result import ResultSet

from ledger.api import Ledger
from ledger.events import LIFECYCLE_TYPES
from ledger.store.schema import events
from tests.conftest import PG_SERVER, REDIS, RUN_ID, _new_pg_db, admin
from tests.workerapp.tasks import make_app

pytestmark = [pytest.mark.worker]

BROKER = REDIS
ROOT = Path(__file__).resolve().parent.parent
WAIT = 60  # seconds a result may take before the test fails (a hang guard, not a timing check)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db_url(request, tmp_path_factory):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('worker') / 'ledger.db'}"
        Ledger.open(url, upgrade=True)
        yield url
        return
    name = _new_pg_db(request.getfixturevalue("pg_template"))
    yield f"{PG_SERVER}/{name}"
    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def worker(db_url):
    """A real prefork worker; yields the client-side Celery app."""
    with running_worker(db_url) as app:
        yield app


@contextlib.contextmanager
def running_worker(db_url: str, *celery_options: str, extended: bool = True):
    """A ``celery [celery_options] worker`` process (prefork, 3) on its own queue and
    Redis key prefix; yields the client-side app once the worker answered a ping.
    ``extended=False``: both sides with Celery's default ``result_extended = False``."""
    queue = f"ledger-test-{RUN_ID}-{uuid.uuid4().hex[:6]}"
    prefix = f"{queue}:"
    backend = f"ledger+{db_url}"
    env = dict(
        os.environ,
        LEDGER_TEST_BROKER=BROKER,
        LEDGER_TEST_BACKEND=backend,
        LEDGER_TEST_QUEUE=queue,
        LEDGER_TEST_PREFIX=prefix,
        LEDGER_TEST_RESULT_EXTENDED="1" if extended else "0",
        PYTHONPATH=str(ROOT),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", *celery_options, "-A", "tests.workerapp.tasks", "worker",
         "-P", "prefork", "-c", "3", "-Q", queue, "-n", f"{queue}@%h",
         "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "warning"],
        cwd=ROOT, env=env, start_new_session=True,
    )
    app = make_app(BROKER, backend, queue, prefix, extended=extended)
    try:
        assert app.tasks["workerapp.ping"].delay().get(timeout=WAIT) == "pong"
        yield app
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            # A warm shutdown waits for the running tasks: one a failed test left
            # waiting (a gate never opened) kept the worker and its pool child
            # running after the test run, consuming from Redis.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        r = redis.Redis.from_url(BROKER)
        keys = list(r.scan_iter(f"{prefix}*"))
        if keys:
            r.delete(*keys)


def task(app, name):
    return app.tasks[f"workerapp.{name}"]


def history_states(app, task_id):
    """What the backend stored, in order (SENT/RECEIVED: tests/test_lifecycle.py)."""
    return [e.data.status if e.type == "task.state" else e.type
            for e in stored(app, task_id)]


def stored(app, task_id):
    return [e for e in app.backend.ledger.history(task_id) if e.type not in LIFECYCLE_TYPES]


def test_success_is_stored_and_read_back(worker):
    r = task(worker, "add").delay(2, 3)
    assert r.get(timeout=WAIT) == 5
    assert r.state == states.SUCCESS
    assert history_states(worker, r.id) == ["STARTED", "SUCCESS"]


def test_failure_keeps_exception_and_traceback(worker):
    r = task(worker, "fail").delay("bad input")
    with pytest.raises(ValueError, match="bad input"):
        r.get(timeout=WAIT)
    assert r.state == states.FAILURE
    assert isinstance(r.result, ValueError)
    assert "ValueError: bad input" in r.traceback
    assert "raise ValueError(message)" in r.traceback


def test_failure_whose_message_holds_a_lone_surrogate_keeps_its_own_exception(worker):
    # A file name decoded with surrogateescape: neither msgpack nor the databases hold
    # "\udcff", so the worker's store failed and get() raised BackendStoreError instead.
    message = b"cannot parse report-\xff.csv".decode("utf-8", "surrogateescape")
    r = task(worker, "fail").delay(message)
    with pytest.raises(ValueError) as raised:
        r.get(timeout=WAIT)
    assert raised.value.args == (message,)  # the result keeps it exactly
    assert "ValueError: cannot parse report-\\udcff.csv" in r.traceback  # the audit text, escaped
    last = stored(worker, r.id)[-1].data
    assert (last.status, last.exc_type) == (states.FAILURE, "ValueError")
    assert history_states(worker, r.id) == ["STARTED", "FAILURE"]


def test_retry_records_every_attempt(worker):
    r = task(worker, "flaky").delay(f"flaky-{uuid.uuid4()}", 3)
    assert r.get(timeout=WAIT) == "ok on attempt 3"
    # Task.retry() sends the next attempt before RETRY is stored, so another
    # worker process may record STARTED of attempt n+1 -- and even SUCCESS of
    # the last attempt, which is what get() returns on -- before RETRY of
    # attempt n commits. Wait (bounded) for the six events, then check them.
    deadline = time.monotonic() + WAIT
    history = stored(worker, r.id)
    while len(history) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
        history = stored(worker, r.id)
    assert sorted((e.data.retries, e.data.status) for e in history) == [
        (0, "RETRY"), (0, "STARTED"), (1, "RETRY"), (1, "STARTED"), (2, "STARTED"), (2, "SUCCESS")
    ]
    assert r.state == states.SUCCESS


def test_revoked_task_is_revoked(worker):
    r = task(worker, "add").apply_async((1, 1), countdown=3)
    r.revoke()
    with pytest.raises(TaskRevokedError):
        r.get(timeout=WAIT)
    assert r.state == states.REVOKED


def test_get_with_timeout_raises_celery_timeout_error(worker):
    r = task(worker, "sleep").delay(2)
    with pytest.raises(TimeoutError):
        r.get(timeout=0.2)
    assert r.get(timeout=WAIT) == 2


def test_group_results_in_order(worker):
    g = group(task(worker, "add").s(i, i) for i in range(10)).apply_async()
    assert g.get(timeout=WAIT) == [2 * i for i in range(10)]
    g.save()
    restored = worker.GroupResult.restore(g.id)
    assert [r.id for r in restored.results] == [r.id for r in g.results]


def test_chain_passes_results_along(worker):
    add = task(worker, "add")
    r = chain(add.s(1, 2), add.s(3), add.s(4)).apply_async()
    assert r.get(timeout=WAIT) == 10
    assert r.parent.get(timeout=WAIT) == 6


def test_chord_fires_body_once_with_header_results(worker):
    add, tsum = task(worker, "add"), task(worker, "tsum")
    r = chord([add.s(i, i) for i in range(5)], tsum.s()).apply_async()
    assert r.get(timeout=WAIT) == 20
    chord_state = worker.backend.ledger.chord(r.parent.id)
    assert chord_state.returned == chord_state.size == 5
    assert chord_state.fired_position is not None
    assert history_states(worker, r.id) == ["STARTED", "SUCCESS"]


def test_chord_does_not_schedule_chord_unlock(worker):
    add, tsum = task(worker, "add"), task(worker, "tsum")
    sent = []

    def record(sender=None, **kwargs):
        sent.append(sender)

    from celery.signals import before_task_publish

    before_task_publish.connect(record, weak=False)
    try:
        r = chord([add.s(1, 1), add.s(2, 2)], tsum.s()).apply_async()
        assert r.get(timeout=WAIT) == 6
    finally:
        before_task_publish.disconnect(record)
    assert "celery.chord_unlock" not in sent
    assert sent.count("workerapp.add") == 2


def test_chord_with_failing_part_calls_error_path_with_chord_error(worker):
    add, fail, tsum = task(worker, "add"), task(worker, "fail"), task(worker, "tsum")
    prefix = worker.conf.ledger_prefix
    body = tsum.s().on_error(task(worker, "record_error").s())
    r = chord([add.s(1, 1), fail.s("part broke"), add.s(2, 2)], body).apply_async()
    # follow_parents=False: by default get() re-raises the failed header part itself.
    with pytest.raises(ChordError, match="part broke") as raised:
        r.get(timeout=WAIT, follow_parents=False)
    assert "Dependency" in str(raised.value)
    errors = redis.Redis.from_url(BROKER)
    deadline = time.monotonic() + WAIT
    while not errors.lrange(f"{prefix}errors", 0, -1) and time.monotonic() < deadline:
        time.sleep(0.05)
    recorded = [e.decode() for e in errors.lrange(f"{prefix}errors", 0, -1)]
    assert any(e.startswith(r.id) and "ChordError" in e for e in recorded)


def test_nested_chord_and_chain_inside_chord(worker):
    add, tsum = task(worker, "add"), task(worker, "tsum")
    inner = chord([add.s(1, 1), add.s(2, 2)], tsum.s())
    r = chord([inner, add.s(3, 3), chain(add.s(1, 1), add.s(5))], tsum.s()).apply_async()
    assert r.get(timeout=WAIT) == (2 + 4) + 6 + 7


def test_chord_of_200_parts(worker):
    add, tsum = task(worker, "add"), task(worker, "tsum")
    r = chord([add.s(i, i) for i in range(200)], tsum.s()).apply_async()
    assert r.get(timeout=WAIT) == sum(2 * i for i in range(200))
    assert worker.backend.ledger.chord(r.parent.id).returned == 200


def test_add_to_chord_grows_the_header(worker):
    add, grow, tsum = task(worker, "add"), task(worker, "grow"), task(worker, "tsum")
    r = chord([grow.s(1), add.s(2, 2)], tsum.s()).apply_async()
    assert r.get(timeout=WAIT) == 1 + 4 + 101


def test_forget_removes_result_but_keeps_history(worker):
    r = task(worker, "add").delay(4, 4)
    assert r.get(timeout=WAIT) == 8
    r.forget()
    assert worker.AsyncResult(r.id).state == states.PENDING
    assert history_states(worker, r.id) == ["STARTED", "SUCCESS", "task.forgotten"]


def test_result_extended_fields(worker):
    r = task(worker, "add").delay(2, y=5)
    assert r.get(timeout=WAIT) == 7
    meta = worker.backend.get_task_meta(r.id)
    assert meta["name"] == "workerapp.add"
    assert meta["args"] == [2]
    assert meta["kwargs"] == {"y": 5}
    assert meta["worker"].startswith("ledger-test-")
    assert meta["retries"] == 0
    assert meta["queue"] == worker.conf.task_default_queue
    fresh = worker.AsyncResult(r.id)
    assert (fresh.name, fresh.args, fresh.kwargs) == ("workerapp.add", [2], {"y": 5})


def test_custom_state_is_visible_while_running(worker):
    gate = f"gate-{uuid.uuid4()}"
    r = task(worker, "progress").delay(gate)
    deadline = time.monotonic() + WAIT
    while r.state != "PROGRESS" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert r.state == "PROGRESS"
    assert r.info == {"done": 1, "total": 2}
    redis.Redis.from_url(BROKER).set(f"{worker.conf.ledger_prefix}{gate}", 1)
    assert r.get(timeout=WAIT) == "finished"
    assert history_states(worker, r.id) == ["STARTED", "PROGRESS", "SUCCESS"]


def test_get_with_on_message_hands_over_every_state_as_the_redis_backend_does(worker):
    """``get(on_message=cb)`` raised ImproperlyConfigured ("Backend does not support
    on_message callback"), where the Redis backend calls ``cb`` with each state's
    meta: Celery's way of following ``update_state`` progress. The callback opens the
    task's gate when it sees the progress, so the task cannot end before it is seen."""
    gate = f"gate-{uuid.uuid4()}"
    seen = []

    def on_message(meta):
        seen.append((meta["status"], meta["result"], meta["task_id"]))
        if meta["status"] == "PROGRESS":
            redis.Redis.from_url(BROKER).set(f"{worker.conf.ledger_prefix}{gate}", 1)

    r = task(worker, "progress").delay(gate)
    assert r.get(timeout=WAIT, on_message=on_message) == "finished"
    assert [s for s, _, _ in seen] == ["STARTED", "PROGRESS", "SUCCESS"]
    assert seen[1][1] == {"done": 1, "total": 2} and seen[2][1] == "finished"
    assert {t for _, _, t in seen} == {r.id}


def test_on_message_misses_no_state_however_quickly_the_next_overwrites_it(worker):
    """Five states stored one right after another: a reader of the current meta sees
    one or two of them; the log has all five, and on_message gets each, in order."""
    seen = []
    r = task(worker, "steps").delay(5)
    assert r.get(timeout=WAIT, interval=0.5, on_message=lambda m: seen.append((m["status"], m["result"]))) == 5
    assert [status for status, _ in seen] == ["STARTED"] + ["STEP"] * 5 + ["SUCCESS"]
    assert [result for _, result in seen[1:]] == [{"i": i} for i in range(5)] + [5]


def test_join_native_with_on_message_hands_over_each_members_states(worker):
    """``join_native(on_message=cb)`` called ``cb`` for the members' ready states only."""
    gates = {}
    seen = []

    def on_message(meta):
        seen.append((meta["task_id"], meta["status"]))
        if meta["status"] == "PROGRESS":
            redis.Redis.from_url(BROKER).set(f"{worker.conf.ledger_prefix}{gates[meta['task_id']]}", 1)

    results = []
    for _ in range(2):
        gate = f"gate-{uuid.uuid4()}"
        r = task(worker, "progress").delay(gate)
        gates[r.id] = gate
        results.append(r)
    assert ResultSet(results).join_native(timeout=WAIT, on_message=on_message) == ["finished", "finished"]
    for r in results:
        assert [s for t, s in seen if t == r.id] == ["STARTED", "PROGRESS", "SUCCESS"]


def test_redacted_arguments_never_reach_the_log(worker):
    secrets = ["s3cr3t-arg", "s3cr3t-pw", "t0k3n-value"]
    r = task(worker, "login").delay("alice", "realm", secrets[0], password=secrets[1],
                                    token=secrets[2])
    assert r.get(timeout=WAIT) == "alice@realm logged in"
    meta = worker.backend.get_task_meta(r.id)
    assert meta["args"] == ["alice", "realm", "[redacted]"]
    assert meta["kwargs"] == {"password": "[redacted]", "token": "[redacted]"}
    engine = worker.backend.ledger.engine
    with engine.connect() as conn:
        payloads = conn.execute(
            sa.select(events.c.payload).where(events.c.stream_id == f"task:{r.id}")
        ).scalars().all()
        everything = b"".join(conn.execute(sa.select(events.c.payload)).scalars())
    assert len(payloads) == 4  # SENT and RECEIVED, STARTED and SUCCESS
    for secret in secrets:
        assert secret.encode() not in everything
