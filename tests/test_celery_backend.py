"""The backend API called directly, as Celery's own t/unit/backends tests do (both dialects)."""

from __future__ import annotations

import pickle
import re
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from decimal import Decimal

import psycopg
import pytest
from celery import Celery, states
from celery.app.task import Context
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendGetMetaError, BackendStoreError, SecurityError, TimeoutError
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.serialization import register_json
from kombu.serialization import registry as kombu_registry
from kombu.utils import json as kombu_json

from ledger.celery import LedgerBackend
from ledger.events import Encoded, TaskForgotten, TaskState
from ledger.rebuild import verify
from ledger.redaction import REDACTED, redact
from tests.conftest import REDIS

DEAD_PG = "postgresql+psycopg://postgres:hunter2@127.0.0.1:1/nowhere"


def make_app(url: str, **conf) -> Celery:
    app = Celery("unit", backend=f"ledger+{url}", set_as_current=False)
    app.conf.update(conf)
    return app


def request(task_id: str, **extra) -> Context:
    return Context(id=task_id, task="unit.add", args=[1, 2], kwargs={"z": 3}, hostname="w1@host",
                   retries=0, delivery_info={"routing_key": "celery"}, **extra)


@pytest.fixture
def backend(any_url) -> LedgerBackend:
    return make_app(any_url).backend


def new_id() -> str:
    return str(uuid.uuid4())


def test_selected_by_url_and_pickles_with_its_url(any_url):
    backend = make_app(any_url).backend
    assert isinstance(backend, LedgerBackend)
    clone = pickle.loads(pickle.dumps(backend))
    assert isinstance(clone, LedgerBackend)
    assert clone.url == backend.url


def test_construction_is_cheap_and_uri_hides_the_password():
    backend = make_app(DEAD_PG).backend  # nothing listens on port 1: no connection is made
    assert "hunter2" not in backend.as_uri()
    assert backend.as_uri().startswith("ledger+postgresql+psycopg://postgres:***@")


def test_unknown_task_is_pending_like_redis(backend):
    assert backend.get_task_meta(new_id()) == {"status": states.PENDING, "result": None}


def test_meta_matches_the_redis_backend(any_url):
    app = make_app(any_url, result_extended=True)
    redis_backend = RedisBackend(app=app, url=REDIS)
    for state, value in ((states.SUCCESS, {"a": [1, 2]}), (states.FAILURE, KeyError("k"))):
        tid = new_id()
        req = request(tid, group="g1", parent_id="p1")
        for b in (app.backend, redis_backend):
            b.store_result(tid, value, state, traceback="tb" if state == states.FAILURE else None,
                           request=req)
        ours, theirs = app.backend.get_task_meta(tid), redis_backend.get_task_meta(tid)
        redis_backend.forget(tid)
        assert ours.keys() == theirs.keys()
        for key in ours.keys() - {"date_done", "result"}:
            assert ours[key] == theirs[key], key
        assert type(ours["result"]) is type(theirs["result"])
        assert repr(ours["result"]) == repr(theirs["result"])
        assert ours["date_done"][-6:] == theirs["date_done"][-6:]  # same timezone offset


def test_success_is_sticky(backend):
    tid = new_id()
    backend.mark_as_done(tid, 42)
    backend.mark_as_failure(tid, ValueError("late duplicate"))
    assert backend.get_task_meta(tid)["status"] == states.SUCCESS
    assert backend.get_task_meta(tid)["result"] == 42
    assert [e.data.status for e in backend.ledger.history(tid)] == ["SUCCESS", "FAILURE"]


def test_forget_is_a_tombstone_and_a_later_store_starts_a_new_life(backend):
    tid = new_id()
    backend.mark_as_done(tid, 1)
    backend.forget(tid)
    assert backend.get_task_meta(tid)["status"] == states.PENDING
    assert [e.type for e in backend.ledger.history(tid)] == ["task.state", "task.forgotten"]
    backend.mark_as_started(tid)
    assert backend.get_task_meta(tid)["status"] == states.STARTED


