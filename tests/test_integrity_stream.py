"""Integrity of the stream with a real Kafka-wire broker (Tansu): nothing the relay
has not sent is pruned, and a corrupt event never stops or poisons the stream.
"""

from __future__ import annotations

import logging
import subprocess
from datetime import datetime, timezone

import sqlalchemy as sa

from ledger.api import Ledger
from ledger.events import TaskState
from ledger.rebuild import prune
from ledger.relay import Relay
from ledger.store.schema import events
from ledger.stream import decode_event
from tests.kafka import SizeLimitedBroker, create_topic, kafka, read_all, topic  # noqa: F401
from tests.test_integrity import CLI, NOT_AN_EVENT, cli, tamper

FAR_FUTURE = datetime(2099, 1, 1, tzinfo=timezone.utc)


def store_tasks(ledger: Ledger, prefix: str, n: int) -> None:
    for i in range(n):
        ledger.append([TaskState(task_id=f"{prefix}-{i}", status="STARTED")])
        ledger.append([TaskState(task_id=f"{prefix}-{i}", status="SUCCESS")])


def test_prune_never_deletes_what_the_relay_has_not_sent(any_url, kafka, topic):  # noqa: F811
    ledger = Ledger.open(any_url)
    store_tasks(ledger, "sent", 10)
    assert Relay(ledger, kafka, topic).run(once=True) == 20
    store_tasks(ledger, "unsent", 10)
    written = {e.event_id for t in range(10) for p in ("sent", "unsent")
               for e in ledger.history(f"{p}-{t}")}

    dry = prune(ledger, FAR_FUTURE, dry_run=True)
    assert dry.dry_run and dry.events_deleted == 10  # the STARTED events already sent
    assert dry.held_by == f"relay:{topic}" and dry.kept_for_followers == 20
    assert {e.event_id for t in range(10) for p in ("sent", "unsent")
            for e in ledger.history(f"{p}-{t}")} == written  # a dry run deletes nothing

    report = prune(ledger, FAR_FUTURE)
    assert report.events_deleted == 10 and report.held_by == f"relay:{topic}"
    assert "stopped short" in "\n".join(report.summary())
    assert Relay(ledger, kafka, topic).run(once=True) == 21  # and the ledger.pruned event
    on_topic = {decode_event(r.value).event_id for r in read_all(kafka, topic, expect=41)}
    assert written <= on_topic and len(on_topic) == 41

    # Once the relay has read everything, the same prune goes all the way.
    report = prune(ledger, FAR_FUTURE)
    assert report.held_by is None and report.events_deleted == 10


def test_an_event_too_large_for_the_producer_is_skipped_and_the_stream_keeps_going(pg_url, kafka, topic, caplog):  # noqa: F811
    """A 10 MB result is stored (ledger_max_payload_bytes is 64 MiB by default), but its
    record is over the producer's 8 MiB max_request_size: kafka-python refused it at
    send, the relay took that for Kafka being down and resent the same batch for ever;
    nothing after it was sent again."""
    from celery import Celery

    backend = Celery("big", backend=f"ledger+{pg_url}", set_as_current=False).backend
    backend.store_result("before", 1, "SUCCESS")
    backend.store_result("huge", "x" * 10_000_000, "SUCCESS")
    backend.store_result("after", 2, "SUCCESS")
    ledger = Ledger.open(pg_url)
    huge = ledger.history("huge")[0].position
    state_topic = create_topic(kafka)
    relay = Relay(ledger, kafka, topic, state_topic=state_topic)
    with caplog.at_level(logging.WARNING, logger="ledger.relay"):
        assert relay.run(once=True) == 2
    assert relay.skipped == 1 and relay.kafka_failures == 0
    assert f"the event at position {huge} is too large to send" in caplog.text
    assert "the state of task huge is too large to send" in caplog.text
    assert sorted(decode_event(r.value).stream_key for r in read_all(kafka, topic, expect=2)) == ["after", "before"]
    assert relay.checkpoint.position == ledger.history("after")[0].position
    states = {r.key.decode() for r in read_all(kafka, state_topic, expect=2)}
    assert states == {"before", "after"}


