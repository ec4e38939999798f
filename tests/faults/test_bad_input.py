"""Bad input is refused with an error naming the problem; nothing stored is lost.

Sizes over ``ledger_max_payload_bytes``, stored exceptions naming a module or a
non-exception type (refused, or rebuilt as a stand-in as Celery does, never
imported), pickle for an app that does not accept it,
odd task ids (long, unicode, quotes, SQL), a corrupt payload row, and database
URLs with passwords in every place a URL could be printed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from celery import Celery, states
from celery.exceptions import BackendGetMetaError, BackendStoreError

from ledger import codec
from ledger.api import Ledger
from ledger.celery import PayloadTooLarge
from ledger.events import Encoded, InvalidEvent, TaskState
from ledger.store.schema import LIVE, events
from tests.conftest import RUN_ID, _new_pg_db, admin
from tests.faults.workers import Workers

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 10_000
ODD_IDS = [
    "x" * 255,
    "задача-✓-🎉-任务",
    "it's \"quoted\" `back`",
    "'; DROP TABLE ledger_events; --",
    "%_\\ LIKE wildcards \\x00?",
    " leading and trailing spaces ",
    "line\nbreak\ttab",
    "task:nested:colons",
]


@pytest.fixture(scope="module")
def worker_db(pg_template):
    name = _new_pg_db(pg_template)
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def worker(worker_db, tmp_path_factory):
    """One real worker for this module, with a small payload limit."""
    w = Workers(f"ledger+{worker_db}", {"ledger_max_payload_bytes": LIMIT},
                tmp_path_factory.mktemp("bad-input"))
    w.start(concurrency=2)
    app = w.client()
    assert app.tasks["workerapp.ping"].delay().get(timeout=60) == "pong"
    yield app
    w.close()


def _backend(url: str, **conf) -> Celery:
    app = Celery("bad-input", backend=f"ledger+{url}", set_as_current=False)
    app.conf.update(conf)
    return app


# -- sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["result", "exception"])
def test_payload_over_the_limit_is_refused_naming_size_and_limit_and_nothing_is_written(
        any_url, kind):
    backend = _backend(any_url, ledger_max_payload_bytes=LIMIT).backend
    task_id = str(uuid.uuid4())
    backend.mark_as_started(task_id)
    with pytest.raises(PayloadTooLarge) as raised:
        if kind == "result":
            backend.mark_as_done(task_id, "x" * (LIMIT + 1))
        else:
            backend.mark_as_failure(task_id, ValueError("x" * (LIMIT + 1)))
    message = str(raised.value)
    assert f"task.state event of task:{task_id}" in message
    assert f"limit (ledger_max_payload_bytes) is {LIMIT} bytes" in message
    size = int(message.split(" is ")[1].split(" bytes")[0])
    assert size > LIMIT
    assert [e.data.status for e in backend.ledger.history(task_id)] == [states.STARTED]
    # under the limit with the rest of the event is stored
    backend.mark_as_done(task_id, "x" * (LIMIT - 500))
    assert backend.get_task_meta(task_id)["result"] == "x" * (LIMIT - 500)


def test_worker_result_over_the_limit_becomes_a_failure_naming_size_and_limit(worker):
    r = worker.tasks["faults.echo"].delay("y" * (LIMIT * 2))
    with pytest.raises(Exception, match=rf"is \d+ bytes encoded; the limit .* is {LIMIT} bytes"):
        r.get(timeout=60)
    assert r.state == states.FAILURE
    history = [e.data.status for e in worker.backend.ledger.history(r.id) if e.type == TaskState.type]
    assert history == [states.STARTED, states.FAILURE]  # no SUCCESS, not even part of one


def _payload_sizes(app, task_id: str) -> list[int]:
    return [len(e.payload) for e in app.backend.ledger.history(task_id)]


def test_worker_args_over_the_limit_are_omitted_and_the_task_still_runs(worker):
    # 200 KB of args with a 10,000-byte limit: every event (STARTED, SUCCESS)
    # carries them with result_extended, so they are what must be bounded.
    r = worker.tasks["faults.length"].delay("a" * 200_000)
    assert r.get(timeout=60) == 200_000
    sizes = _payload_sizes(worker, r.id)  # SENT and RECEIVED carry them too
    assert len(sizes) == 4 and max(sizes) <= LIMIT, sizes
    last = worker.backend.ledger.history(r.id)[-1].data
    assert b"bytes omitted: over ledger_max_payload_bytes" in last.args.data


def test_worker_traceback_over_the_limit_is_cut_and_the_failure_recorded(worker):
    r = worker.tasks["faults.deep"].delay(300)  # a traceback of ~45,000 characters
    with pytest.raises(ValueError, match="deep down"):
        r.get(timeout=60)
    sizes = _payload_sizes(worker, r.id)
    assert max(sizes) <= LIMIT, sizes
    tb = r.traceback
    assert tb.startswith("[traceback cut to its last") and tb.rstrip().endswith("ValueError: deep down")


# -- exceptions and pickle: refused, nothing imported, nothing unpickled ----------------------


def _raw_failure(url: str, result: dict | bytes, content_type: str = "application/json") -> str:
    """A FAILURE event written straight into the log (as an attacker with DB access could)."""
    import json

    task_id = str(uuid.uuid4())
    data = result if isinstance(result, bytes) else json.dumps(result).encode()
    Ledger.open(url).append([TaskState(
        task_id=task_id, status=states.FAILURE,
        result=Encoded(content_type=content_type, content_encoding="utf-8" if content_type
                       == "application/json" else "binary", data=data),
    )])
    return task_id


READER = """
import sys
from celery import Celery
app = Celery("reader", backend="ledger+" + sys.argv[1], set_as_current=False)
before = set(sys.modules)
try:
    app.AsyncResult(sys.argv[2]).get(timeout=10)