def test_group_save_restore_delete(backend):
    app = backend.app
    gid = new_id()
    members = [app.AsyncResult(new_id()) for _ in range(3)]
    backend.save_group(gid, app.GroupResult(gid, members))
    restored = backend.restore_group(gid, cache=False)
    assert [r.id for r in restored.results] == [r.id for r in members]
    backend.delete_group(gid)
    assert backend.restore_group(gid, cache=False) is None


def test_cleanup_expires_old_results_as_events(any_url):
    app = make_app(any_url, result_expires=3600)
    backend = app.backend
    tid, gid = new_id(), new_id()
    backend.mark_as_done(tid, "old")
    backend.save_group(gid, app.GroupResult(gid, [app.AsyncResult(tid)]))
    backend.cleanup()
    assert backend.get_task_meta(tid)["status"] == states.SUCCESS
    # "never", written as 31,700 years: its cutoff is before the year 1, which was an
    # OverflowError out of celery.backend_cleanup; nothing is that old
    backend.expires = 10**12
    backend.cleanup()
    assert backend.get_task_meta(tid)["status"] == states.SUCCESS

    backend.expires = 0.001
    time.sleep(0.01)  # let the result become older than the (tiny) expiry
    backend.cleanup()
    assert backend.get_task_meta(tid)["status"] == states.PENDING
    assert backend.restore_group(gid, cache=False) is None
    assert [e.type for e in backend.ledger.history(tid)] == ["task.state", "results.expired"]


def test_expiry_spares_a_task_that_started_a_new_life_after_cleanup_read_it(any_url, monkeypatch):
    app = make_app(any_url, result_expires=0.001)
    backend = app.backend
    ledger = backend.ledger
    old, reborn = new_id(), new_id()
    backend.mark_as_done(old, "old")
    backend.mark_as_done(reborn, "first life")
    time.sleep(0.01)  # both are now older than the expiry
    real_append = ledger.append
    landed = []

    def append_after_a_new_life(events):
        # cleanup has read both tasks; before its append the one is forgotten and
        # its id runs again (a new life: SUCCESS would stick without the tombstone)
        if not landed:
            landed.append(real_append([
                TaskForgotten(task_id=reborn), TaskState(task_id=reborn, status=states.STARTED)
            ]))
        return real_append(events)

    monkeypatch.setattr(ledger, "append", append_after_a_new_life)
    backend.cleanup()
    assert landed, "the new life was not injected"
    assert backend.get_task_meta(old)["status"] == states.PENDING  # expired
    assert backend.get_task_meta(reborn)["status"] == states.STARTED  # the new life stays
    assert [e.type for e in ledger.history(reborn)] == ["task.state", "task.forgotten", "task.state"]
    # once the new life is old too, a later cleanup expires it
    monkeypatch.setattr(ledger, "append", real_append)
    backend.mark_as_done(reborn, "second life")
    time.sleep(0.01)
    backend.cleanup()
    assert backend.get_task_meta(reborn)["status"] == states.PENDING
    assert ledger.history(reborn)[-1].type == "results.expired"
    assert verify(ledger) == []


def test_msgpack_results_round_trip(any_url):
    backend = make_app(any_url, result_serializer="msgpack",
                       accept_content=["json", "msgpack"]).backend
    tid = new_id()
    backend.mark_as_done(tid, {"bytes": b"\x00\x01", "n": [1, 2]})
    assert backend.get_task_meta(tid)["result"] == {"bytes": b"\x00\x01", "n": [1, 2]}
    assert backend.ledger.history(tid)[0].data.result.content_type == "application/x-msgpack"


@pytest.mark.parametrize(("serializer", "value", "reader_accepts"), [
    ("pickle", {1, 2, 3}, ["json"]),
    ("json", [1, 2], ["msgpack"]),
], ids=["pickle", "json"])
def test_results_are_read_only_by_apps_that_accept_their_content_type(any_url, serializer, value, reader_accepts):
    writer = make_app(any_url, result_serializer=serializer, accept_content=[serializer, "json"]).backend
    tid = new_id()
    writer.mark_as_done(tid, value)
    assert writer.get_task_meta(tid)["result"] == value
    reader = make_app(any_url, accept_content=reader_accepts).backend
    with pytest.raises(ContentDisallowed):
        reader.get_task_meta(tid)


