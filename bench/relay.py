"""Relay rate and end-to-end latency against a Kafka-wire broker (Tansu by default).

    .venv/bin/python -m bench.relay --db postgresql+psycopg://postgres@127.0.0.1/bench_relay

It prints what it measured and keeps it in ``bench/results/relay-<dialect>.json``.
``measure_relay`` and ``measure_latency`` are plain functions for bench/__main__.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import uuid

from bench.kept import keep
from bench.pacing import paced_appends
from ledger.api import Ledger
from ledger.events import TaskState
from ledger.relay import Relay
from ledger.stream import iter_events


def _fill(ledger: Ledger, n: int, prefix: str) -> None:
    for i in range(0, n, 500):
        ledger.append(
            TaskState(task_id=f"{prefix}-{i + k}", status="SUCCESS") for k in range(min(500, n - i))
        )


def measure_relay(url: str, bootstrap: str, n: int = 10_000, topic: str | None = None) -> dict:
    """Append ``n`` events, then relay them with ``--once``: events/s of the relay alone.

    The relay starts at the log's head, so repeated runs on one database each
    relay just their own ``n`` events.
    """
    ledger = Ledger.open(url)
    topic = topic or f"bench-relay-{uuid.uuid4().hex[:8]}"
    # New transactions follow the head in follow order: only this run's events count.
    head = ledger.read(ledger.log.head)
    ledger.write(lambda c: ledger.save_checkpoint(c, f"relay:{topic}", head))
    _fill(ledger, n, f"rate-{uuid.uuid4().hex[:6]}")
    relay = Relay(ledger, bootstrap, topic)
    t0 = time.perf_counter()
    relayed = relay.run(once=True)
    elapsed = time.perf_counter() - t0
    return {"events": relayed, "seconds": round(elapsed, 3), "events_per_s": round(relayed / elapsed)}


def measure_latency(url: str, bootstrap: str, n: int = 500, rate: float = 100.0) -> dict:
    """Append ``n`` single-event transactions at ``rate``/s with a following relay and a
    consumer: time from the append's commit returning to the consumer seeing the event."""
    from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
    from kafka.admin import NewTopic

    ledger = Ledger.open(url)
    topic = f"bench-latency-{uuid.uuid4().hex[:8]}"
    # Created up front: on an empty log the relay sends nothing that would create it.
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, 4, 1)])
    finally:
        admin.close()
    committed: dict[uuid.UUID, float] = {}
    seen: dict[uuid.UUID, float] = {}
    stop = threading.Event()
    # Start from the current end of the log: only this run's events are on the topic
    # and timed (relaying the existing log first would leave the consumer a backlog).
    head = ledger.read(ledger.log.head)
    ledger.write(lambda c: ledger.save_checkpoint(c, f"relay:{topic}", head))
    relay = Relay(ledger, bootstrap, topic, batch_size=500)  # default poll interval, as users run it
    relay_thread = threading.Thread(target=relay.run, kwargs={"stop": stop}, daemon=True)
    relay_thread.start()

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             auto_offset_reset="earliest", fetch_max_wait_ms=10)
    parts = None
    while not parts:
        parts = consumer.partitions_for_topic(topic)
        time.sleep(0.05)
    consumer.assign([TopicPartition(topic, p) for p in parts])

    def consume() -> None:
        for event in iter_events(consumer, stop=stop, poll_ms=50):
            seen[event.event_id] = time.perf_counter()

    consumer_thread = threading.Thread(target=consume, daemon=True)
    consumer_thread.start()
    committed.update((e.event_id, at) for e, at in paced_appends(ledger, n, rate, "lat"))
    deadline = time.monotonic() + 60
    while len(seen.keys() & committed.keys()) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    relay_thread.join(10)
    consumer_thread.join(10)
    consumer.close()
    lat = sorted((seen[k] - committed[k]) * 1000 for k in committed if k in seen)
    return {
        "events": n,
        "received": len(lat),
        "p50_ms": round(statistics.median(lat), 1),
        "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1),
        "max_ms": round(lat[-1], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--bootstrap", help="Kafka bootstrap (default: start Tansu)")
    parser.add_argument("-n", type=int, default=20_000, help="events per rate run")
    parser.add_argument("--runs", type=int, default=3, help="rate runs (the median is reported)")
    parser.add_argument("--latency-events", type=int, default=500)
    parser.add_argument("--latency-rate", type=float, default=100.0, help="appends per second")
    args = parser.parse_args()
    Ledger.open(args.db, upgrade=True)
    broker = None
    if args.bootstrap is None:
        from tests.kafka import Broker

        broker = Broker().start()
        args.bootstrap = broker.bootstrap
    try:
        runs = [measure_relay(args.db, args.bootstrap, args.n) for _ in range(args.runs)] if args.n else []
        rates = [r["events_per_s"] for r in runs]
        latency = (
            measure_latency(args.db, args.bootstrap, args.latency_events, args.latency_rate)
            if args.latency_events
            else None
        )
        measured = {"relay": {"runs": runs, "median_events_per_s": statistics.median(rates)}
                    if runs else None, "latency": latency}
        print(json.dumps(measured, indent=2))
        print("kept in", keep(f"relay-{Ledger.open(args.db).engine.dialect.name}", measured))
    finally:
        if broker is not None:
            broker.kill()


if __name__ == "__main__":
    main()
