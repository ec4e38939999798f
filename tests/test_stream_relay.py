"""The Kafka relay: every event on the topic, per-key in log order, through kills and outages."""

from __future__ import annotations

import threading
from collections import defaultdict

import pytest

from ledger.api import Ledger
from ledger.events import TaskState
from ledger.relay import Relay
from ledger.store.base import START
from ledger.stream import RecentIds, decode_event
from tests.kafka import (  # noqa: F401
    create_topic,
    kafka,
    own_broker,
    read_all,
    read_all_with_batches,
    topic,
)
from tests.relay_process import (
    HORIZON_WAIT,
    RelayProcess,
    eventually,
    relay_checkpoint,
    wait_relayed_all,
)
from tests.stream_workload import append_in_batches, groups_and_chords, task_lives

pytestmark = pytest.mark.kafka


def log_in_follow_order(ledger: Ledger):
    """The whole log, once every committed event is visible to followers."""
    head = ledger.read(ledger.log.head)

    def read():
        events = ledger.read_from(START, 1_000_000)
        return events if events and (events[-1].tx_id, events[-1].position) >= head else None

    return eventually(read, HORIZON_WAIT, "the log to be visible in follow order")


def assert_topic_equals_log(ledger: Ledger, records: list) -> None:
    """After de-duplication on event_id: every log event once, each key in log order."""
    log_events = log_in_follow_order(ledger)
    dedup = RecentIds(size=1_000_000)
    on_topic = [e for e in (decode_event(r.value) for r in records) if not dedup.seen(e.event_id)]
    assert sorted(e.event_id for e in on_topic) == sorted(e.event_id for e in log_events)
    by_key_log: dict[str, list] = defaultdict(list)
    for e in log_events:
        by_key_log[e.stream_key].append(e.event_id)
    by_key_topic: dict[str, list] = defaultdict(list)
    for r in records:
        assert r.key == decode_event(r.value).stream_key.encode()
    for e in on_topic:  # records are sorted by (partition, offset); a key has one partition
        by_key_topic[e.stream_key].append(e.event_id)
    assert by_key_topic == by_key_log


def test_ten_thousand_events_relayed_each_once_in_per_key_log_order(any_url, kafka, topic):  # noqa: F811
    ledger = Ledger.open(any_url)
    events = task_lives("k", 4300)[:10_000]
    assert len(events) == 10_000
    append_in_batches(ledger, events, batch=500)

    relayed = Relay(ledger, kafka, topic).run(once=True)

    assert relayed == 10_000
    records = read_all(kafka, topic, expect=10_000)
    assert len(records) == 10_000  # each exactly once: no relay failure happened here
    assert_topic_equals_log(ledger, records)
    by_id = {e.event_id: e for e in log_in_follow_order(ledger)}
    sample = decode_event(records[1234].value)
    assert sample == by_id[sample.event_id]  # envelope and payload bytes round-trip
    headers = dict(records[1234].headers)
    assert headers["type"] == sample.type.encode()
    assert headers["position"] == str(sample.position).encode()
    assert headers["event_id"] == str(sample.event_id).encode()
    assert headers["schema_version"] == b"1"


def test_a_partition_gets_at_most_one_record_batch_per_flush(any_url, kafka):  # noqa: F811
    # A second record batch of one partition in a flush could be delivered after
    # the first one failed, leaving a key's later events without the earlier ones.
    ledger = Ledger.open(any_url)
    one_partition = create_topic(kafka, partitions=1)
    append_in_batches(ledger, task_lives("cut", 150))
    n = len(log_in_follow_order(ledger))
    record_batch = 16_384
    relay = Relay(ledger, kafka, one_partition, producer_config={"batch_size": record_batch})

    assert relay.run(once=True) == n
    records, batches = read_all_with_batches(kafka, one_partition, expect=n)
    wire_bytes = sum(len(r.key) + len(r.value) + sum(len(k) + len(v) for k, v in r.headers)
                     for r in records)
    assert relay.batches > wire_bytes // record_batch  # cut to fit, not one oversized flush
    # the broker holds exactly one record batch per flush of the one partition
    assert len(batches) == relay.batches, sorted(batches)
    assert_topic_equals_log(ledger, records)


def test_relay_once_stores_its_checkpoint_and_a_second_run_sends_nothing(any_url, kafka, topic):  # noqa: F811
    ledger = Ledger.open(any_url)
    append_in_batches(ledger, task_lives("once", 40) + groups_and_chords("once"))
    first = RelayProcess(any_url, kafka, topic, "--once")
    assert first.proc.wait(60) == 0
    n = len(log_in_follow_order(ledger))
    assert f"relayed {n} events" in first.stdout()
    assert relay_checkpoint(ledger, topic).position == max(e.position for e in log_in_follow_order(ledger))

    second = RelayProcess(any_url, kafka, topic, "--once")
    assert second.proc.wait(60) == 0
    assert "relayed 0 events" in second.stdout()
    assert len(read_all(kafka, topic, expect=n)) == n


def start_writer(ledger: Ledger, prefix: str, tasks: int, seed: int) -> threading.Event:
    """Append ``tasks`` task lives in transactions of 20 events from a thread; the
    returned event is set when they are all in."""
    done = threading.Event()

    def writer() -> None:
        events = task_lives(prefix, tasks, seed=seed)
        for i in range(0, len(events), 20):
            ledger.append(events[i : i + 20])
        done.set()

    threading.Thread(target=writer, daemon=True).start()
    return done


