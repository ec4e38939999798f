"""What a database must do for the ledger, layered by capability (as eventsourcing's
persistence.py): each layer is a small abstract class, each database one module
implementing them (:mod:`ledger.store.postgres`, :mod:`ledger.store.sqlite`).

The log:

* :class:`EventLog` stores events: idempotent append (``event_id`` is unique),
  optimistic concurrency on ``(stream_id, stream_version)``, reading a stream.
* :class:`FollowableLog` also gives followers a total order in which no
  committed event is ever skipped: :meth:`FollowableLog.read_from`.

The store (the log, the projection tables beside it, and what runs on them):

* :class:`Store` appends events and updates the projections in the same
  transaction, and reads them back.
* :class:`FollowableStore` also wakes followers and waiters
  (:meth:`FollowableStore.listener`), keeps their checkpoints in the
  transaction of their work, and lets one relay at a time hold a name.
* :class:`MaintainableStore` also rebuilds projections blue/green, verifies
  them in one snapshot, prunes, migrates under a lock and serves read-only
  sessions.

Everything above this package (:mod:`ledger.api`, :mod:`ledger.rebuild`, ...)
talks to these classes and never names a database.

Why readers never skip an event
-------------------------------
Positions come from a sequence and transactions commit out of order: a reader
that saw position 11 while 10 was still in flight would skip 10 forever. Each
database's log answers it its own way (:class:`ledger.store.sqlite.SQLiteLog`:
writers serialize; :class:`ledger.store.postgres.PostgresLog`: visibility by
transaction id).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, ClassVar, NamedTuple, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ledger.errors import VersionConflict
from ledger.events import (
    CHORD,
    LIFECYCLE_TYPES,
    PART,
    ChordPartReturned,
    NewEvent,
    RecordedEvent,
    encode,
    stream_id,
)
from ledger.store.schema import LIVE, ProjectionTables, checkpoints
from ledger.store.schema import events as events_table
from ledger.store.target import CatalogueFill, SqlTarget


class Checkpoint(NamedTuple):
    """A follower's place in the log: after the event at ``(tx_id, position)``."""

    tx_id: int
    position: int


#: The largest integer both databases bind (a signed 64-bit integer; SQLite's driver
#: raises OverflowError past it): a row count or a log position past it means all.
MAX_SQL_INT = 2**63 - 1

START = Checkpoint(0, 0)


@dataclass(frozen=True)
class EncodedEvent:
    """A :class:`NewEvent` with its payload already encoded (done once, outside retries)."""

    new: NewEvent
    payload: bytes
    columns: dict

    @classmethod
    def of(cls, new: NewEvent) -> EncodedEvent:
        return cls(new=new, payload=encode(new.data), columns=new.data.index_columns())

    def recorded(self, position: int, version: int, recorded_at: datetime, tx_id: int) -> RecordedEvent:
        """This event as the log recorded it."""
        data = self.new.data
        return RecordedEvent(
            position=position,
            event_id=self.new.event_id,
            stream_id=data.stream_id,
            stream_version=version,
            type=data.type,
            schema_version=data.schema_version,
            recorded_at=recorded_at,
            payload=self.payload,
            tx_id=tx_id,
        )

    def params(self) -> dict:
        data = self.new.data
        return {
            "event_id": self.new.event_id,
            "stream_id": data.stream_id,
            "type": data.type,
            "schema_version": data.schema_version,
            "task_state": self.columns.get("task_state"),
            "ref_id": self.columns.get("ref_id"),
            "chord_size": self.columns.get("chord_size"),
            "payload": self.payload,
        }


def commits_relaxed(items: Sequence[EncodedEvent]) -> bool:
    """Whether ``items`` commit without waiting for their flush to disk: a lone SENT or
    RECEIVED does (``synchronous_commit`` off on PostgreSQL, ``synchronous = NORMAL``
    on SQLite, for its own transaction only).

    SENT is on the publisher's ``.delay()`` path and RECEIVED on the worker's
    consumer; neither is a result. The commit is visible at once, in the same
    order, and the next durable commit (the task's STARTED, anyone's store)
    makes it durable too: only the database's host crashing in between (the
    server, an OS crash, a power cut) can lose it, never a publisher's or a
    worker's crash. Several events, a result, a chord's or group's event: a
    durable commit, always.
    """
    return len(items) == 1 and items[0].new.data.type in LIFECYCLE_TYPES