except BaseException as exc:
    cls = type(exc)
    print("RAISED", f"{cls.__module__}.{cls.__name__}", [b.__name__ for b in cls.__bases__],
          exc.args)
print("IMPORTED", sorted(set(sys.modules) - before & {"this", "antigravity", "pydoc"}))
"""


def _read_in_fresh_process(url: str, task_id: str) -> str:
    out = subprocess.run([sys.executable, "-c", READER, url, task_id], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    return out.stdout + out.stderr


#: what the payloads would create if anything ran them (per run: runs share /tmp)
PWNED = Path(f"/tmp/pwned-by-ledger-{RUN_ID}")
PWN = [f"touch {PWNED}"]


# What Celery's own exception_to_python does (the ledger adds nothing): a type found
# in a module the reader has already imported must be an exception class, else
# SecurityError; a type it cannot find (no module, or a module not imported) is
# rebuilt as a stand-in Exception subclass of that name carrying the message, as
# Celery does for any exception class the client cannot import. Nothing is imported.
@pytest.mark.parametrize(("exc", "raised"), [
    ({"exc_type": "system", "exc_module": "os", "exc_message": PWN},
     "RAISED celery.exceptions.SecurityError ['CeleryError'] "
     f"(\"Expected an exception class, got os.system with payload {PWN}\",)"),
    ({"exc_type": "dict", "exc_module": "builtins", "exc_message": ["a class"]},
     "RAISED celery.exceptions.SecurityError ['CeleryError'] "
     "(\"Expected an exception class, got builtins.dict with payload ['a class']\",)"),
    ({"exc_type": "os.system", "exc_message": PWN},
     f"RAISED celery.backends.base.os.system ['Exception'] ({PWN[0]!r},)"),
    ({"exc_type": "Zen", "exc_module": "this", "exc_message": ["import me"]},
     "RAISED celery.exceptions.Zen ['Exception'] ('import me',)"),
    ({"exc_type": "Helper", "exc_module": "pydoc", "exc_message": ["import me"]},
     "RAISED celery.exceptions.Helper ['Exception'] ('import me',)"),
], ids=["function-in-imported-module", "non-exception-class", "dotted-type",
        "unimported-module", "class-in-unimported-module"])
def test_stored_exception_is_refused_or_rebuilt_as_a_stand_in_never_imported(
        any_url, exc, raised):
    task_id = _raw_failure(any_url, exc)
    out = _read_in_fresh_process(any_url, task_id)
    ran = PWNED.exists()
    PWNED.unlink(missing_ok=True)
    assert out.splitlines() == [raised, "IMPORTED []"], out
    assert not ran


def test_pickle_payload_is_refused_when_the_app_does_not_accept_pickle(any_url, tmp_path):
    import pickle

    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    task_id = _raw_failure(any_url, pickle.dumps(Boom()), "application/x-python-serialize")
    out = _read_in_fresh_process(any_url, task_id)
    assert "RAISED kombu.exceptions.ContentDisallowed" in out, out
    # the audit commands do not unpickle either
    cli = subprocess.run([sys.executable, "-m", "ledger.cli", "history", task_id, "--db", any_url],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert not marker.exists()


# -- odd task ids --------------------------------------------------------------------------


def test_odd_task_ids_are_stored_and_read_back_verbatim_through_a_real_worker(worker):
    echo = worker.tasks["faults.echo"]
    results = [echo.apply_async((i,), task_id=tid) for i, tid in enumerate(ODD_IDS)]
    assert [r.get(timeout=60) for r in results] == list(range(len(ODD_IDS)))
    ledger = worker.backend.ledger
    for i, tid in enumerate(ODD_IDS):
        assert ledger.task_meta(tid).task_id == tid
        history = ledger.history(tid)  # SENT, RECEIVED, STARTED, SUCCESS
        assert [e.data.task_id for e in history] == [tid] * 4, [e.type for e in history]
        assert worker.AsyncResult(tid).result == i
    with ledger.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(events)).scalar_one() > 0


def test_ids_over_the_column_limit_get_a_clear_error_and_nothing_is_written(any_url):
    backend = _backend(any_url).backend
    long_id = "y" * 256
    # Celery's callers get BackendStoreError; the ledger's API its own InvalidEvent.
    with pytest.raises(BackendStoreError, match="field 'task_id': .*256 characters long; the limit is 255"):
        backend.mark_as_done(long_id, 1)
    with pytest.raises(InvalidEvent, match="field 'chord_id': .*256 characters long; the limit is 255"):
        backend.ledger.return_chord_part(long_id, "t", states.SUCCESS)
    with Ledger.open(any_url).engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(events)).scalar_one() == 0


# -- a corrupt payload row ---------------------------------------------------------------------


def _corrupt_one_of_five(url: str) -> tuple[Celery, list[str], int]:
    backend = _backend(url).backend
    ids = [str(uuid.uuid4()) for _ in range(5)]
    for i, tid in enumerate(ids):
        backend.mark_as_started(tid)
        backend.mark_as_done(tid, i)
    ledger = Ledger.open(url)
    position = ledger.history(ids[2])[-1].position
    with ledger.engine.begin() as conn:
        ledger.store.allow_prune(conn)  # past the log's append-only trigger
        conn.execute(sa.update(events).where(events.c.position == position)
                     .values(payload=b"\xc1\xff not msgpack"))
    return backend, ids, position


def test_corrupt_payload_row_leaves_other_reads_alone_and_verify_reports_it(any_url):
    from ledger.rebuild import verify

    backend, ids, position = _corrupt_one_of_five(any_url)
    assert [backend.get_task_meta(t)["result"] for t in ids if t != ids[2]] == [0, 1, 3, 4]
    problems = verify(Ledger.open(any_url))
    print("\nverify:", problems)
    assert any(ids[2] in p for p in problems), problems
    assert any(f"corrupt event at log position {position}" in p for p in problems), problems


def test_corrupt_payload_row_stops_rebuild_with_a_clear_error(any_url):
    from ledger.rebuild import RebuildError, rebuild

    _, _, position = _corrupt_one_of_five(any_url)
    ledger = Ledger.open(any_url)
    before = ledger.snapshot()
    with pytest.raises(RebuildError, match=rf"position {position}"):
        rebuild(ledger)
    assert ledger.snapshot().differences(before) == []  # the failed rebuild changed nothing


# -- passwords ---------------------------------------------------------------------------------

SECRET = f"pw-{uuid.uuid4().hex[:8]}-s3cret"


@pytest.fixture
def role_with_password(pg_url):
    role = f"faults_pw_{RUN_ID}_{uuid.uuid4().hex[:4]}"
    admin(f"CREATE ROLE \"{role}\" LOGIN SUPERUSER PASSWORD '{SECRET}'")
    yield role
    admin(f'DROP OWNED BY "{role}"')
    admin(f'DROP ROLE "{role}"')


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1\xff not msgpack",
        codec.dumps(["a", "list"]),
        codec.dumps({"task_id": "t", "status": 7}),
        codec.dumps({"task_id": "t", "status": "SUCCESS", "result": "not a map"}),
        codec.dumps({"task_id": "t", "status": "SUCCESS", "result": {"content_type": "application/json"}}),
        codec.dumps({"task_id": "t", "status": "SUCCESS", "surprise": 1}),
    ],
    ids=["not-msgpack", "a-list", "status-not-a-string", "result-not-a-map", "result-without-data",
         "unknown-field"],
)
def test_corrupt_task_meta_row_raises_a_clear_error_and_other_reads_are_fine(any_url, payload):
    # get_task_meta reads the stored map without rebuilding the model (TaskMeta.fields):
    # a row of the wrong shape must still be refused, naming the problem.
    backend = _backend(any_url).backend
    ids = [str(uuid.uuid4()) for _ in range(3)]
    for i, tid in enumerate(ids):
        backend.mark_as_done(tid, i)
    with Ledger.open(any_url).engine.begin() as conn:
        t = LIVE.task_meta
        conn.execute(sa.update(t).where(t.c.task_id == ids[1]).values(payload=payload))
    with pytest.raises(BackendGetMetaError, match="corrupt event at log position .* cannot decode task.state"):
        backend.get_task_meta(ids[1])
    assert [backend.get_task_meta(t)["result"] for t in (ids[0], ids[2])] == [0, 2]


def test_database_passwords_are_never_printed(pg_url, role_with_password, tmp_path, caplog):
    db = pg_url.rsplit("/", 1)[1]
    good = f"postgresql+psycopg://{role_with_password}:{SECRET}@127.0.0.1:5432/{db}"
    unreachable = f"postgresql://{role_with_password}:{SECRET}@127.0.0.1:1/{db}"
    wrong_db = f"postgresql+psycopg://{role_with_password}:{SECRET}@127.0.0.1:5432/no_such_db"
    garbage = f"postgresql+nosuchdriver://{role_with_password}:{SECRET}@127.0.0.1/x"
    printed = []
    for url in (good, unreachable, wrong_db, garbage):
        for argv in (["db", "current"], ["history", "some-task"], ["verify"]):
            out = subprocess.run([sys.executable, "-m", "ledger.cli", *argv, "--db", url],
                                 capture_output=True, text=True, cwd=ROOT, timeout=60)
            printed.append(out.stdout + out.stderr)
    assert any("***" in p for p in printed)  # URLs are shown, masked
    # errors reaching the caller, and what the ledger logs while retrying
    backend = _backend(unreachable, result_backend_always_retry=True,
                       result_backend_max_retries=1,
                       result_backend_base_sleep_between_retries_ms=1).backend
    with pytest.raises(Exception) as raised:
        backend.mark_as_done("t", 1)
    printed += [str(raised.value), repr(raised.value), str(raised.value.__cause__),
                repr(backend.ledger), backend.as_uri(), caplog.text]
    # a real worker whose backend is unreachable: banner, task errors, retries
    w = Workers(f"ledger+{unreachable}", {"result_backend_max_retries": 1}, tmp_path)
    try:
        w.start(concurrency=1)
        r = w.client(f"ledger+{good}").tasks["workerapp.add"].delay(1, 2)
        _wait_for_log(w, r.id)
    finally:
        w.close()
    printed.append(w.log_text())
    leaks = [p for p in printed if SECRET in p]
    assert not leaks, leaks[0][:2000]
    print(f"\nFAULTS password outputs checked={len(printed)} leaks=0")


def _wait_for_log(w: Workers, task_id: str) -> None:
    import time

    deadline = time.monotonic() + 60
    while task_id not in w.log_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert task_id in w.log_text(), w.log_text()[-2000:]