def test_an_event_the_broker_refuses_as_too_large_is_skipped_and_the_stream_keeps_going(pg_url, caplog):
    """A Kafka broker refuses a record batch over its message.max.bytes (1 MiB by
    default) with MESSAGE_TOO_LARGE: the relay took that for Kafka being down and
    resent the batch for ever. kafka-python then also fails every later send of
    the producer with that error, so a refused record is sent again alone before
    it is skipped, and the small records refused with it are not lost."""
    broker = SizeLimitedBroker(limit=100_000).start()
    try:
        topic, state_topic = create_topic(broker.bootstrap), create_topic(broker.bootstrap)
        ledger = Ledger.open(pg_url)
        store_tasks(ledger, "small", 10)
        ledger.append([TaskState(task_id="big", status="SUCCESS", traceback="x" * 300_000)])
        store_tasks(ledger, "late", 10)
        big = ledger.history("big")[0].position
        relay = Relay(ledger, broker.bootstrap, topic, state_topic=state_topic)
        with caplog.at_level(logging.WARNING, logger="ledger.relay"):
            assert relay.run(once=True) == 40
        assert relay.skipped == 1 and relay.kafka_failures == 0
        assert broker.refused >= 2  # in the batch, then alone
        assert f"the broker refused the event at position {big} as too large" in caplog.text
        assert "the broker refused the state of task big as too large" in caplog.text
        records = [decode_event(r.value) for r in read_all(broker.bootstrap, topic, expect=40)]
        assert {r.event_id for r in ledger.read_from(limit=100)} - {r.event_id for r in records} == {
            ledger.history("big")[0].event_id}
        assert relay.checkpoint.position == max(e.position for e in ledger.read_from(limit=100))
        states = {r.key.decode() for r in read_all(broker.bootstrap, state_topic, expect=20)}
        assert len(states) == 20 and "big" not in states
    finally:
        broker.kill()


def test_corrupt_events_are_skipped_by_rule_and_the_stream_keeps_going(any_url, kafka, topic, caplog):  # noqa: F811
    ledger = Ledger.open(any_url)
    store_tasks(ledger, "c", 5)
    bad = {ledger.history("c-1")[0].position: b"\xc1\xff not msgpack",
           ledger.history("c-3")[1].position: NOT_AN_EVENT}
    tamper(any_url, *(sa.update(events).where(events.c.position == p).values(payload=v)
                      for p, v in bad.items()))
    state_topic = create_topic(kafka)
    relay = Relay(ledger, kafka, topic, state_topic=state_topic)
    with caplog.at_level(logging.WARNING, logger="ledger.relay"):
        assert relay.run(once=True) == 8
    assert relay.skipped == 2
    for position in bad:
        assert f"corrupt event at log position {position}" in caplog.text
    head = max(e.position for t in range(5) for e in ledger.history(f"c-{t}"))
    assert relay.checkpoint.position == head  # checkpointed past them
    records = [decode_event(r.value) for r in read_all(kafka, topic, expect=8)]
    assert {r.position for r in records}.isdisjoint(bad) and len(records) == 8
    assert all(r.data for r in records)  # every record a consumer reads is a valid event
    states = {r.key.decode(): r.value for r in read_all(kafka, state_topic, expect=5)}
    assert len(states) == 5 and all(states.values())
    # `relay --once` shows no warnings: its one line says what was left off the topic.
    done = cli("relay", "--once", "--bootstrap", kafka, "--topic", create_topic(kafka), "--db", any_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("relayed 8 events to ") and "(2 skipped, not sent: corrupt" in done.stdout

    # tail and tail -f: the corrupt events are shown as such, and what follows them too.
    done = cli("tail", "-n", "100", "--db", any_url)
    assert done.returncode == 0, done.stderr
    corrupt = [line for line in done.stdout.splitlines() if "CORRUPT" in line]
    assert len(corrupt) == 2 and all(str(p) in "".join(corrupt) for p in bad)
    assert done.stdout.strip().splitlines()[-1].endswith("SUCCESS")
    follow = subprocess.Popen([CLI, "tail", "-f", "-n", "100", "--db", any_url],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ledger.append([TaskState(task_id="after-corrupt", status="SUCCESS")])
        seen = []
        for line in follow.stdout:  # bounded by the test timeout
            seen.append(line)
            if "task:after-corrupt" in line:
                break
        assert sum("CORRUPT" in line for line in seen) == 2
    finally:
        follow.terminate()
        follow.wait(30)
