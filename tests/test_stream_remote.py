"""Remote projections fed from the topic equal the inline projections, and resume exactly."""

from __future__ import annotations

import pytest

from ledger.api import Ledger
from ledger.relay import Relay
from ledger.remote import MemoryStore, RemoteProjection, SqlStore
from ledger.store.base import START
from tests.conftest import PG_SERVER, _new_pg_db, admin
from tests.kafka import kafka, topic  # noqa: F401
from tests.stream_workload import append_in_batches, groups_and_chords, task_lives

pytestmark = pytest.mark.kafka


@pytest.fixture(params=["memory", "sqlite-file", "other-postgresql-db"])
def store(request, tmp_path, pg_template):
    """A target other than the ledger's database."""
    if request.param == "memory":
        yield MemoryStore()
    elif request.param == "sqlite-file":
        yield SqlStore(f"sqlite:///{tmp_path / 'replica.db'}")
    else:
        name = _new_pg_db(pg_template)
        s = SqlStore(f"{PG_SERVER}/{name}")
        yield s
        s.engine.dispose()
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def relay_twice(ledger: Ledger, kafka: str, topic: str) -> None:  # noqa: F811
    """Relay everything, then again from the start: every event is on the topic twice."""
    Relay(ledger, kafka, topic).run(once=True)
    ledger.write(lambda c: ledger.save_checkpoint(c, f"relay:{topic}", START))
    Relay(ledger, kafka, topic).run(once=True)


def test_remote_projection_from_the_topic_equals_the_inline_projection(store, kafka, topic, pg_url):  # noqa: F811
    ledger = Ledger.open(pg_url)
    append_in_batches(ledger, task_lives("r", 300) + groups_and_chords("r"))
    relay_twice(ledger, kafka, topic)

    runner = RemoteProjection(kafka, topic, store)
    runner.run(until_caught_up=True)

    assert runner.duplicates == runner.applied  # the second copy of each event was skipped
    assert ledger.snapshot().differences(store.snapshot()) == []
    assert ledger.snapshot() == store.snapshot()


def test_remote_projection_resumes_from_the_marks_stored_with_its_rows(tmp_path, kafka, topic, pg_url):  # noqa: F811
    ledger = Ledger.open(pg_url)
    append_in_batches(ledger, task_lives("a", 100))
    Relay(ledger, kafka, topic).run(once=True)
    replica = f"sqlite:///{tmp_path / 'replica.db'}"
    first = RemoteProjection(kafka, topic, SqlStore(replica))
    first.run(until_caught_up=True)

    append_in_batches(ledger, task_lives("b", 100) + groups_and_chords("b"))
    Relay(ledger, kafka, topic).run(once=True)
    second = RemoteProjection(kafka, topic, SqlStore(replica))
    second.run(until_caught_up=True)

    assert second.applied == len(ledger.read_from(START, 100_000)) - first.applied
    assert ledger.snapshot().differences(SqlStore(replica).snapshot()) == []
