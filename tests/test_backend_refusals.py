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

from ledger.errors import CodecError, InvalidEvent


@pytest.fixture
def app(any_url) -> Celery:
    return Celery("refusals", backend=f"ledger+{any_url}", set_as_current=False)


def _group(app: Celery, group_id: str | None) -> GroupResult:
    return GroupResult(group_id, [AsyncResult("member", app=app)], app=app)


STORES = {
    "save_group(None)": (lambda app: app.backend.save_group(None, _group(app, None)), InvalidEvent),
    "forget(256 chars)": (lambda app: app.backend.forget("a" * 256), InvalidEvent),
    "delete_group(256 chars)": (lambda app: app.backend.delete_group("g" * 256), InvalidEvent),
    "store_result(surrogate)": (lambda app: app.backend.store_result("t\udcff", 1, "SUCCESS"), CodecError),
    "forget(surrogate)": (lambda app: app.backend.forget("t\udcff"), CodecError),
    "save_group(surrogate)": (lambda app: app.backend.save_group("g\udcff", _group(app, "g\udcff")),
                              CodecError),
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