def test_json_disabled_in_kombu_is_refused_to_an_app_without_an_accept_list(any_url):
    backend = make_app(any_url).backend
    tid = new_id()
    backend.mark_as_done(tid, [1, 2])
    reader = make_app(any_url, accept_content=None, result_accept_content=None).backend
    assert reader.accept is None  # kombu's own rule applies: disabled content types are refused
    kombu_registry.disable("application/json")
    try:
        with pytest.raises(ContentDisallowed):
            reader.get_task_meta(tid)
    finally:
        kombu_registry.enable("application/json")
    assert reader.get_task_meta(tid)["result"] == [1, 2]


def test_json_results_decode_kombus_typed_values(any_url):
    # kombu's JSON encodes these as {"__type__": ..., "__value__": ...} envelopes,
    # which its object hook turns back into the values.
    backend = make_app(any_url).backend
    value = {"at": datetime(2026, 12, 6, 18, 0, tzinfo=timezone.utc), "id": uuid.UUID(int=7),
             "amount": Decimal("1.10"), "raw": b"\x00\xff"}
    tid = new_id()
    backend.mark_as_done(tid, value)
    assert backend.get_task_meta(tid)["result"] == value


def test_an_apps_own_json_decoder_is_used(any_url):
    backend = make_app(any_url).backend
    tid = new_id()
    backend.mark_as_done(tid, {"n": 1})
    kombu_registry.register("json", kombu_json.dumps, lambda data: {"decoded by": "mine"},
                            content_type="application/json", content_encoding="utf-8")
    try:
        assert backend.get_task_meta(tid)["result"] == {"decoded by": "mine"}
    finally:
        register_json()  # kombu's own again
    assert backend.get_task_meta(tid)["result"] == {"n": 1}


def test_a_corrupt_json_result_raises_kombus_decode_error(any_url):
    backend = make_app(any_url).backend
    tid = new_id()
    backend.ledger.append([TaskState(task_id=tid, status=states.SUCCESS, result=Encoded(
        content_type="application/json", content_encoding="utf-8", data=b'{"n": 1'))])
    with pytest.raises(DecodeError):
        backend.get_task_meta(tid)


def test_exception_decoding_refuses_non_exception_types(backend):
    tid = new_id()
    backend.store_result(tid, {"exc_type": "system", "exc_module": "os",
                               "exc_message": ["echo pwned"]}, states.FAILURE)
    with pytest.raises(SecurityError):
        backend.get_task_meta(tid)


def test_exception_decoding_never_imports_a_module(backend):
    assert "this" not in sys.modules
    tid = new_id()
    backend.store_result(tid, {"exc_type": "Zen", "exc_module": "this",
                               "exc_message": ["beautiful"]}, states.FAILURE)
    exc = backend.get_task_meta(tid)["result"]
    assert isinstance(exc, Exception) and type(exc).__name__ == "Zen"
    assert "this" not in sys.modules


def test_failure_summary_is_kept_for_audit(backend):
    tid = new_id()
    backend.mark_as_failure(tid, KeyError("missing"), traceback="Traceback ...")
    event = backend.ledger.history(tid)[0].data
    assert (event.exc_type, event.exc_message, event.traceback) == ("KeyError", "missing",
                                                                     "Traceback ...")


