"""What the ledger refuses reaches Celery as Celery's own errors (issue 14, item 12).

An id over the column limit or None, or a lone surrogate (not encodable as
UTF-8), raised the ledger's InvalidEvent/CodecError or a bare UnicodeEncodeError;
Celery and its users catch ``BackendStoreError``/``BackendGetMetaError``.
"""

from __future__ import annotations

import pytest
from celery import Celery
from celery.exceptions import BackendGetMetaError, BackendStoreError
from celery.result import AsyncResult, GroupResult

from ledger.errors import InvalidEvent


@pytest.fixture
def app(any_url) -> Celery:
    return Celery("refusals", backend=f"ledger+{any_url}", set_as_current=False)


def _group(app: Celery, group_id: str | None) -> GroupResult:
    return GroupResult(group_id, [AsyncResult("member", app=app)], app=app)


STORES = {
    "save_group(None)": (lambda app: app.backend.save_group(None, _group(app, None)), InvalidEvent),
    "forget(256 chars)": (lambda app: app.backend.forget("a" * 256), InvalidEvent),
    "delete_group(256 chars)": (lambda app: app.backend.delete_group("g" * 256), InvalidEvent),
    # An id is checked as the event is built (its field named), before it is encoded.
    "store_result(surrogate)": (lambda app: app.backend.store_result("t\udcff", 1, "SUCCESS"), InvalidEvent),
    "forget(surrogate)": (lambda app: app.backend.forget("t\udcff"), InvalidEvent),
    "save_group(surrogate)": (lambda app: app.backend.save_group("g\udcff", _group(app, "g\udcff")),
                              InvalidEvent),
}


@pytest.mark.parametrize("call", STORES, ids=list(STORES))
def test_a_refused_store_raises_backend_store_error_with_the_cause(app, call):
    store, cause = STORES[call]
    with pytest.raises(BackendStoreError) as raised:
        store(app)
    assert isinstance(raised.value.__cause__, cause)


READS = {
    "get_task_meta(surrogate)": lambda app: app.backend.get_task_meta("t\udcff"),
    "restore_group(surrogate)": lambda app: app.backend.restore_group("g\udcff"),
}


@pytest.mark.parametrize("call", READS, ids=list(READS))
def test_a_refused_read_raises_backend_get_meta_error_with_the_cause(app, call):
    with pytest.raises(BackendGetMetaError) as raised:
        READS[call](app)
    assert isinstance(raised.value.__cause__, UnicodeEncodeError)


def _request(task_id: str, **fields):
    from celery.app.task import Context

    request = {"id": task_id, "task": "shop.charge", "args": [], "kwargs": {}, "hostname": "w@h", "retries": 0,
               "delivery_info": {"routing_key": "celery"}}
    return Context(**{**request, **fields})


COLUMN_VALUES = {
    "name": ({"task": "shop\x00charge"}, "SUCCESS", "field 'name': contains a NUL character"),
    "worker": ({"hostname": "w\x00@h"}, "SUCCESS", "field 'worker': contains a NUL character"),
    "queue": ({"delivery_info": {"routing_key": "q\x00"}}, "SUCCESS", "field 'queue': contains a NUL character"),
    "state": ({}, "CUSTOM\x00", "field 'status': contains a NUL character"),
    "retries": ({"retries": 2**31}, "SUCCESS", "field 'retries': 2147483648 is out of range"),
}


@pytest.mark.parametrize("field", COLUMN_VALUES, ids=list(COLUMN_VALUES))
def test_a_value_no_column_can_hold_is_refused_naming_the_field_and_the_stored_state_stays(app, field):
    """PostgreSQL refused a NUL in a task's name, worker, queue or state, and a retry
    count past 2**31 - 1, with a bare ``DataError`` naming no field (SQLite stored
    them, so the log could not move between the two). Both now refuse it, by name,
    before anything is written."""
    app.conf.result_extended = True
    app.backend.store_result("kept", {"n": 1}, "SUCCESS", request=_request("kept"))
    request_fields, state, message = COLUMN_VALUES[field]
    with pytest.raises(BackendStoreError, match=message) as raised:
        app.backend.store_result("kept", {"n": 2}, state, request=_request("kept", **request_fields))
    assert isinstance(raised.value.__cause__, InvalidEvent)
    meta = app.backend.get_task_meta("kept")
    assert (meta["status"], meta["result"], meta["name"]) == ("SUCCESS", {"n": 1}, "shop.charge")


def test_a_chord_size_no_column_can_hold_is_refused_naming_it(app):
    with pytest.raises(BackendStoreError, match="field 'size': 100000000000000000000 is out of range"):
        app.backend.set_chord_size("chord-1", 10**20)


def test_a_chord_id_no_column_can_hold_is_refused_as_backend_store_error(app):
    # the header group is saved under the chord's id, first
    with pytest.raises(BackendStoreError, match="field 'group_id': contains a NUL character"):
        app.backend.apply_chord(("chord\x00", [AsyncResult("part-1", app=app)]), None)
    with pytest.raises(BackendStoreError, match="field 'chord_id': .*256 characters long"):
        app.backend.set_chord_size("c" * 256, 3)  # refused as the event was built: InvalidEvent, raw
    with pytest.raises(BackendStoreError, match="field 'chord_id': contains a NUL character"):
        app.backend.add_to_chord("chord\x00", AsyncResult("part-2", app=app))
