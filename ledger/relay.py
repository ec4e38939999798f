"""The outbox relay: the log, in follow order, to a Kafka topic.

    Relay(ledger, "127.0.0.1:9092", "celery.task-events").run(once=True)

* Reads with :meth:`Ledger.read_from` from the checkpoint named ``relay:<topic>``
  (stored in ``ledger_checkpoints`` beside the log), produces each event (record
  format in ledger/stream.py), flushes once per batch, checks every send's
  acknowledgement, and only then stores the new checkpoint. A crash anywhere
  re-sends at most the unacknowledged or uncheckpointed batch: at-least-once.
  While the broker acknowledges a batch, the next page of the log is read; none
  of it is produced before the whole batch is acknowledged and checkpointed.
* Per-key order: a key's records go to one partition (murmur2 of the key, as
  Kafka's default partitioner), in follow order. A batch gives each partition at
  most one producer batch (it is cut where a partition's share would exceed the
  producer's ``batch_size``), so within a flush nothing can overtake a failed
  record batch of the same partition; and the next batch is only produced once
  this one is acknowledged. A failure therefore never leaves a later event of a
  key on the topic without the earlier ones before it; the resend (from the
  checkpoint) repeats them in order, and consumers drop the repeats by event_id.
* Kafka down: the batch fails, the producer is closed, and the relay waits with
  capped exponential backoff (full jitter) before re-reading from its checkpoint.
  Writers never wait: they do not know the relay exists. ``run(once=True)`` gives
  up after ``once_attempts`` failures in a row (:class:`KafkaUnavailable`).
* One active relay per topic (:class:`ledger.store.base.RelayLock`); others wait on standby and take
  over when the holder dies.
* Follow mode wakes on LISTEN/NOTIFY on PostgreSQL and polls on SQLite.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ledger.api import Ledger
from ledger.errors import CorruptEvent, DeliveryFailed, KafkaUnavailable
from ledger.events import TASK, TOMBSTONE_TYPES, RecordedEvent, TaskState, stream_id
from ledger.store.base import Checkpoint, RelayLock
from ledger.stream import event_record, state_value
from projections import task_meta

log = logging.getLogger("ledger.relay")

TASK_TYPES = TOMBSTONE_TYPES | {TaskState.type}
#: The most events one batch may read and send (``batch_size``): each is held in memory.
MAX_BATCH = 1_000_000
#: The longest ``max_backoff`` taken, in seconds.
MAX_BACKOFF = 3600.0

# A record batch's fixed header (magic v2), and a bound on a record's own framing
# (length, attributes, timestamp and offset deltas, key/value/header lengths).
_BATCH_OVERHEAD = 61
_RECORD_OVERHEAD = 40


#: Kafka's rule for a topic name (kafka-python refuses any other with a ValueError).
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


def check_topic(name: str, what: str = "topic") -> str:
    """``name`` if Kafka takes it as a topic name, else ``ValueError`` naming the rule."""
    if not isinstance(name, str) or not _TOPIC.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"{what} {name!r} is not a Kafka topic name: 1 to 249 of a-z, A-Z, 0-9, '.', '_', '-'"
            " (not '.' or '..')"
        )
    return name


def check_bootstrap(servers: str | Sequence[str]) -> str | Sequence[str]:
    """``servers`` (``HOST[:PORT]``, comma-separated or a list; an IPv6 address in
    brackets when it has a port) if each is one, else ``ValueError`` naming it.
    kafka-python raised a bare ``int()`` error for ``host:abc``, and took an empty
    host or port 99999 only to fail to connect, reported as Kafka being down."""
    for server in servers.split(",") if isinstance(servers, str) else servers:
        text = server.strip()
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            bad = not _ or (rest != "" and not rest.startswith(":"))
            port = rest[1:] if rest else None
        elif text.count(":") == 1:
            host, port = text.split(":")
            bad = False
        else:  # a name, an IPv4 address, or a bare IPv6 address: no port
            host, port, bad = text, None, False
        if bad or not host or any(c.isspace() for c in host) or (
            port is not None and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535)
        ):
            raise ValueError(
                f"bootstrap server {server!r} is not HOST:PORT (a port from 1 to 65535;"
                " an IPv6 address in brackets: [::1]:9092)"
            )
    return servers


def backoff(failures: int, cap: float) -> float:
    """The wait after ``failures`` failures in a row before this one: full jitter up to
    ``0.2 * 2**failures`` seconds, at most ``cap``. The exponent stops growing long
    after the cap is reached (~6 failures for 10 s): ``0.2 * 2**1024`` is past a
    float, and the 1,024th failure in a row (Kafka down for hours) used to raise
    OverflowError here and end the relay."""
    return random.uniform(0, min(cap, 0.2 * 2 ** min(failures, 64)))


def _flush(producer: Any, timeout: float) -> None:
    """``producer.flush(timeout)``, which kafka-python's flush ends early when the broker
    refused a batch as too large (MESSAGE_TOO_LARGE) and it split the batch: the
    flush raises ``UnknownError('Future not done')`` for the batch it split, while
    the halves are still on their way. They are waited for by flushing again."""
    from kafka.errors import UnknownError

    deadline = time.monotonic() + timeout
    while True:
        try:
            return producer.flush(max(0.0, deadline - time.monotonic()))
        except UnknownError as exc:
            if "Future not done" not in str(exc) or time.monotonic() >= deadline:
                raise


class _Refused(DeliveryFailed):
    """The broker refused records of a flush as too large: send them again, each alone."""


class Relay:
    """Relays the ledger's log to ``topic`` (and task states to ``state_topic``)."""

    def __init__(
        self,
        ledger: Ledger,
        bootstrap: str | Sequence[str],
        topic: str,
        *,
        state_topic: str | None = None,
        batch_size: int = 5000,
        max_backoff: float = 10.0,
        poll_interval: float = 0.1,
        producer_config: dict[str, Any] | None = None,
        once_attempts: int = 3,
    ) -> None:
        if type(batch_size) is not int or not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be a whole number from 1 to {MAX_BATCH:,}, not {batch_size!r}")
        if not 0 < max_backoff <= MAX_BACKOFF:  # also refuses NaN
            raise ValueError(f"max_backoff must be more than 0 and at most {MAX_BACKOFF:g} seconds, not {max_backoff!r}")
        check_bootstrap(bootstrap)
        check_topic(topic)
        if state_topic is not None and check_topic(state_topic, "state topic") == topic:
            # Its records (task metas, null tombstones) would be mixed into the event
            # topic for good, and every consumer of events would stop at the first one.
            raise ValueError(f"the state topic must not be the event topic ({topic!r})")
        self.ledger = ledger
        #: ``run(once=True)`` raises :class:`KafkaUnavailable` after this many failures in a row.
        self.once_attempts = once_attempts
        self.bootstrap = bootstrap
        self.topic = topic
        self.state_topic = state_topic
        self.batch_size = batch_size
        self.max_backoff = max_backoff
        self.poll_interval = poll_interval
        self.producer_config = producer_config or {}
        self.name = f"relay:{topic}"
        self.checkpoint: Checkpoint = ledger.load_checkpoint(self.name)
        #: Events acknowledged and checkpointed by this instance.
        self.relayed = 0
        #: Flushes acknowledged and checkpointed by this instance.
        self.batches = 0
        #: Batches Kafka failed to acknowledge (each followed by a backoff and a resend).
        self.kafka_failures = 0
        #: Events skipped (logged with their position, never sent): corrupt ones, those
        #: whose record is over the producer's ``max_request_size``, and those the
        #: broker refused as too large when sent alone.
        self.skipped = 0
        #: Positions of events the broker refused as too large in a flush with other
        #: records: each is sent alone next, to tell a record too large from one failed
        #: with it (:meth:`_produce`).
        self._suspects: set[int] = set()
        self._producer: Any = None
        self._batch_bytes = 0
        self._linger = 0.0
        self._flusher: ThreadPoolExecutor | None = None

    # -- the loop ------------------------------------------------------------------

    def run(self, *, once: bool = False, stop: threading.Event | None = None) -> int:
        """Relay until ``stop`` is set (or, with ``once``, until the log is drained).

        Returns the number of events relayed by this call.
        """
        stop = stop or threading.Event()
        lock = self.ledger.store.relay_lock(self.name)
        start = self.relayed
        if importlib.util.find_spec("crc32c") is None:
            log.warning(
                "relay %s: crc32c is not installed; kafka-python checksums every record "
                "batch in Python, at about half the speed (pip install 'kafka-python[crc32c]')",
                self.topic,
            )
        # Flushes wait here, so that the relay reads its next page meanwhile.
        self._flusher = ThreadPoolExecutor(1, thread_name_prefix="relay-flush")
        try:
            while not stop.is_set():
                if not self._wait_for(lock, stop):
                    break
                # Read now that the lock is ours: another relay may have moved it while
                # this one was on standby. While the lock is held, only this one writes it.
                self.checkpoint = self.ledger.load_checkpoint(self.name)
                log.info("relay %s: active, from checkpoint %s", self.topic, tuple(self.checkpoint))
                if self._relay_while_held(lock, once, stop):
                    break
                log.warning("relay %s: lost the relay lock; back to standby", self.topic)
        finally:
            lock.release()
            self._close_producer()  # a flush still waiting ends with the producer
            self._flusher.shutdown()
        return self.relayed - start

    def _wait_for(self, lock: RelayLock, stop: threading.Event) -> bool:
        announced = False
        while not stop.is_set():
            if lock.try_acquire():
                return True
            if not announced:
                log.info("relay %s: standby, another relay holds the lock", self.topic)
                announced = True
            stop.wait(self.poll_interval)
        return False

    def _relay_while_held(self, lock: RelayLock, once: bool, stop: threading.Event) -> bool:
        """Relay while the lock is ours; True when done (stopped or drained), False if lost."""
        failures = 0
        # --once drains what was committed when it started. On PostgreSQL that may
        # not be visible in follow order yet (an older transaction anywhere on the
        # server is still open), so it waits for it rather than stopping short.
        drain_to = self.ledger.read(self.ledger.log.head) if once else None
        unsent: list[RecordedEvent] = []
        wait = self.poll_interval
        with self.ledger.store.listener() as listener:
            while not stop.is_set():
                if not lock.held():
                    return False
                if not unsent:
                    unsent = self.ledger.read_from(self.checkpoint, self.batch_size)
                if not unsent:
                    if drain_to is not None and self.checkpoint >= drain_to:
                        return True
                    # Notified events may not be visible in follow order yet (see
                    # Ledger.follow): look again soon, backing off to the poll interval.
                    wait = 0.02 if listener.wait(wait) else min(self.poll_interval, wait * 2)
                    continue
                # Events come in runs: after a batch, look again soon and back off to
                # the poll interval while idle. What SQLite (no NOTIFY) needs for a
                # low latency; on PostgreSQL a notification ends the wait anyway.
                wait = 0.01
                try:
                    consumed, sent, acknowledged = self._produce(unsent)
                    # The broker works on the batch meanwhile: read the next page.
                    # Follow order continues after the last event read, sent or not.
                    last_read = unsent[-1]
                    unsent = unsent[consumed:]
                    if len(unsent) < self.batch_size and not stop.is_set():
                        unsent += self.ledger.read_from(
                            Checkpoint(last_read.tx_id, last_read.position),
                            self.batch_size - len(unsent),
                        )
                    batch_end, sent = acknowledged()
                except _Refused as exc:  # not Kafka down: resend from the checkpoint now
                    log.info("relay %s: %s", self.topic, exc)
                    unsent = []
                    continue
                except Exception as exc:  # any Kafka failure: back off, resend from checkpoint
                    from kafka.errors import KafkaError

                    if not isinstance(exc, (KafkaError, DeliveryFailed)):
                        raise
                    self._close_producer()
                    unsent = []
                    delay = backoff(failures, self.max_backoff)
                    failures += 1
                    self.kafka_failures += 1
                    if once and failures >= self.once_attempts:
                        # A drain run (cron, a script) must end; the checkpoint keeps
                        # what was acknowledged, so the next run resends only the rest.
                        raise KafkaUnavailable(
                            f"Kafka at {self.bootstrap} failed {failures} times in a row "
                            f"({type(exc).__name__}: {exc}); relayed {self.relayed} events, "
                            f"checkpoint {tuple(self.checkpoint)}"
                        ) from exc
                    log.warning(
                        "relay %s: Kafka failed (%s: %s); retry %d in %.2fs",
                        self.topic, type(exc).__name__, exc, failures, delay,
                    )
                    stop.wait(delay)
                    continue
                if failures:
                    log.info("relay %s: Kafka is back after %d failed attempts", self.topic, failures)
                    failures = 0
                cp = Checkpoint(batch_end.tx_id, batch_end.position)
                self.ledger.write(lambda c, cp=cp: self.ledger.save_checkpoint(c, self.name, cp))
                self.checkpoint = cp
                self.relayed += sent
                self.batches += 1
                log.debug("relay %s: %d events up to %s", self.topic, sent, tuple(cp))
        return True

    # -- one batch -----------------------------------------------------------------

    def _produce(
        self, events: list[RecordedEvent]
    ) -> tuple[int, int, Callable[[], tuple[RecordedEvent, int]]]:
        """Append a prefix of ``events`` to the producer and start its flush.

        Returns the prefix length, the records sent from it, and a function that
        waits for the flush, checks every record's acknowledgement and returns
        the prefix's last event.

        A corrupt event (its payload is not a valid event) is skipped, by rule:
        logged with its position, counted in ``skipped``, never sent (its bytes
        would make the record unreadable to every consumer), and the checkpoint
        moves past it with the batch, so the relay keeps going. So is an event
        whose record is larger than the producer's ``max_request_size`` (8 MiB;
        the ledger stores up to ``ledger_max_payload_bytes``, 64 MiB by default):
        kafka-python refuses it at ``send``, before anything goes out, and resending
        it would fail for ever -- the relay did that, reporting it as Kafka down,
        and no later event was sent again. Its state-topic record likewise.

        So is an event whose record the broker refuses as too large
        (MESSAGE_TOO_LARGE: a Kafka broker takes record batches up to its
        ``message.max.bytes``, 1 MiB by default, or a topic's
        ``max.message.bytes``). kafka-python splits a refused batch until the
        record is alone, but then fails every later send of that producer with
        the same error, so a failed record may be innocent: the flush counts as
        failed (:class:`_Refused`), the producer is replaced, and the batch is
        sent again at once with each refused event in a flush of its own. Refused
        alone, the event is skipped; taken, it goes on as any other. The batch's
        other records are then on the topic twice, as after any failed flush.

        The function returned gives the batch's last event and the number of
        events the broker took.
        """
        from kafka.errors import MessageSizeTooLargeError, RecordListTooLargeError
        from kafka.partitioner.default import murmur2

        producer = self._producer_or_new()
        partitions = sorted(producer.partitions_for(self.topic))
        # One record batch per partition (module docstring): a partition's share
        # must fit the producer's batch_size, and nothing may go out before the
        # flush, so appending stops well before linger_ms would send a batch early.
        room = self._batch_bytes - _BATCH_OVERHEAD
        deadline = time.monotonic() + self._linger / 2
        filled = dict.fromkeys(partitions, 0)
        #: (future, what it carries): an event's position, or the task id of a state record
        futures: list[tuple[Any, int | str]] = []
        send = producer.send
        topic = self.topic
        consumed = len(events)
        # A suspect (refused in a flush with others) goes in a flush of its own.
        alone = events[0].position in self._suspects
        for i, e in enumerate(events):
            if (alone and i) or (i and e.position in self._suspects):
                consumed = i
                break
            try:
                e.data  # noqa: B018  (validates the payload, as consumers will decode it)
            except CorruptEvent as exc:
                log.warning("relay %s: %s; skipped, not sent", self.topic, exc)
                self.skipped += 1
                continue
            key, value, headers = event_record(e)
            partition = partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]
            size = len(key) + len(value) + _RECORD_OVERHEAD
            for name, data in headers:
                size += len(name) + len(data) + 10
            if filled[partition] and filled[partition] + size > room:
                consumed = i
                break  # the rest goes in the next batch
            if i % 256 == 255 and time.monotonic() > deadline:
                consumed = i
                break
            try:
                future = send(topic, key=key, value=value, headers=headers, partition=partition)
            except MessageSizeTooLargeError as exc:
                log.warning("relay %s: the event at position %d is too large to send (%s); skipped, "
                            "not sent", self.topic, e.position, exc)
                self.skipped += 1
                continue
            filled[partition] += size
            futures.append((future, e.position))
        sent = len(futures)
        batch_end = events[consumed - 1]
        if self.state_topic is not None:
            # The state topic keeps the latest value per key and gets one record per
            # task and batch, so a reordering across a failed batch heals with the
            # resend: it needs no partition accounting.
            for task_id, meta in self._task_states(events[:consumed]).items():
                try:
                    futures.append((send(self.state_topic, key=task_id.encode(), value=state_value(meta)), task_id))
                except MessageSizeTooLargeError as exc:
                    log.warning("relay %s: the state of task %s is too large to send (%s); not sent",
                                self.state_topic, task_id, exc)
        timeout = self.producer_config.get("delivery_timeout_ms", 30_000) / 1000
        flushed = self._flusher.submit(_flush, producer, timeout)

        def acknowledged() -> tuple[RecordedEvent, int]:
            flushed.result()
            refused: list[tuple[int | str, Exception]] = []
            for f, carried in futures:
                if not f.is_done:
                    raise DeliveryFailed("flush returned before every record was acknowledged")
                if f.failed():
                    if not isinstance(f.exception, (MessageSizeTooLargeError, RecordListTooLargeError)):
                        raise f.exception
                    refused.append((carried, f.exception))
            if not refused:
                self._suspects.difference_update(p for _, p in futures[:sent])
                return batch_end, sent
            # kafka-python fails every later send of a producer that had a batch refused
            # (its idempotence state is in error): the next flush gets a new one.
            self._close_producer()
            positions = [p for p, _ in refused if isinstance(p, int)]
            if positions and not alone:
                self._suspects.update(positions)
                raise _Refused(f"the broker refused {len(positions)} record(s) as too large "
                               f"({refused[0][1]}); sending each alone")
            for carried, exc in refused:
                if isinstance(carried, int):
                    self._suspects.discard(carried)
                    log.warning("relay %s: the broker refused the event at position %d as too large "
                                "(%s); skipped, not sent", self.topic, carried, exc)
                else:
                    log.warning("relay %s: the broker refused the state of task %s as too large (%s); "
                                "not sent", self.state_topic, carried, exc)
            self.skipped += len(positions)
            return batch_end, sent - len(positions)

        return consumed, sent, acknowledged

    def _task_states(self, events: list[RecordedEvent]) -> dict[str, task_meta.TaskMeta | None]:
        """Each touched task's meta after its last event in ``events`` (None: forgotten).

        One fold per task over its stream up to that event, all streams read in one
        query per 500 tasks: the state topic keeps the latest value per key, so
        intermediate states are not sent.
        """
        last: dict[str, int] = {}
        for e in events:
            if e.type in TASK_TYPES:
                last[e.stream_key] = e.position

        def read(conn) -> dict[str, task_meta.TaskMeta | None]:
            streams = self.ledger.log.read_streams_until(
                conn, {stream_id(TASK, task_id): position for task_id, position in last.items()}
            )
            states: dict[str, task_meta.TaskMeta | None] = {}
            for task_id in last:
                state = None
                for e in streams[stream_id(TASK, task_id)]:
                    try:
                        state = task_meta.fold(state, e)
                    except CorruptEvent as exc:  # skipped, as on the event topic
                        log.debug("relay %s: state of %s: %s; skipped", self.topic, task_id, exc)
                states[task_id] = state
            return states

        return self.ledger.read(read) if last else {}

    def _producer_or_new(self) -> Any:
        from kafka import KafkaProducer

        if self._producer is None:
            config = {
                "bootstrap_servers": self.bootstrap,
                "acks": "all",
                "enable_idempotence": True,
                # Idempotence also makes kafka-python keep one batch in flight per
                # partition (guarantee_message_order), so a retried batch can never
                # be overtaken by a later one of the same key.
                # Records go out at the relay's flush, never earlier (_produce).
                "linger_ms": 10_000,
                # Kafka's default limit for one record batch (message.max.bytes).
                "batch_size": 1 << 20,
                "max_request_size": 8 << 20,
                "max_block_ms": 5_000,
                "request_timeout_ms": 5_000,
                "delivery_timeout_ms": 15_000,
                "retry_backoff_ms": 200,
                "reconnect_backoff_max_ms": 2_000,
                "client_id": f"celery-ledger-relay-{os.getpid()}",
            }
            if "bootstrap_timeout_ms" in KafkaProducer.DEFAULT_CONFIG:  # kafka-python >= 3
                # Its 30 s default made each attempt at an unreachable broker that long.
                config["bootstrap_timeout_ms"] = config["max_block_ms"]
            config.update(self.producer_config)
            self._producer = KafkaProducer(**config)
            self._batch_bytes = config["batch_size"]
            self._linger = config["linger_ms"] / 1000
        return self._producer

    def _close_producer(self) -> None:
        if self._producer is not None:
            try:
                self._producer.close(timeout=1)
            except Exception as exc:  # closing a broken producer must not hide the real error
                log.debug("closing producer: %s", exc)
            finally:
                self._producer = None