def test_a_failure_whose_text_holds_a_lone_surrogate_is_stored_with_its_own_exception(backend):
    # A file name decoded with surrogateescape: b"report-\xff.csv" -> "report-\udcff.csv".
    # Neither msgpack nor the databases hold a lone surrogate: the failure was refused.
    tid = new_id()
    message = b"cannot parse report-\xff.csv".decode("utf-8", "surrogateescape")
    backend.mark_as_failure(tid, ValueError(message),
                            traceback=f"Traceback ...\nValueError: {message}")
    meta = backend.get_task_meta(tid)
    assert meta["status"] == states.FAILURE
    assert type(meta["result"]) is ValueError and meta["result"].args == (message,)  # exact
    # the audit summary holds the surrogate as its escape, as the CLI shows it
    assert meta["traceback"] == "Traceback ...\nValueError: cannot parse report-\\udcff.csv"
    event = backend.ledger.history(tid)[0].data
    assert (event.exc_type, event.exc_message) == ("ValueError", "cannot parse report-\\udcff.csv")
    [row] = backend.ledger.tasks(exception="ValueError")
    assert row.task_id == tid and row.entry.state == states.FAILURE
    assert verify(backend.ledger) == []


def test_get_timeout_raises_celery_timeout_error(backend):
    with pytest.raises(TimeoutError):
        backend.wait_for(new_id(), timeout=0.2, interval=0.05)


def test_get_many_yields_each_result_when_ready(backend):
    ids = [new_id() for _ in range(3)]
    for i, tid in enumerate(ids):
        backend.mark_as_done(tid, i)
    got = dict(backend.get_many(ids, timeout=5, interval=0.05))
    assert {tid: meta["result"] for tid, meta in got.items()} == dict(zip(ids, range(3), strict=True))


def test_redaction_replaces_named_kwargs_and_positions():
    assert redact(["u", "pw", 3], None, names=(), indexes={1, -1}) == (["u", REDACTED, REDACTED], None)
    assert redact(["u"], None, names=(), indexes={5}) == (["u"], None)
    assert redact(None, {"password": "x", "user": "u"}, names={"password"}) == (
        None, {"password": REDACTED, "user": "u"})


# -- PostgreSQL only: NOTIFY wake-ups and connection loss ---------------------------------


#: generous bound for a NOTIFY to wake get() on a loaded machine (it takes ~0.1 s)
WOKEN_WITHIN = 30


def test_get_is_woken_by_notify_not_by_polling(pg_url, monkeypatch):
    # The safety re-read and the poll interval are both set far beyond the
    # deadline: after its first read finds nothing, the waiter reads again only
    # when a NOTIFY wakes it. The store starts once the waiter is LISTENing and
    # its first read is done, so a fast store cannot be picked up by that first
    # read either. No timer: a slow machine only makes it wait longer, never pass
    # without NOTIFY.
    monkeypatch.setattr("ledger.celery.SAFETY_NET_SECONDS", 600.0)
    backend = make_app(pg_url).backend
    tid = new_id()
    storers: list[threading.Thread] = []

    def store_once() -> None:
        if not storers:
            storers.append(threading.Thread(
                target=lambda: make_app(pg_url).backend.mark_as_done(tid, "woken")))
            storers[0].start()

    read = backend._ready

    def read_then_store(ids, ready_states):
        yield from read(ids, ready_states)
        store_once()

    monkeypatch.setattr(backend, "_ready", read_then_store)
    began = time.monotonic()
    meta = backend.wait_for(tid, timeout=WOKEN_WITHIN, interval=600)
    waited = time.monotonic() - began
    storers[0].join()
    assert meta["result"] == "woken"
    # get_many reads once more when the deadline passes, so without NOTIFY the
    # result still arrives -- but only after the whole deadline.
    assert waited < WOKEN_WITHIN, f"woken only by the read at the deadline ({waited:.1f} s)"


def test_store_survives_a_dropped_connection(pg_url):
    backend = make_app(pg_url).backend
    backend.mark_as_done(new_id(), 1)
    dbname = pg_url.rsplit("/", 1)[1]
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as c:
        c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                  "WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,))
    tid = new_id()
    backend.mark_as_done(tid, 2)
    assert backend.get_task_meta(tid)["result"] == 2


def test_errors_reaching_the_caller_are_backend_errors_with_the_cause():
    backend = make_app(DEAD_PG).backend
    with pytest.raises(BackendStoreError) as stored:
        backend.mark_as_done(new_id(), 1)
    assert stored.value.__cause__ is not None
    assert "hunter2" not in str(stored.value)
    with pytest.raises(BackendGetMetaError):
        backend.get_task_meta(new_id())