def test_relay_killed_mid_stream_and_restarted_loses_nothing(pg_url, kafka, topic):  # noqa: F811
    ledger = Ledger.open(pg_url)
    relay = RelayProcess(pg_url, kafka, topic, "--batch", "50")
    done = start_writer(ledger, "kill", 1200, seed=9)
    eventually(lambda: relay_checkpoint(ledger, topic).position > 0, what="first checkpoint")
    relay.kill()  # SIGKILL: no chance to flush or checkpoint
    killed_at = relay_checkpoint(ledger, topic)

    restarted = RelayProcess(pg_url, kafka, topic, "--batch", "50")
    eventually(done.is_set, 120, "the writer")
    wait_relayed_all(ledger, topic)
    assert restarted.terminate() == 0  # SIGTERM stops it cleanly
    assert restarted.saw(f"from checkpoint {tuple(killed_at)}")

    records = read_all(kafka, topic, expect=len(log_in_follow_order(ledger)))
    assert_topic_equals_log(ledger, records)


def test_ctrl_c_stops_the_relay_after_its_checkpoint_so_nothing_is_sent_twice(pg_url, kafka, topic):  # noqa: F811
    """Ctrl-C raised KeyboardInterrupt wherever the relay was, most often while the
    flush was acknowledged: Kafka had the batch, the checkpoint did not, and the
    next run sent that batch again (one batch duplicated at every Ctrl-C, where
    SIGTERM, which stops after the checkpoint, duplicated none)."""
    import signal

    ledger = Ledger.open(pg_url)
    done = start_writer(ledger, "int", 1500, seed=11)
    for round_ in range(3):  # three Ctrl-Cs while the writer appends
        relay = RelayProcess(pg_url, kafka, topic, "--batch", "37")
        before = relay_checkpoint(ledger, topic)
        eventually(lambda before=before: relay_checkpoint(ledger, topic) > before, what=f"round {round_} relaying")
        relay.proc.send_signal(signal.SIGINT)
        assert relay.proc.wait(30) == 0
        assert f"checkpoint {tuple(relay_checkpoint(ledger, topic))}" in relay.stdout()
    eventually(done.is_set, 120, "the writer")
    last = RelayProcess(pg_url, kafka, topic, "--batch", "37")
    wait_relayed_all(ledger, topic)
    assert last.terminate() == 0
    n = len(log_in_follow_order(ledger))
    records = read_all(kafka, topic, expect=n)
    assert len(records) == n  # no duplicate: each run started where the last one's checkpoint said
    assert_topic_equals_log(ledger, records)


def test_broker_down_relay_backs_off_resumes_and_writers_never_wait(pg_url, own_broker):  # noqa: F811
    ledger = Ledger.open(pg_url)
    topic_name = create_topic(own_broker.bootstrap)
    relay = Relay(ledger, own_broker.bootstrap, topic_name, max_backoff=0.5, poll_interval=0.1)
    stop = threading.Event()
    runner = threading.Thread(target=relay.run, kwargs={"stop": stop}, daemon=True)
    runner.start()
    try:
        append_in_batches(ledger, task_lives("before", 100))
        before_cp = wait_relayed_all(ledger, topic_name)
        before = read_all(own_broker.bootstrap, topic_name)

        own_broker.kill()
        # Writers do not know about Kafka: these appends complete with the broker down.
        append_in_batches(ledger, task_lives("down", 100), batch=10)
        eventually(lambda: relay.kafka_failures >= 2, what="the relay to retry")
        assert relay_checkpoint(ledger, topic_name) == before_cp  # nothing acked, nothing advanced

        own_broker.start()  # same port, empty: Tansu keeps nothing across restarts
        wait_relayed_all(ledger, topic_name)
        after = read_all(own_broker.bootstrap, topic_name)
    finally:
        stop.set()
        runner.join(30)
    down_ids = {e.event_id for e in log_in_follow_order(ledger) if e.stream_key.startswith("down-")}
    assert down_ids <= {decode_event(r.value).event_id for r in after}
    assert_topic_equals_log(ledger, before + after)


@pytest.mark.parametrize("which", ["postgresql", "sqlite"])
def test_two_relays_one_relays_the_other_takes_over_when_it_is_killed(which, request, kafka, topic):  # noqa: F811
    url = request.getfixturevalue("pg_url" if which == "postgresql" else "sqlite_url")
    ledger = Ledger.open(url)
    a = RelayProcess(url, kafka, topic)
    b = RelayProcess(url, kafka, topic)
    eventually(lambda: a.saw("active") or b.saw("active"), what="an active relay")
    active, standby = (a, b) if a.saw("active") else (b, a)
    standby.wait_for("standby")
    assert not standby.saw("active")

    append_in_batches(ledger, task_lives("first", 50))
    wait_relayed_all(ledger, topic)
    active.kill()
    standby.wait_for("active")
    append_in_batches(ledger, task_lives("second", 50))
    wait_relayed_all(ledger, topic)
    assert standby.terminate() == 0

    records = read_all(kafka, topic, expect=len(log_in_follow_order(ledger)))
    assert_topic_equals_log(ledger, records)


def test_relay_writes_nothing_the_log_does_not_have(any_url, kafka, topic):  # noqa: F811
    ledger = Ledger.open(any_url)
    ledger.append([TaskState(task_id="only", status="SUCCESS")])
    assert Relay(ledger, kafka, topic).run(once=True) == 1
    assert Relay(ledger, kafka, topic).run(once=True) == 0
    records = read_all(kafka, topic, expect=1)
    assert [r.key for r in records] == [b"only"]