EVENT_COLUMNS = (
    "position, tx_id, event_id, stream_id, stream_version, type, schema_version, "
    "recorded_at, payload"
)
#: SQL types of the append's bind values that are not plain strings or integers.
BIND_TYPES = {
    "event_id": sa.Uuid(),
    "payload": sa.LargeBinary(),
    "recorded_at": events_table.c.recorded_at.type,
}


def row_to_event(row: Any) -> RecordedEvent:
    """A row of :data:`SELECT_EVENTS` (or any row with its columns) as a recorded event."""
    return RecordedEvent(
        position=row.position,
        event_id=row.event_id,
        stream_id=row.stream_id,
        stream_version=row.stream_version,
        type=row.type,
        schema_version=row.schema_version,
        recorded_at=row.recorded_at,
        payload=row.payload,
        tx_id=row.tx_id,
    )


#: The log's columns as :func:`row_to_event` reads them; add ``.where()`` and ``.order_by()``.
SELECT_EVENTS = sa.select(
    *(events_table.c[name.strip()] for name in EVENT_COLUMNS.split(","))
)


class EventLog(ABC):
    """Stores events."""

    table = events_table

    def append(self, conn: Connection, events: Sequence[EncodedEvent]) -> tuple[list[RecordedEvent], list[uuid.UUID]]:
        """Append in order inside the caller's transaction.

        Returns ``(recorded, duplicates)``: events already in the log (same
        ``event_id``) are not written again. Raises :class:`VersionConflict` when an
        ``expected_version`` does not hold, :class:`RetryableConflict` when a
        concurrent appender took the same stream version.
        """
        recorded: list[RecordedEvent] = []
        duplicates: list[uuid.UUID] = []
        for item in events:
            row = self._insert(conn, item)
            if row is None:
                self.explain_no_row(conn, item)
                duplicates.append(item.new.event_id)
            else:
                recorded.append(row)
        return recorded, duplicates

    @abstractmethod
    def _insert(self, conn: Connection, item: EncodedEvent) -> RecordedEvent | None: ...

    def explain_no_row(self, conn: Connection, item: EncodedEvent) -> None:
        """No row came back for ``item``: a duplicate event id (returns) or a failed
        expected version (raises :class:`VersionConflict`)."""
        t = self.table
        exists = conn.execute(
            sa.select(t.c.position).where(t.c.event_id == item.new.event_id)
        ).first()
        if exists is not None:
            return
        actual = self.stream_version(conn, item.new.stream_id)
        raise VersionConflict(item.new.stream_id, item.new.expected_version or 0, actual)

    def stream_version(self, conn: Connection, stream_id: str) -> int:
        t = self.table
        return conn.execute(
            sa.select(sa.func.coalesce(sa.func.max(t.c.stream_version), 0)).where(
                t.c.stream_id == stream_id
            )
        ).scalar_one()

    def read_stream(
        self,
        conn: Connection,
        stream_id: str,
        *,
        until_position: int | None = None,
        until_time: datetime | None = None,
    ) -> list[RecordedEvent]:
        t = self.table
        q = SELECT_EVENTS.where(t.c.stream_id == stream_id)
        if until_position is not None:
            q = q.where(t.c.position <= until_position)
        if until_time is not None:
            q = q.where(t.c.recorded_at <= until_time)
        return [row_to_event(r) for r in conn.execute(q.order_by(t.c.stream_version))]

    def read_chord(self, conn: Connection, chord_id: str) -> list[RecordedEvent]:
        """The chord's stream and its returned parts' events (each in its own
        ``part:`` stream, the chord in ``ref_id``), in log order."""
        t = self.table
        q = SELECT_EVENTS.where(
            sa.or_(
                t.c.stream_id == stream_id(CHORD, chord_id),
                sa.and_(
                    t.c.ref_id == chord_id, t.c.type == ChordPartReturned.type,
                    t.c.stream_id.like(f"{PART}:%"),
                ),
            )
        )
        return [row_to_event(r) for r in conn.execute(q.order_by(t.c.position))]

    def read_streams_until(
        self, conn: Connection, until: dict[str, int], chunk: int = 500
    ) -> dict[str, list[RecordedEvent]]:
        """Several streams at once, each up to its own position (``{stream_id: position}``).

        One query per ``chunk`` streams instead of one per stream, for the relay's
        state topic, which folds every task a batch touched. Measured relaying
        20,000 events with ``--state-topic`` on an analyzed table: 3,645 events/s
        with a query per task, 11,448 with this (the event topic alone: ~25,000).
        """
        t = self.table
        out: dict[str, list[RecordedEvent]] = {stream_id: [] for stream_id in until}
        ids = list(until)
        for i in range(0, len(ids), chunk):
            part = ids[i : i + chunk]
            q = (
                SELECT_EVENTS.where(t.c.stream_id.in_(part), t.c.position <= max(until[s] for s in part))
                .order_by(t.c.stream_id, t.c.stream_version)
            )
            for row in conn.execute(q):
                # Within a stream positions grow with versions: a version is
                # appended only after its predecessor committed.
                if row.position <= until[row.stream_id]:
                    out[row.stream_id].append(row_to_event(row))
        return out

    def read_positions(self, conn: Connection, positions: Sequence[int]) -> list[RecordedEvent]:
        t = self.table
        q = SELECT_EVENTS.where(t.c.position.in_(list(positions))).order_by(t.c.position)
        return [row_to_event(r) for r in conn.execute(q)]