def test_always_retry_retries_then_gives_up_with_backend_store_error():
    backend = make_app(DEAD_PG, result_backend_always_retry=True, result_backend_max_retries=2,
                       result_backend_base_sleep_between_retries_ms=1,
                       result_backend_max_sleep_between_retries_ms=5).backend
    attempts = []
    backend.on_backend_retryable_error = attempts.append
    with pytest.raises(BackendStoreError):
        backend.mark_as_done(new_id(), 1)
    assert len(attempts) == 2


def test_ledger_notify_setting_is_checked_and_reaches_the_log(pg_url):
    from celery.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured, match="ledger_notify must be one of 'ready', 'all', not 'some'"):
        make_app(pg_url, ledger_notify="some").backend  # noqa: B018
    assert make_app(pg_url).backend.ledger.log.notify_all is False
    assert make_app(pg_url, ledger_notify="all").backend.ledger.log.notify_all is True


@pytest.mark.parametrize(("key", "value", "message"), [
    ("ledger_track_sent", "maybe", "ledger_track_sent must be True or False, not 'maybe'"),
    ("ledger_track_received", 2, "ledger_track_received must be True or False, not 2"),
    ("ledger_auto_upgrade", [], "ledger_auto_upgrade must be True or False, not []"),
    ("ledger_redact_kwargs", 5, "ledger_redact_kwargs must be a list (or a comma-separated string), not 5"),
    ("ledger_redact_kwargs", ["card", 7], "ledger_redact_kwargs must list names (strings)"),
    ("ledger_redact_args", "0,x", "ledger_redact_args must list argument positions (0, 1, ..., or -1 for the last), not '0,x'"),
    ("ledger_redact_args", [1.5], "ledger_redact_args must list argument positions"),
    ("ledger_max_payload_bytes", "big", "ledger_max_payload_bytes must be a whole number of bytes, at least 1024"),
    ("ledger_max_payload_bytes", -5, "ledger_max_payload_bytes must be a whole number of bytes, at least 1024, not -5"),
    ("ledger_max_payload_bytes", 0, "not 0"),
])
def test_a_bad_ledger_setting_is_improperly_configured_naming_it(sqlite_url, key, value, message):
    """Before, ``bool("no")`` turned tracking on, 'big' was a ValueError from int(),
    -5 refused every store later and an int name list a TypeError."""
    from celery.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured, match=re.escape(message)):
        make_app(sqlite_url, **{key: value}).backend  # noqa: B018


def test_settings_as_strings_mean_what_they_say(sqlite_url):
    """As from a config file or the environment: ``ledger_redact_kwargs = "card"`` was
    ``frozenset("card")``, the names c, a, r and d, and the card went unredacted;
    ``ledger_track_sent = "false"`` was ``bool("false")``, tracking on."""
    backend = make_app(sqlite_url, ledger_redact_kwargs="card, cvv", ledger_redact_args="0,2,-1",
                       ledger_track_sent="false", ledger_track_received="off",
                       ledger_max_payload_bytes="20000").backend
    assert backend.redact_kwargs == frozenset({"card", "cvv"})
    assert backend.redact_args == frozenset({0, 2, -1})  # -1: the last positional
    assert (backend.track_sent, backend.track_received) == (False, False)
    assert backend.max_payload_bytes == 20000
    defaults = make_app(sqlite_url).backend
    assert (defaults.track_sent, defaults.track_received, defaults.redact_kwargs) == (True, True, frozenset())
    assert defaults.max_payload_bytes == 64 * 2**20
    listed = make_app(sqlite_url, ledger_redact_kwargs=("card",), ledger_track_sent=0).backend
    assert (listed.redact_kwargs, listed.track_sent) == (frozenset({"card"}), False)


