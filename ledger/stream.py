"""The ledger as a stream: the Kafka record format, the consumer helper, ``relay`` and ``tail``.

Event topic (written by :mod:`ledger.relay`, one record per log event, in follow order):

* key: the stream key (task, group or chord id), UTF-8; a chord's returned part
  (in a ``part:`` stream of its own in the log) is keyed by its chord's id, as
  the chord's other events are. All events of one task, and of one chord, land
  in one partition, so per-task and per-chord order on the topic is log order.
* value: a msgpack map ``{"event_id": str, "type": str, "schema_version": int,
  "position": int, "tx_id": int, "stream_id": str, "stream_version": int,
  "recorded_at": timestamp, "data": map}``. ``data`` is the event payload exactly
  as the log stores it (msgpack of the model in ledger/events.py); timestamps
  are msgpack's timestamp extension (-1), in UTC.
* headers: ``type``, ``event_id``, ``position``, ``tx_id``, ``schema_version``
  (ASCII), to route or filter without decoding the value.

State topic (``relay --state-topic``): key = task id, value = a msgpack map
``{"task_id", "status", "position", "done_at", "data"}`` (the task's latest meta;
``data`` is its ``task.state`` payload), or a null value (a compaction tombstone)
once the task is forgotten or its result expired.

Delivery is at-least-once: a relay that dies between the broker's
acknowledgement and storing its checkpoint sends that batch again.
:func:`iter_events` removes those duplicates by ``event_id``.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import msgpack

from ledger.errors import BadRecord
from ledger.events import ChordPartReturned, RecordedEvent

if TYPE_CHECKING:
    from kafka import KafkaConsumer

    from projections.task_meta import TaskMeta

log = logging.getLogger("ledger.stream")

_ENVELOPE = ("event_id", "type", "schema_version", "position", "tx_id", "stream_id",
             "stream_version", "recorded_at")


def _pack(value: Any) -> bytes:
    # The envelopes hold only str, int, None and aware datetimes: msgpack packs
    # those itself (datetime=True: the timestamp extension, the same bytes as
    # ledger.codec gives) without codec's Python ``default`` hook, ~3x cheaper.
    return msgpack.packb(value, use_bin_type=True, datetime=True)


_DATA_KEY = _pack("data")


def _map_with_data(fields: dict[str, Any], data: bytes) -> bytes:
    # ``data`` already is msgpack: splice it in as the map's last value instead of
    # decoding and re-encoding it. Cheaper, and consumers get the log's exact
    # bytes. A fixmap header is 0x80 | entries (entries <= 15 here).
    head = _pack(fields)
    return b"".join((bytes((0x80 | (len(fields) + 1),)), memoryview(head)[1:], _DATA_KEY, data))


def _split_map(value: bytes, raw_key: str) -> tuple[dict[str, Any], bytes | None]:
    """The inverse of :func:`_map_with_data`: the other fields, and ``raw_key``'s exact bytes."""
    unpacker = msgpack.Unpacker(raw=False, timestamp=3, strict_map_key=False)
    unpacker.feed(value)
    fields: dict[str, Any] = {}
    raw = None
    for _ in range(unpacker.read_map_header()):
        key = unpacker.unpack()
        if key == raw_key:
            start = unpacker.tell()
            unpacker.skip()
            raw = value[start : unpacker.tell()]
        else:
            fields[key] = unpacker.unpack()
    return fields, raw


def event_record(event: RecordedEvent) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """Key, value and headers of ``event``'s record on the event topic (module docstring)."""
    event_id = str(event.event_id)
    value = _map_with_data(
        {
            "event_id": event_id,
            "type": event.type,
            "schema_version": event.schema_version,
            "position": event.position,
            "tx_id": event.tx_id,
            "stream_id": event.stream_id,
            "stream_version": event.stream_version,
            "recorded_at": event.recorded_at,
        },
        event.payload,
    )
    headers = [
        ("type", event.type.encode()),
        ("event_id", event_id.encode()),
        ("position", b"%d" % event.position),
        ("tx_id", b"%d" % event.tx_id),
        ("schema_version", b"%d" % event.schema_version),
    ]
    key = event.data.chord_id if event.type == ChordPartReturned.type else event.stream_key  # type: ignore[attr-defined]
    return key.encode(), value, headers


