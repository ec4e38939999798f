"""Remote projections: the same folds, fed from the event topic, into another target.

    store = SqlStore("sqlite:///replica.db")          # or MemoryStore()
    RemoteProjection("127.0.0.1:9092", "celery.task-events", store).run(stop=stop)

The runner reads every partition of the topic itself (no consumer group) and
keeps its place *in the target*: per partition, the next Kafka offset and the
follow-order ``(tx_id, position)`` of the last event applied, written in the
same transaction as the projection rows. So a crash never applies an event
twice nor skips one, and a restart resumes exactly.

Duplicates on the topic (a relay re-sending a batch it had not checkpointed)
are recognised without remembering event ids: the relay writes each partition
in follow order, so a record whose ``(tx_id, position)`` is not after the
partition's last applied one was applied already.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ledger.events import RecordedEvent
from ledger.store import store_for, store_type
from ledger.store.engine import engine_for
from ledger.store.schema import LIVE
from ledger.store.schema import metadata as ledger_metadata
from ledger.stream import BadRecord, decode_event
from projections.memory import MemoryTarget, Snapshot


class Mark(NamedTuple):
    """A partition's place: next offset to read, follow order of the last event applied."""

    offset: int
    tx_id: int
    position: int


class Store:
    """A projection target that also stores the partition marks, atomically with the rows."""

    def marks(self, topic: str) -> dict[int, Mark]:
        raise NotImplementedError

    def apply(self, topic: str, partition: int, events: list[RecordedEvent], mark: Mark) -> None:
        """Fold ``events`` in and store ``mark``, all or nothing."""
        raise NotImplementedError

    def snapshot(self) -> Snapshot:
        raise NotImplementedError


class MemoryStore(Store):
    """Folds into memory (:class:`projections.memory.MemoryTarget`)."""

    def __init__(self) -> None:
        self.target = MemoryTarget()
        self._marks: dict[tuple[str, int], Mark] = {}

    def marks(self, topic: str) -> dict[int, Mark]:
        return {p: m for (t, p), m in self._marks.items() if t == topic}

    def apply(self, topic: str, partition: int, events: list[RecordedEvent], mark: Mark) -> None:
        self.target.apply(events)
        self._marks[(topic, partition)] = mark

    def snapshot(self) -> Snapshot:
        return self.target.state


#: The marks table lives in the *target* database only, never in the ledger's.
offsets_metadata = sa.MetaData()
stream_offsets = sa.Table(
    "ledger_stream_offsets",
    offsets_metadata,
    sa.Column("topic", sa.String(249), primary_key=True),
    sa.Column("partition", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("next_offset", sa.BigInteger(), nullable=False),
    sa.Column("tx_id", sa.BigInteger(), nullable=False),
    sa.Column("position", sa.BigInteger(), nullable=False),
)


class SqlStore(Store):
    """Folds into projection tables in another database (SQLite file or PostgreSQL).

    Creates the projection tables and ``ledger_stream_offsets`` there if missing.
    """

    def __init__(self, url: str) -> None:
        self.engine = engine_for(url)
        self.target = store_for(self.engine).target
        ledger_metadata.create_all(self.engine, tables=list(LIVE.all()))
        offsets_metadata.create_all(self.engine)

    def marks(self, topic: str) -> dict[int, Mark]:
        o = stream_offsets
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(o.c.partition, o.c.next_offset, o.c.tx_id, o.c.position).where(
                    o.c.topic == topic
                )
            )
            return {r.partition: Mark(r.next_offset, r.tx_id, r.position) for r in rows}

    def apply(self, topic: str, partition: int, events: list[RecordedEvent], mark: Mark) -> None:
        with self.engine.connect() as conn:
            conn = conn.execution_options(ledger_write=True)
            with conn.begin():
                self.target.apply(conn, events)
                self._save_mark(conn, topic, partition, mark)

    def _save_mark(self, conn: Connection, topic: str, partition: int, mark: Mark) -> None:
        o = stream_offsets
        stmt = store_type(conn).insert(o).values(
            topic=topic, partition=partition, next_offset=mark.offset, tx_id=mark.tx_id,
            position=mark.position,
        )
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[o.c.topic, o.c.partition],
                set_={k: stmt.excluded[k] for k in ("next_offset", "tx_id", "position")},
            )
        )

    def snapshot(self) -> Snapshot:
        with self.engine.connect() as conn:
            return self.target.snapshot(conn)


class RemoteProjection:
    """Applies the event topic to a :class:`Store`, resuming from the marks it stored."""

    def __init__(
        self,
        bootstrap: str | Sequence[str],
        topic: str,
        store: Store,
        *,
        consumer_config: dict[str, Any] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.store = store
        self.consumer_config = consumer_config or {}
        #: Events applied / duplicates skipped by this instance.
        self.applied = 0
        self.duplicates = 0

    def run(
        self,
        *,
        stop: threading.Event | None = None,
        until_caught_up: bool = False,
        poll_ms: int = 500,
    ) -> int:
        """Apply records until ``stop`` is set, or until every partition is read to its end.

        Returns the number of events applied by this call.
        """
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **self.consumer_config,
        )
        start = self.applied
        try:
            parts = consumer.partitions_for_topic(self.topic)
            if not parts:
                raise BadRecord(f"topic {self.topic!r} does not exist")
            marks = self.store.marks(self.topic)
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            for tp in tps:
                if tp.partition in marks:
                    consumer.seek(tp, marks[tp.partition].offset)
                else:
                    consumer.seek_to_beginning(tp)
            while stop is None or not stop.is_set():
                for tp, records in consumer.poll(timeout_ms=poll_ms).items():
                    marks[tp.partition] = self._apply(tp.partition, records, marks.get(tp.partition))
                if until_caught_up and all(
                    consumer.highwater(tp) is not None
                    and consumer.position(tp) >= consumer.highwater(tp)
                    for tp in tps
                ):
                    break
        finally:
            consumer.close()
        return self.applied - start

    def _apply(self, partition: int, records: list, mark: Mark | None) -> Mark:
        events: list[RecordedEvent] = []
        last = (mark.tx_id, mark.position) if mark else (-1, -1)
        for record in records:
            try:
                event = decode_event(record.value)
            except BadRecord as exc:
                raise BadRecord(f"{record.topic}[{record.partition}]@{record.offset}: {exc}") from exc
            if (event.tx_id, event.position) <= last:
                self.duplicates += 1
                continue
            events.append(event)
            last = (event.tx_id, event.position)
        new = Mark(records[-1].offset + 1, *last)
        self.store.apply(self.topic, partition, events, new)
        self.applied += len(events)
        return new
