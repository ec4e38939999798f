"""The consumer helper: typed events, each once, offsets committed only after the handler."""

from __future__ import annotations

import uuid

import pytest
from kafka import KafkaConsumer

from ledger.api import Ledger
from ledger.events import ChordStarted, TaskState
from ledger.relay import Relay
from ledger.store.base import START
from ledger.stream import iter_events
from tests.kafka import kafka, topic  # noqa: F401

pytestmark = pytest.mark.kafka

#: idle seconds that end a read expected to return records: the consumer's group
#: join comes first, which on a loaded machine takes more than a few seconds
#: (each read pays this once after its last record; a bound, not a speed check)
JOINED_AND_DRAINED = 15


def group_consumer(bootstrap: str, topic: str, group: str) -> KafkaConsumer:  # noqa: F811
    c = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
    )
    c.subscribe([topic])
    return c


def test_consumer_helper_yields_typed_events_once_though_relayed_twice(any_url, kafka, topic):  # noqa: F811
    ledger = Ledger.open(any_url)
    ledger.append([TaskState(task_id=f"d{i}", status="SUCCESS") for i in range(30)])
    Relay(ledger, kafka, topic).run(once=True)
    ledger.write(lambda c: ledger.save_checkpoint(c, f"relay:{topic}", START))
    Relay(ledger, kafka, topic).run(once=True)  # every event is on the topic twice

    c = group_consumer(kafka, topic, f"g-{uuid.uuid4().hex[:6]}")
    got = list(iter_events(c, idle_timeout=JOINED_AND_DRAINED))
    c.close()

    assert sorted(e.event_id for e in got) == sorted(e.event_id for e in ledger.read_from(START))
    assert all(isinstance(e.data, TaskState) and e.data.status == "SUCCESS" for e in got)


def test_offsets_are_committed_only_after_the_handler_returned(sqlite_url, kafka, topic):  # noqa: F811
    ledger = Ledger.open(sqlite_url)
    ledger.append([TaskState(task_id=f"h{i}", status="STARTED") for i in range(10)])
    Relay(ledger, kafka, topic).run(once=True)
    group = f"g-{uuid.uuid4().hex[:6]}"

    c = group_consumer(kafka, topic, group)
    handled = []
    with pytest.raises(RuntimeError, match="handler failed"):
        for event in iter_events(c, idle_timeout=JOINED_AND_DRAINED):
            if len(handled) == 5:
                failed_on = event.event_id
                raise RuntimeError("handler failed")
            handled.append(event.event_id)
    c.close()

    c = group_consumer(kafka, topic, group)
    again = [e.event_id for e in iter_events(c, idle_timeout=JOINED_AND_DRAINED)]
    c.close()
    # Nothing of the failed poll was committed: it all comes again, nothing is lost.
    assert set(again) | set(handled) == {e.event_id for e in ledger.read_from(START)}
    assert failed_on in again
    c = group_consumer(kafka, topic, group)
    # the same bound: a join slower than the idle timeout would pass this vacuously
    assert list(iter_events(c, idle_timeout=JOINED_AND_DRAINED)) == []  # all committed
    c.close()


def test_a_chords_events_share_its_key_though_its_parts_are_streams_of_their_own(sqlite_url, kafka, topic):  # noqa: F811
    """A returned part is in its own stream (part:<task id>) in the log; on the topic it
    is keyed by its chord's id, as the chord's other events are, so a consumer reads
    a chord's events from one partition, in log order."""
    ledger = Ledger.open(sqlite_url)
    ledger.append([ChordStarted(chord_id="c", size=3)])
    for task_id in ("p1", "p2", "p3"):
        ledger.return_chord_part("c", task_id, "SUCCESS")
    Relay(ledger, kafka, topic).run(once=True)

    c = group_consumer(kafka, topic, f"g-{uuid.uuid4().hex[:6]}")
    records = []
    while batch := c.poll(timeout_ms=JOINED_AND_DRAINED * 1000):
        records += [r for rs in batch.values() for r in rs]
    c.close()

    assert len(records) == 5  # started, 3 parts, the claim
    assert {r.key for r in records} == {b"c"} and len({r.partition for r in records}) == 1
    assert [int(dict(r.headers)["position"]) for r in sorted(records, key=lambda r: r.offset)] == sorted(
        e.position for e in ledger.chord_events("c"))
    assert [e.stream_id for e in ledger.chord_events("c")] == ["chord:c", "part:p1", "part:p2", "part:p3", "chord:c"]