def decode_event(value: bytes) -> RecordedEvent:
    """The :class:`RecordedEvent` in a record value; raises :class:`BadRecord`."""
    try:
        fields, payload = _split_map(value, "data")
        missing = [k for k in _ENVELOPE if k not in fields]
        if missing or payload is None:
            raise BadRecord(f"record lacks {', '.join(missing) or 'data'}")
        return RecordedEvent(
            position=fields["position"],
            event_id=uuid.UUID(fields["event_id"]),
            stream_id=fields["stream_id"],
            stream_version=fields["stream_version"],
            type=fields["type"],
            schema_version=fields["schema_version"],
            recorded_at=fields["recorded_at"],
            payload=payload,
            tx_id=fields["tx_id"],
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        if isinstance(exc, BadRecord):
            raise
        raise BadRecord(f"not a ledger event record ({type(exc).__name__}: {exc})") from exc


def state_value(meta: TaskMeta | None) -> bytes | None:
    """The state-topic value for a task's latest meta; None (tombstone) when it has none."""
    if meta is None:
        return None
    return _map_with_data(
        {"task_id": meta.task_id, "status": meta.status, "position": meta.position,
         "done_at": meta.done_at},
        meta.payload,
    )


def decode_state(value: bytes | None) -> TaskMeta | None:
    """The task meta in a state-topic value (None for a tombstone)."""
    from projections.task_meta import TaskMeta

    if value is None:
        return None
    fields, payload = _split_map(value, "data")
    if payload is None:
        raise BadRecord("state record lacks data")
    return TaskMeta(payload=payload, **fields)


# -- consumer helper ------------------------------------------------------------------


class RecentIds:
    """The last ``size`` event ids seen (a bounded LRU set) for de-duplication.

    Duplicates come from a relay re-sending a batch it could not checkpoint, so
    they are never further back than a few relay batches; the default keeps
    100,000 ids (about 10 MB).
    """

    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self._ids: OrderedDict[uuid.UUID, None] = OrderedDict()

    def seen(self, event_id: uuid.UUID) -> bool:
        """True if ``event_id`` was seen before; remembers it either way."""
        if event_id in self._ids:
            self._ids.move_to_end(event_id)
            return True
        self._ids[event_id] = None
        if len(self._ids) > self.size:
            self._ids.popitem(last=False)
        return False


def iter_events(
    consumer: KafkaConsumer,
    *,
    dedup: RecentIds | None = None,
    stop: threading.Event | None = None,
    idle_timeout: float | None = None,
    poll_ms: int = 500,
) -> Iterator[RecordedEvent]:
    """Yield the ledger events a subscribed or assigned consumer receives, each once.

    * Typed: each item is a :class:`RecordedEvent`; ``.data`` is its pydantic model.
    * De-duplicated on ``event_id`` (``dedup``, default :class:`RecentIds`).
    * At-least-once: the offsets of a poll's records are committed only when the
      loop asks for the next event after the last of them, i.e. after the
      handler (the loop body) returned for every one. If the body raises, nothing
      of that poll is committed and the records come again. The consumer must
      have ``enable_auto_commit=False``; without a ``group_id`` nothing is committed.
    * Ends when ``stop`` is set or after ``idle_timeout`` seconds without records.
    """
    from kafka.structs import OffsetAndMetadata

    dedup = dedup or RecentIds()
    commits = consumer.config.get("group_id") is not None
    idle = 0.0
    while stop is None or not stop.is_set():
        polled = consumer.poll(timeout_ms=poll_ms)
        if not polled:
            idle += poll_ms / 1000
            if idle_timeout is not None and idle >= idle_timeout:
                return
            continue
        idle = 0.0
        for records in polled.values():
            for record in records:
                try:
                    event = decode_event(record.value)
                except BadRecord as exc:
                    raise BadRecord(
                        f"{record.topic}[{record.partition}]@{record.offset}: {exc}"
                    ) from exc
                if not dedup.seen(event.event_id):
                    yield event
        if commits:
            consumer.commit(
                {tp: OffsetAndMetadata(rs[-1].offset + 1, "", -1) for tp, rs in polled.items()}
            )