def test_an_id_with_a_nul_is_no_task_never_read_as_its_prefix(any_url):
    # get_task_meta's point read sends the id below psycopg's cursor (PostgreSQL):
    # as a C string libpq would cut it at the NUL and answer for "<id>". PostgreSQL's
    # text holds no NUL, so no task, group or chord has such an id: PENDING and
    # "no such group", as on Redis -- it was BackendGetMetaError("DataError").
    backend = make_app(any_url).backend
    tid = new_id()
    backend.mark_as_done(tid, "the prefix's result")
    backend.save_group(tid, backend.app.GroupResult(tid, [backend.app.AsyncResult(tid)]))
    other = tid + "\x00-another-task"
    assert backend.get_task_meta(other) == {"status": states.PENDING, "result": None}
    assert backend.app.AsyncResult(other, backend=backend).state == states.PENDING
    assert backend.ledger.task_metas([tid, other]).keys() == {tid}
    assert backend.restore_group(other) is None
    assert backend.ledger.chord_header(other) == (None, {})
    assert backend.get_task_meta(tid)["result"] == "the prefix's result"
    assert backend.restore_group(tid).results[0].id == tid
    if not backend.ledger.store.holds_nul:
        # Below that answer, PostgreSQL's point read itself: the id goes with its
        # length, so the server refuses the NUL rather than reading "<id>".
        import sqlalchemy as sa

        with pytest.raises(sa.exc.DataError, match="0x00"):
            backend.ledger.store.task_meta(other)


def test_get_prepares_its_lookup_again_after_deallocate_all(pg_url):
    from ledger.store.postgres import _KEPT

    backend = make_app(pg_url).backend
    tid = new_id()
    backend.mark_as_done(tid, 7)
    assert backend.get_task_meta(tid)["result"] == 7  # prepared on the kept connection
    engine = backend.ledger.engine
    _KEPT[engine][2].driver_connection.execute("DEALLOCATE ALL")
    assert backend.get_task_meta(tid, cache=False)["result"] == 7
    assert backend.get_task_meta(new_id())["status"] == states.PENDING


def test_a_store_prepares_its_statement_again_after_deallocate_all(pg_url):
    """A lone store runs a statement prepared under the ledger's own name on the
    kept connection (postgres._pipelined): after ``DEALLOCATE ALL`` it is prepared
    again and the result stored once."""
    from ledger.store.postgres import _KEPT

    backend = make_app(pg_url).backend
    backend.mark_as_done(new_id(), 1)  # prepared on the kept connection
    _KEPT[backend.ledger.engine][2].driver_connection.execute("DEALLOCATE ALL")
    tid = new_id()
    backend.mark_as_done(tid, 2)
    assert backend.get_task_meta(tid, cache=False)["result"] == 2
    assert [e.data.status for e in backend.ledger.history(tid)] == ["SUCCESS"]


def test_get_raises_the_failed_header_parts_error_even_when_the_body_is_ready_at_once(
    any_url, monkeypatch
):
    # Celery's chord integration tests (test_error_propagates_to_chord_from_simple):
    # get() on a chord whose header part failed raises that part's error, not the
    # body's ChordError. get() checks the parents once before waiting; here both
    # failures are stored after that check and before the backend's first read, the
    # order a worker stores them in. (Celery's drain loop checks the parents again
    # after each wait, before it hands over a result; so must the backend.)
    from celery.exceptions import ChordError

    app = make_app(any_url)
    backend = app.backend
    part, body = new_id(), new_id()
    header = app.GroupResult(new_id(), [app.AsyncResult(part)])
    result = app.AsyncResult(body, parent=header)
    read = backend.ledger.task_metas
    stored: list[str] = []

    def store_then_read(ids):
        # The waiting loop's one read per pass (b0b8a37 moved it out of _ready, where
        # this hook stored the failures after the read: the test then passed with the
        # parent check after a ready first read removed -- make mutations found it).
        if not stored:
            stored.append(part)
            backend.mark_as_failure(part, KeyError("the part's own error"))
            backend.mark_as_failure(body, ChordError(f"Dependency {part} raised KeyError"))
        return read(ids)

    monkeypatch.setattr(backend.ledger, "task_metas", store_then_read)
    with pytest.raises(KeyError, match="the part's own error"):
        result.get(timeout=30)
    assert stored == [part]