class FollowableLog(EventLog):
    """Also gives followers a total order in which no committed event is skipped."""

    @abstractmethod
    def read_from(self, conn: Connection, after: Checkpoint, limit: int) -> list[RecordedEvent]:
        """Up to ``limit`` committed events after ``after``, in follow order."""

    def checkpoint_of(self, conn: Connection, position: int) -> Checkpoint:
        """The follow-order checkpoint of the event at ``position`` (0 = the start).

        A position with no event (pruned, past the head, or never used) stands for
        the last event before it: following after it is following after that one.
        Taken as ``(0, position)``, it sorted before every event on PostgreSQL,
        where the order is ``(tx_id, position)``, and a follower resuming from a
        pruned position got the whole log again. With no event before it either
        (all pruned), everything left is after it: the start.
        """
        if position <= 0:
            return START
        t = self.table
        row = conn.execute(
            sa.select(t.c.tx_id, t.c.position).where(t.c.position <= position)
            .order_by(t.c.position.desc()).limit(1)
        ).first()
        return START if row is None else Checkpoint(*row)

    def head(self, conn: Connection) -> Checkpoint:
        """The last event in follow order, visible or not yet."""
        t = self.table
        row = conn.execute(
            sa.select(t.c.tx_id, t.c.position).order_by(t.c.tx_id.desc(), t.c.position.desc()).limit(1)
        ).first()
        return Checkpoint(*row) if row else START




# -- wake-ups and relay locks ---------------------------------------------------------


class Listener:
    """Sleeps up to ``timeout`` seconds; this base cannot be woken early.

    A database that can wake followers (PostgreSQL's LISTEN/NOTIFY) subclasses
    it. Notifications are a wake-up only: readers always re-read the log, so a
    missed notification costs at most one ``timeout``.
    """

    #: Whether :meth:`wait` returns early when an append commits.
    wakes: ClassVar[bool] = False

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait(self, timeout: float) -> list[str]:
        """Stream ids notified within ``timeout`` (always none here)."""
        time.sleep(timeout)
        return []

    def close(self) -> None:
        """Release what :meth:`__enter__` took (nothing here)."""


class RelayLock(ABC):
    """At most one holder per name at a time; released when the holder's process dies."""

    @abstractmethod
    def try_acquire(self) -> bool: ...

    @abstractmethod
    def held(self) -> bool:
        """Still ours (checked before each batch)."""

    @abstractmethod
    def release(self) -> None: ...


# -- stores ------------------------------------------------------------------------------


#: What an append did: recorded events, ids already in the log.
Appended = tuple[list[RecordedEvent], list[uuid.UUID]]


class Store(ABC):
    """Stores events with their projections: one transaction for both, and reads."""

    log: EventLog
    #: Execution options of a read that is one statement (consistent on its own).
    single_statement_options: ClassVar[dict[str, Any]] = {}
    #: Whether its text columns can hold a NUL character. Where they cannot, no
    #: stored id or value has one, and the database refuses one in a statement's
    #: parameters: a lookup or filter with a NUL then finds nothing without asking.
    holds_nul: ClassVar[bool] = True
    #: Whether write transactions run one at a time (SQLite's write lock, taken at
    #: BEGIN): a transaction then sees every write committed before it, so a chord
    #: part, its claim and the claim's read can be one transaction.
    writes_serially: ClassVar[bool] = False

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.target = self.target_for(LIVE)

    @staticmethod
    @abstractmethod
    def insert(table: sa.Table) -> Any:
        """An INSERT for ``table`` that has ``on_conflict_do_update``/``on_conflict_do_nothing``."""

    def target_for(self, tables: ProjectionTables, slots: Sequence[str] | None = None) -> SqlTarget:
        """The projection target writing to ``tables`` (only to those of ``slots``, when
        given) with this database's upserts."""
        return SqlTarget(tables, type(self), slots)

    def append(self, conn: Connection, items: Sequence[EncodedEvent]) -> Appended:
        """Append ``items`` and update the projections in the caller's transaction."""
        recorded, duplicates = self.log.append(conn, items)
        self.target.apply(conn, recorded)
        return recorded, duplicates

    def autocommit_append(self, items: Sequence[EncodedEvent]) -> Any:
        """A callable appending ``items`` as their own transaction, returning
        ``(recorded, items that inserted no row)``; None where the general path
        (:meth:`append` in a transaction) is the only one."""
        return None

    def chord_part_write(self, part: EncodedEvent, claim: EncodedEvent, before: EncodedEvent | None = None) -> Any:
        """A callable appending ``before`` (the part's own task state, if given), a
        returned chord ``part`` and, if the chord is then complete and nobody
        claimed its body, the ``claim`` (``chord.fired``), returning ``(part
        recorded, claimed, the chord's inputs as chord_header reads them or
        None)``; None where the general path (in
        :meth:`ledger.api.Ledger.return_chord_part`) is the only one."""
        return None

    def task_meta(self, task_id: str) -> Any:
        """The task's projection row (:class:`projections.task_meta.TaskMeta`) or None."""
        with self.engine.connect() as conn:
            return self.target.task(conn, task_id)

    def chord_header(self, conn: Connection, chord_id: str) -> Any:
        """:meth:`ledger.store.target.SqlTarget.chord_header`, as this database reads it fastest."""
        return self.target.chord_header(conn, chord_id)


class FollowableStore(Store):
    """Also: a total follow order, wake-ups, followers' checkpoints beside the log."""

    log: FollowableLog

    def listener(self) -> Listener:
        """Wake-ups for followers and waiters (enter it before the first read)."""
        return Listener()

    @abstractmethod
    def relay_lock(self, name: str) -> RelayLock:
        """The lock that lets one relay at a time follow the log under ``name``."""

    def save_checkpoint(self, conn: Connection, name: str, cp: Checkpoint) -> None:
        """Store a follower's checkpoint in the caller's transaction."""
        stmt = self.insert(checkpoints).values(
            name=name, tx_id=cp.tx_id, position=cp.position, updated_at=datetime.now(timezone.utc)
        )
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[checkpoints.c.name],
                set_={
                    "tx_id": stmt.excluded.tx_id,
                    "position": stmt.excluded.position,
                    "updated_at": stmt.excluded.updated_at,
                },
            )
        )

    def follower_lag(self, conn: Connection) -> dict:
        """How far followers are held back: events not yet visible in follow order."""
        head = self.log.head(conn)
        return {"head_position": head.position, "head_tx_id": head.tx_id, "held_back": 0}


class RebuildPlan(Protocol):
    """What :mod:`ledger.rebuild` asks a store to rebuild, and where it reports."""

    slots: Sequence[str]
    prefixes: Sequence[str]
    new: ProjectionTables
    report: Any
    progress: Any

    def count_events(self, conn: Connection) -> int: ...

    def statements(self, conn: Connection, tables: ProjectionTables, slots: Sequence[str]) -> list: ...

    def run_fill(self, conn: Connection, stmt: Any) -> None: ...

    def fill(self, conn: Connection) -> None: ...

    def write(self, work: Any) -> Any:
        """``work(conn)`` in a write transaction, retried as the ledger's writes are."""

    def payload_problems(self, conn: Connection, slots: Sequence[str]) -> list[str]:
        """The corrupt events the new tables of ``slots`` would serve (none: [])."""

    def corruption(self, problems: list[str]) -> Exception:
        """The error that stops a rebuild which found ``problems``."""

    def mixed(self) -> ProjectionTables:
        """The new tables for the rebuilt slots, the live ones elsewhere."""


class MaintainableStore(FollowableStore):
    """Also: rebuild blue/green, verify in one snapshot, prune, migrate, read-only sessions."""

    #: Execution options of a transaction that must see one snapshot throughout.
    snapshot_options: ClassVar[dict[str, Any]] = {}

    @abstractmethod
    def rebuild(self, plan: RebuildPlan) -> None:
        """Fill ``plan.new`` from the log and swap the tables in for the live ones."""

    @staticmethod
    def rebuild_source() -> sa.FromClause:
        """The log as a set-based rebuild reads it."""
        return events_table

    @abstractmethod
    def create_scratch_table(self, conn: Connection, live: sa.Table, scratch: sa.Table) -> None:
        """``scratch``: an empty temporary table shaped as ``live``, gone with the transaction."""

    def drop_scratch_table(self, conn: Connection, scratch: sa.Table) -> None:
        """Drop what :meth:`create_scratch_table` made, where the rollback does not."""

    def lock_for_prune(self, conn: Connection) -> None:
        """Wait for a rebuild (or another prune) to end, then keep writers off the live
        projection tables (readers continue) until the transaction ends."""

    def allow_prune(self, conn: Connection) -> None:
        """Let this transaction delete from the append-only log."""

    @staticmethod
    @abstractmethod
    def fill_catalogue(conn: Connection, fill: CatalogueFill) -> int:
        """Run ``fill`` (its select, then its rows into its table) the fastest way this
        database has; how many rows went in."""

    @abstractmethod
    def migrating(self) -> contextlib.AbstractContextManager[Connection]:
        """A transaction in which one process at a time migrates the schema."""

    @abstractmethod
    def read_only_sessions(self) -> None:
        """Make every connection the engine opens from now on a read-only session."""

    # -- the catalogue's SQL functions ---------------------------------------------------

    @staticmethod
    @abstractmethod
    def contains(column: sa.ColumnElement, needle: bytes) -> sa.ColumnElement:
        """The stored bytes of ``column`` contain ``needle``."""

    @staticmethod
    @abstractmethod
    def seconds_between(start: sa.ColumnElement, end: sa.ColumnElement) -> sa.ColumnElement:
        """``end - start`` in seconds as a float (NULL if either is)."""

    @staticmethod
    @abstractmethod
    def percentiles(
        key: sa.ColumnElement, seconds: sa.ColumnElement, where: list, labelled: dict[str, float]
    ) -> sa.Select:
        """Per ``key``: ``seconds``' continuous percentiles (``{label: fraction}``, linear
        between the two nearest ranks, as PostgreSQL's ``percentile_cont``), max and count."""
