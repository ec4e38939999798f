"""The SQL projection target: the folds of :mod:`projections` as statements on the
tables beside the log, run in the append's transaction, and rebuilt set-based.

Every statement here is the SQL form of a fold, and the property test
(tests/test_projection_equivalence.py) proves the forms equal: the memory fold,
these live statements, PostgreSQL's fused form of them
(:class:`ledger.store.postgres.FusedUpdates`) and the set-based rebuild.

Dialect-neutral SQLAlchemy Core only: the upsert construct and the bulk write
come from the database's store class (``SqlTarget.store``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ledger import codec
from ledger.events import (
    CHORD,
    TOMBSTONE_TYPES,
    ChordApplied,
    ChordFired,
    ChordPartAdded,
    ChordPartReturned,
    ChordStarted,
    CorruptEvent,
    EventData,
    GroupExpired,
    GroupForgotten,
    GroupSaved,
    RecordedEvent,
    ResultExpired,
    TaskForgotten,
    TaskReceived,
    TaskSent,
    TaskState,
    stream_id,
)
from ledger.store.schema import Position, ProjectionTables, UTCDateTime
from ledger.store.schema import events as events_table
from projections.catalogue import (
    LIFECYCLE_TIMES,
    PAYLOAD_FIELDS,
    RECEIVED_FIELDS,
    SENT_FIELDS,
    STARTED,
    TaskEntry,
    fields_of,
    payload_values,
)
from projections.chord import ChordState
from projections.group import GroupState
from projections.lifecycle import RANK, STATE_OF, ready_at
from projections.memory import Snapshot
from projections.task_meta import READY_STATES, STICKY_STATE, TaskMeta

#: The order in which a transaction of writers takes the projection tables (its events
#: first, in ``ledger_events``): PostgreSQL's fused statements
#: (:class:`ledger.store.postgres.FusedUpdates`: a task state's catalogue CTE before its
#: task row; a chord part's row before its count; a claim after both) and the handlers
#: below. Locks taken in the same order cannot wait in a cycle with them: prune takes
#: its own in it (:meth:`ledger.store.postgres.PostgresStore.lock_for_prune`).
WRITE_ORDER = ("catalogue", "task_meta", "groups", "chord_parts", "chord_counts", "chords")


class SqlForms(Protocol):
    """A database's forms of what the statements here need (its store class has them)."""

    @staticmethod
    def insert(table: sa.Table) -> Any: ...

    @staticmethod
    def fill_catalogue(conn: Connection, fill: CatalogueFill) -> int: ...


def claimable_sql(t: ProjectionTables) -> str:
    """SQL: the chord ``:key`` is complete -- as many distinct parts returned in its life
    as its size (the sum of its ``chord_counts`` rows) -- and not claimed
    (:class:`projections.chord.ChordState`'s ``complete`` and ``fired_position``)."""
    c, n = t.chords.name, t.chord_counts.name
    return (
        f"EXISTS (SELECT 1 FROM {c} c WHERE c.chord_id = CAST(:key AS varchar)"
        " AND c.fired_position IS NULL AND c.size IS NOT NULL"
        f" AND (SELECT COALESCE(sum(returned), 0) FROM {n} n"
        " WHERE n.chord_id = CAST(:key AS varchar)) >= c.size)"
    )


class SqlTarget:
    """Applies recorded events to projection tables inside the caller's transaction.

    ``store`` is the store class of the database (:mod:`ledger.store.postgres`,
    :mod:`ledger.store.sqlite`): the upsert and bulk-write forms are its own
    (:class:`SqlForms`).
    """

    def __init__(
        self, tables: ProjectionTables, store: SqlForms, slots: Iterable[str] | None = None
    ) -> None:
        self.t = tables
        self.store = store
        #: The tables (:class:`ProjectionTables` fields) it writes; None: all. A partial
        #: rebuild catches up on its own tables only: a task state also changes the
        #: task row when the catalogue is rebuilt, and that row is the live one.
        self.slots = None if slots is None else frozenset(slots)

    def _writes(self, slot: str) -> bool:
        return self.slots is None or slot in self.slots

    # -- live updates -------------------------------------------------------------

    def apply(self, conn: Connection, events: Iterable[RecordedEvent]) -> None:
        """Update the projections for ``events``."""
        for event in events:
            handler = self._handlers.get(event.type)
            if handler is not None:
                handler(self, conn, event)

    def _task_state(self, conn: Connection, e: RecordedEvent) -> None:
        if self._writes("catalogue"):
            self._catalogue_state(conn, e)  # first: WRITE_ORDER
        if not self._writes("task_meta"):
            return
        status = e.data.status  # type: ignore[attr-defined]
        conn.execute(self._task_meta_upsert, {
            "task_id": e.stream_key,
            "status": status,
            "position": e.position,
            "done_at": e.recorded_at if status in READY_STATES else None,
            "payload": e.payload,
        })

    # Each statement is built once per target (a cached property) with bound
    # parameters: built per event, SQLAlchemy's construction and cache key cost more
    # than the statement (SQLite's store: ~1 ms of a ~2 ms append, measured).
    @cached_property
    def _task_meta_upsert(self) -> Any:
        t = self.t.task_meta
        stmt = self.store.insert(t).values({k: _bound(t, k) for k in TASK_META_COLUMNS})
        # SUCCESS is sticky: the row is only replaced while it is not SUCCESS.
        return stmt.on_conflict_do_update(
            index_elements=[t.c.task_id],
            set_={k: stmt.excluded[k] for k in ("status", "position", "done_at", "payload")},
            where=t.c.status != STICKY_STATE,
        )

    def _catalogue_state(self, conn: Connection, e: RecordedEvent) -> None:
        # projections.catalogue.fold as an upsert; the fused form is _catalogue_sql.
        status = e.data.status  # type: ignore[attr-defined]
        conn.execute(self._catalogue_state_upsert, {
            "task_id": e.stream_key,
            "state": status,
            "position": e.position,
            "first_seen": e.recorded_at,
            "started_at": e.recorded_at if status == STARTED else None,
            "finished_at": e.recorded_at if status in READY_STATES else None,
            "forgotten": False,
            "expired": False,
            **fields_of(e.data.__dict__),
        })

    @cached_property
    def _catalogue_state_upsert(self) -> Any:
        c = self.t.catalogue
        stmt = self.store.insert(c).values({k: _bound(c, k) for k in CATALOGUE_STATE_COLUMNS})
        ended = sa.or_(c.c.forgotten, c.c.expired)
        x = stmt.excluded
        return stmt.on_conflict_do_update(
            index_elements=[c.c.task_id],
            set_={
                **{k: x[k] for k in ("state", "position", "finished_at", "forgotten", "expired")},
                **{k: x[k] for k in PAYLOAD_FIELDS},
                "first_seen": sa.case((ended, x.first_seen), else_=c.c.first_seen),
                "started_at": sa.case(
                    (x.started_at.is_not(None), x.started_at),
                    (ended, sa.null()),
                    else_=c.c.started_at,
                ),
                **{k: sa.case((ended, sa.null()), else_=c.c[k]) for k in LIFECYCLE_TIMES},
            },
            where=sa.or_(c.c.state != STICKY_STATE, ended),
        )

    def _lifecycle(self, conn: Connection, e: RecordedEvent) -> None:
        # projections.catalogue.fold for SENT/RECEIVED as an upsert; the fused form
        # is _catalogue_sql. Task meta ignores them (Celery sees PENDING).
        if not self._writes("catalogue"):
            return
        conn.execute(self._lifecycle_upserts[e.type], {
            "task_id": e.stream_key, "position": e.position, "first_seen": e.recorded_at,
            "started_at": None, "finished_at": None, "forgotten": False, "expired": False,
            "received_at": e.recorded_at if e.type == TaskReceived.type else None,
            **lifecycle_columns(e.data),
        })

    @cached_property
    def _lifecycle_upserts(self) -> dict[str, Any]:
        return {t: self._lifecycle_upsert(t) for t in (TaskSent.type, TaskReceived.type)}

    def _lifecycle_upsert(self, event_type: str) -> Any:
        c = self.t.catalogue
        stmt = self.store.insert(c).values({k: _bound(c, k) for k in LIFECYCLE_COLUMNS})
        x = stmt.excluded
        ended = sa.or_(c.c.forgotten, c.c.expired)
        incoming = STATE_OF[event_type]
        # becomes the effective event over no state or a lifecycle state ranked no higher
        takes = sa.or_(ended, c.c.state.in_([s for s, r in RANK.items() if r <= RANK[incoming]]))
        sent = event_type == TaskSent.type
        # the attempt's SENT gives the columns a RECEIVED does not carry, under either state
        carried = sa.or_(ended, c.c.state.in_(list(RANK))) if sent else ended

        def pick(cond: sa.ColumnElement, k: str) -> sa.ColumnElement:
            return sa.case((cond, x[k]), else_=c.c[k])

        return stmt.on_conflict_do_update(
            index_elements=[c.c.task_id],
            set_={
                **{k: pick(takes, k) for k in ("state", "position", *RECEIVED_FIELDS)},
                **{k: pick(carried, k) for k in SENT_FIELDS},
                **{k: pick(ended, k) for k in ("first_seen", "finished_at", "forgotten", "expired")},
                # a SENT begins an attempt (sets its times, clears the rest); RECEIVED
                # sets its own; a new life has none but the event's
                **{k: x[k] if sent else pick(ended, k) for k in ("sent_at", "ready_at", "started_at")},
                "received_at": x.received_at,
            },
            where=sa.or_(c.c.state != STICKY_STATE, ended),
        )

    def _task_gone(self, conn: Connection, e: RecordedEvent) -> None:
        t, c = self.t.task_meta, self.t.catalogue
        if self._writes("catalogue"):  # first: WRITE_ORDER
            flag = "forgotten" if e.type == TaskForgotten.type else "expired"
            conn.execute(sa.update(c).where(c.c.task_id == e.stream_key).values({flag: True}))
        if self._writes("task_meta"):
            conn.execute(sa.delete(t).where(t.c.task_id == e.stream_key))

    def _group_saved(self, conn: Connection, e: RecordedEvent) -> None:
        if not self._writes("groups"):
            return
        conn.execute(self._group_saved_upsert, {
            "group_id": e.stream_key, "position": e.position, "saved_at": e.recorded_at, "payload": e.payload,
        })

    @cached_property
    def _group_saved_upsert(self) -> Any:
        t = self.t.groups
        stmt = self.store.insert(t).values({k: _bound(t, k) for k in ("group_id", "position", "saved_at", "payload")})
        return stmt.on_conflict_do_update(
            index_elements=[t.c.group_id],
            set_={k: stmt.excluded[k] for k in ("position", "saved_at", "payload")},
        )

    def _group_gone(self, conn: Connection, e: RecordedEvent) -> None:
        if not self._writes("groups"):
            return
        t = self.t.groups
        conn.execute(sa.delete(t).where(t.c.group_id == e.stream_key))

    def _chord_size(self, conn: Connection, e: RecordedEvent, new: Any, grown: Any) -> None:
        """Set the chord's size: ``new`` for a chord without a row, else ``grown`` (an
        expression of the row)."""
        if not self._writes("chords"):
            return
        c = self.t.chords
        stmt = self.store.insert(c).values(chord_id=e.stream_key, size=new, fired_position=None)
        conn.execute(stmt.on_conflict_do_update(index_elements=[c.c.chord_id], set_={"size": grown}))

    def _chord_applied(self, conn: Connection, e: RecordedEvent) -> None:
        # A new life starts empty (projections.chord.fold): the earlier life's parts
        # go, so the same header task ids count again. (The chords projection's three
        # tables are rebuilt together: one slot of it stands for them all here.)
        if not self._writes("chords"):
            return
        c, p, n = self.t.chords, self.t.chord_parts, self.t.chord_counts
        conn.execute(sa.delete(p).where(p.c.chord_id == e.stream_key))
        conn.execute(sa.delete(n).where(n.c.chord_id == e.stream_key))
        empty = {"size": None, "fired_position": None}
        stmt = self.store.insert(c).values(chord_id=e.stream_key, **empty)
        conn.execute(stmt.on_conflict_do_update(index_elements=[c.c.chord_id], set_=empty))

    def _chord_started(self, conn: Connection, e: RecordedEvent) -> None:
        size = sa.literal(e.data.size, sa.Integer)  # type: ignore[attr-defined]
        self._chord_size(conn, e, size, size)

    def _chord_part_added(self, conn: Connection, e: RecordedEvent) -> None:
        self._chord_size(conn, e, 1, sa.func.coalesce(self.t.chords.c.size, 0) + 1)

    def _chord_part_returned(self, conn: Connection, e: RecordedEvent) -> None:
        # A row per distinct task id: a part that already returned changes nothing.
        # The chord's own row is not touched: parts of one chord never wait for
        # each other (ledger.events.ChordPartReturned); the count is theirs.
        if not self._writes("chords"):
            return
        data = e.data
        inserted = conn.execute(self._chord_part_insert, {
            "chord_id": data.chord_id, "task_id": data.task_id,  # type: ignore[attr-defined]
            "status": data.status, "position": e.position,  # type: ignore[attr-defined]
        }).first()
        if inserted is not None:
            conn.execute(self._chord_count_upsert,
                         {"chord_id": data.chord_id})  # type: ignore[attr-defined]

    @cached_property
    def _chord_part_insert(self) -> Any:
        p = self.t.chord_parts
        return (
            self.store.insert(p)
            .values({k: _bound(p, k) for k in ("chord_id", "task_id", "status", "position")})
            .on_conflict_do_nothing()
            .returning(p.c.task_id)
        )

    @cached_property
    def _chord_count_upsert(self) -> Any:
        n = self.t.chord_counts
        stmt = self.store.insert(n).values(chord_id=_bound(n, "chord_id"), stripe=0, returned=1)
        return stmt.on_conflict_do_update(
            index_elements=[n.c.chord_id, n.c.stripe], set_={"returned": n.c.returned + 1}
        )

    def _chord_fired(self, conn: Connection, e: RecordedEvent) -> None:
        if not self._writes("chords"):
            return
        conn.execute(self._chord_fired_upsert,
                     {"chord_id": e.stream_key, "fired_position": e.position})

    @cached_property
    def _chord_fired_upsert(self) -> Any:
        c = self.t.chords
        stmt = self.store.insert(c).values(
            chord_id=_bound(c, "chord_id"), size=None, fired_position=_bound(c, "fired_position")
        )
        return stmt.on_conflict_do_update(
            index_elements=[c.c.chord_id],
            set_={"fired_position": sa.func.coalesce(c.c.fired_position, stmt.excluded.fired_position)},
        )

    _handlers = {
        TaskState.type: _task_state,
        TaskSent.type: _lifecycle,
        TaskReceived.type: _lifecycle,
        TaskForgotten.type: _task_gone,
        ResultExpired.type: _task_gone,
        GroupSaved.type: _group_saved,
        GroupForgotten.type: _group_gone,
        GroupExpired.type: _group_gone,
        ChordApplied.type: _chord_applied,
        ChordStarted.type: _chord_started,
        ChordPartAdded.type: _chord_part_added,
        ChordPartReturned.type: _chord_part_returned,
        ChordFired.type: _chord_fired,
    }

    # -- reads ----------------------------------------------------------------------

    def task_point_sql(self) -> str:
        """The task row by id as plain SQL (``:key``), for the driver-level point read."""
        t = self.t.task_meta
        return f"SELECT task_id, status, position, done_at, payload FROM {t.name} WHERE task_id = :key"

    @cached_property
    def _task_read(self) -> Any:  # built once, as the upserts are
        t = self.t.task_meta
        return sa.select(t).where(t.c.task_id == _bound(t, "task_id"))

    def task(self, conn: Connection, task_id: str) -> TaskMeta | None:
        row = conn.execute(self._task_read, {"task_id": task_id}).first()
        return TaskMeta(**row._mapping) if row is not None else None

    def tasks(self, conn: Connection, task_ids: Iterable[str]) -> list[TaskMeta]:
        """The rows of those of ``task_ids`` that have one (one query per 500 ids)."""
        t, ids, found = self.t.task_meta, list(task_ids), []
        for i in range(0, len(ids), 500):
            rows = conn.execute(sa.select(t).where(t.c.task_id.in_(ids[i : i + 500])))
            found += [TaskMeta(**row._mapping) for row in rows]
        return found

    def finished_before(
        self, conn: Connection, cutoff: datetime, limit: int, events: sa.Table
    ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """Tasks done and groups saved before ``cutoff`` (result expiry), each with
        its stream's version in ``events`` read in the same statement -- what an
        expiry event expects, so that it fails on a task or group that changed since."""
        t, g = self.t.task_meta, self.t.groups

        def version(prefix: str, key: sa.Column) -> sa.ScalarSelect:
            return (
                sa.select(sa.func.max(events.c.stream_version))
                .where(events.c.stream_id == sa.literal(prefix) + key)
                .scalar_subquery()
            )

        tasks = conn.execute(
            sa.select(t.c.task_id, version("task:", t.c.task_id))
            .where(t.c.done_at < cutoff).order_by(t.c.done_at).limit(limit)
        ).all()
        groups = conn.execute(
            sa.select(g.c.group_id, version("group:", g.c.group_id))
            .where(g.c.saved_at < cutoff).order_by(g.c.saved_at).limit(limit)
        ).all()
        return [tuple(r) for r in tasks], [tuple(r) for r in groups]

    def catalogue_entry(self, conn: Connection, task_id: str) -> TaskEntry | None:
        t = self.t.catalogue
        row = conn.execute(sa.select(t).where(t.c.task_id == task_id)).first()
        return TaskEntry(**row._mapping) if row is not None else None

    def group(self, conn: Connection, group_id: str) -> GroupState | None:
        t = self.t.groups
        row = conn.execute(sa.select(t).where(t.c.group_id == group_id)).first()
        return GroupState(**row._mapping) if row is not None else None

    def chord(self, conn: Connection, chord_id: str) -> ChordState | None:
        c, p = self.t.chords, self.t.chord_parts
        row = conn.execute(sa.select(c.c.size, c.c.fired_position).where(c.c.chord_id == chord_id)).first()
        parts = conn.execute(
            sa.select(p.c.task_id, p.c.status, p.c.position).where(p.c.chord_id == chord_id)
        ).all()
        if row is None and not parts:
            return None
        return _chord_state(chord_id, row, (tuple(r) for r in parts))

    def claimable_version(self, conn: Connection, chord_id: str) -> int | None:
        """The chord stream's version if the chord is complete and not claimed, else None:
        one statement, so the version and the chord's state are read together (one
        snapshot on PostgreSQL)."""
        return conn.execute(
            self._claimable_version_sql, {"stream": stream_id(CHORD, chord_id), "key": chord_id}
        ).scalar()

    @cached_property
    def _claimable_version_sql(self) -> sa.TextClause:
        return sa.text(
            f"SELECT COALESCE(MAX(stream_version), 0) FROM {events_table.name}"
            f" WHERE stream_id = CAST(:stream AS varchar) HAVING {claimable_sql(self.t)}"
        )

    def chord_header(
        self, conn: Connection, chord_id: str
    ) -> tuple[GroupState | None, dict[str, TaskMeta | None]]:
        """A completed chord's inputs: the header group saved under ``chord_id``, and the
        task row of every part that returned (None for a part whose result has no row)."""
        return self.chord_header_of(chord_id, conn.execute(self.chord_header_sql, {"key": chord_id}))

    @staticmethod
    def chord_header_of(
        chord_id: str, rows: Iterable[tuple]
    ) -> tuple[GroupState | None, dict[str, TaskMeta | None]]:
        """:meth:`chord_header` from the rows of :attr:`chord_header_sql` (UTC datetimes)."""
        header, parts = None, {}
        for task_id, status, position, at, payload in rows:
            if task_id is None:
                header = GroupState(chord_id, position, at, payload)
            else:
                parts[task_id] = TaskMeta(task_id, status, position, at, payload) if status else None
        return header, parts

    @cached_property
    def chord_header_sql(self) -> sa.TextualSelect:
        # One statement, the group's row first as the row without a task id. Text, not
        # Core: it runs once per chord, on the completing part's path, and the first
        # compile of a Core select in a worker process costs ~5 ms there (measured).
        g, p, t = self.t.groups.name, self.t.chord_parts.name, self.t.task_meta.name
        return sa.text(
            f"SELECT NULL AS task_id, NULL AS status, position, saved_at AS at, payload"
            f" FROM {g} WHERE group_id = :key"
            f" UNION ALL SELECT p.task_id, m.status, m.position, m.done_at, m.payload"
            f" FROM {p} p LEFT JOIN {t} m ON m.task_id = p.task_id WHERE p.chord_id = :key"
        ).columns(
            sa.column("task_id", sa.String()), sa.column("status", sa.String()),
            sa.column("position", Position), sa.column("at", UTCDateTime()),
            sa.column("payload", sa.LargeBinary()),
        )

    def snapshot(self, conn: Connection) -> Snapshot:
        """Read every projection row (for verify and tests; loads everything)."""
        snap = Snapshot()
        for row in conn.execute(sa.select(self.t.task_meta)):
            snap.task_meta[row.task_id] = TaskMeta(**row._mapping)
        for row in conn.execute(sa.select(self.t.groups)):
            snap.groups[row.group_id] = GroupState(**row._mapping)
        for row in conn.execute(sa.select(self.t.catalogue)):
            snap.catalogue[row.task_id] = TaskEntry(**row._mapping)
        parts: dict[str, set] = {}
        for row in conn.execute(sa.select(self.t.chord_parts)):
            parts.setdefault(row.chord_id, set()).add((row.task_id, row.status, row.position))
        rows = {row.chord_id: row for row in conn.execute(sa.select(self.t.chords))}
        for chord_id in rows.keys() | parts.keys():
            snap.chords[chord_id] = _chord_state(chord_id, rows.get(chord_id), parts.get(chord_id, ()))
        return snap

    # -- set-based rebuild ------------------------------------------------------------

    def rebuild(self, conn: Connection, events: sa.Table) -> None:
        """Fill this target's (empty) tables from the log with one INSERT ... SELECT each.

        The window functions below are the folds written as sets: per stream, the
        current life starts after the last tombstone; the task row is the first
        SUCCESS of that life, else its last state; a chord's completion is the
        first event at which distinct returned parts reach the running size.
        """
        for stmt in rebuild_statements(events, self.t):
            run_fill(conn, stmt, self.store)


@dataclass(frozen=True)
class CatalogueFill:
    """The catalogue's rebuild: one set-based SELECT finds each task's effective
    event, first event, last STARTED and tombstone flags (:mod:`projections.catalogue`
    as sets, the task-meta rule included); the payload columns then come from
    decoding that one effective payload per task (msgpack has no SQL form), and
    the rows go in batched (COPY on PostgreSQL, ``executemany`` on SQLite).

    Rows travel through the driver's own cursors, not SQLAlchemy's result
    objects: at 1,000,000 tasks the per-row cost is the whole cost here
    (SQLAlchemy's rows and UTC conversions took 4 of 24 s, measured), and the
    non-payload values are written back exactly as the driver read them.
    """

    table: sa.Table
    select: sa.Select
    #: The select reads the whole log (rebuild, verify, the back-fill), not a few
    #: streams (prune's refresh, where index nested loops are the right plan).
    whole_log: bool = True

    BATCH = 10_000

    def run(self, conn: Connection, store: SqlForms) -> int:
        """Fill the table through the database's bulk path; how many rows went in."""
        return store.fill_catalogue(conn, self)

    def compiled(self, dialect: sa.Dialect) -> tuple[Any, list[str]]:
        """The select compiled for ``dialect`` (the store's), and the table's columns it
        fills (those of :meth:`with_payload_values`' rows, in order)."""
        compiled = self.select.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
        return compiled, [*compiled.statement.selected_columns.keys()][:-3] + list(CATALOGUE_DECODED)

    @staticmethod
    def with_payload_values(chunk: list[tuple], time: Callable[[datetime], Any] | None = None) -> list[tuple]:
        """Each selected row with its last three (the effective event's type and payload,
        the attempt's SENT payload) replaced by the SENT's times (through ``time``, the
        database's form of a time, if given) and the payload's columns."""
        out = []
        for *values, effective_type, payload, sent_payload in chunk:
            fields = payload_values(_decoded(payload, values), effective_type)
            if sent_payload is None:
                times: tuple = (None, None)
            else:
                sent = _decoded(sent_payload, values)
                times = (sent["sent_at"], ready_at(sent["sent_at"], sent.get("eta")))
                if time is not None:
                    times = tuple(time(t) for t in times)
                if effective_type == TaskReceived.type:  # the rest is the attempt's SENT's
                    sent_fields = payload_values(sent, TaskSent.type)
                    fields = tuple(
                        r if own else s for r, s, own in zip(fields, sent_fields, _RECEIVED_OWN, strict=True)
                    )
            out.append((*values, *times, *fields))
        return out


#: Per payload column: whether a RECEIVED gives it (else the attempt's SENT does).
_RECEIVED_OWN = tuple(k in RECEIVED_FIELDS for k in PAYLOAD_FIELDS)

#: The catalogue columns :class:`CatalogueFill` decodes from payloads, in its order.
CATALOGUE_DECODED = ("sent_at", "ready_at", *PAYLOAD_FIELDS)


def _decoded(payload: bytes, values: list) -> dict:
    try:
        return codec.loads(payload)
    except codec.CodecError as exc:
        raise CorruptEvent(
            f"corrupt payload in the events of task:{values[0]} (its row's event: log position {values[2]}): {exc}"
        ) from exc


def run_fill(conn: Connection, stmt: sa.Executable | CatalogueFill, store: SqlForms) -> None:
    """Run one of :func:`rebuild_statements` (``store``: the database's store class)."""
    if isinstance(stmt, CatalogueFill):
        stmt.run(conn, store)
    else:
        conn.execute(stmt)


def catalogue_select(events: sa.FromClause, streams: Iterable[str] | None = None) -> sa.Select:
    """Each task's catalogue row but its payload columns and SENT times, then the
    effective event's type and payload and the attempt's SENT payload (decoded by
    :class:`CatalogueFill`).

    ``streams`` limits it to those ``task:<id>`` streams (prune refreshes the
    rows of the streams it cut).
    """
    e = events
    catalogue_event = sa.and_(
        e.c.type.in_([TaskState.type, TaskSent.type, TaskReceived.type]), e.c.stream_id.like("task:%")
    )
    if streams is not None:
        catalogue_event = sa.and_(catalogue_event, e.c.stream_id.in_(list(streams)))
    # The life a row shows ends at the stream's last state (Celery's, SENT or
    # RECEIVED): a tombstone before it started that life, tombstones after it set
    # the flags.
    last = (
        sa.select(e.c.stream_id, sa.func.max(e.c.position).label("last"))
        .where(catalogue_event).group_by(e.c.stream_id).subquery("last_state")
    )
    after_last = e.c.position > last.c.last

    def flag(type_: str):
        return sa.func.max(sa.case((sa.and_(after_last, e.c.type == type_), 1), else_=0))

    tomb = (
        sa.select(
            e.c.stream_id,
            sa.func.max(sa.case((e.c.position < last.c.last, e.c.position))).label("life_start"),
            flag(TaskForgotten.type).label("forgotten"),
            flag(ResultExpired.type).label("expired"),
        )
        .select_from(e.join(last, last.c.stream_id == e.c.stream_id))
        .where(e.c.type.in_([TaskForgotten.type, ResultExpired.type]))
        .group_by(e.c.stream_id)
        .subquery("tomb")
    )
    life = (
        sa.select(
            e.c.stream_id, e.c.position, e.c.type, e.c.task_state,
            # SUCCESS is sticky: the events after the life's first SUCCESS change nothing
            sa.func.min(sa.case((e.c.task_state == STICKY_STATE, e.c.position)))
            .over(partition_by=e.c.stream_id).label("first_success"),
            # The life's first event's time, carried here rather than joined back by
            # position: both windows share one sort, and a join of the whole log on
            # position builds a hash of every event (2-3 s a join at 5,000,000 events).
            sa.func.first_value(e.c.recorded_at)
            .over(partition_by=e.c.stream_id, order_by=e.c.position).label("first_seen"),
        )
        .select_from(e.outerjoin(tomb, tomb.c.stream_id == e.c.stream_id))
        .where(catalogue_event, e.c.position > sa.func.coalesce(tomb.c.life_start, 0))
        .subquery("life")
    )
    # The events in effect, each with the life's last SENT in effect: it began the
    # attempt whose RECEIVED and STARTED the row shows.
    kept = (
        sa.select(
            life.c.stream_id, life.c.position, life.c.type, life.c.task_state, life.c.first_success,
            life.c.first_seen,
            sa.func.max(sa.case((life.c.type == TaskSent.type, life.c.position)))
            .over(partition_by=life.c.stream_id).label("sent"),
        )
        .where(sa.or_(life.c.first_success.is_(None), life.c.position <= life.c.first_success))
        .subquery("kept")
    )
    k = kept
    this_attempt = sa.or_(k.c.sent.is_(None), k.c.position > k.c.sent)

    def latest(*conditions: sa.ColumnElement) -> sa.ColumnElement:
        return sa.func.max(sa.case((sa.and_(*conditions), k.c.position)))

    summary = (
        sa.select(
            k.c.stream_id,
            # Celery's state if the life has one (its first SUCCESS, else its last),
            # else the latest of the highest lifecycle state
            sa.func.coalesce(
                sa.func.min(k.c.first_success),
                latest(k.c.type == TaskState.type),
                latest(k.c.type == TaskReceived.type),
                sa.func.max(k.c.sent),
            ).label("effective"),
            sa.func.min(k.c.first_seen).label("first_seen"),  # one value per life
            latest(k.c.task_state == STARTED, this_attempt).label("started"),
            sa.func.max(k.c.sent).label("sent"),
            latest(k.c.type == TaskReceived.type, this_attempt).label("received"),
        )
        .group_by(k.c.stream_id)
        .subquery("summary")
    )
    eff = e.alias("effective")

    # Each joined back by position from the events of its type only: a smaller hash.
    def of_type(name: str, column: str, *where: sa.ColumnElement) -> sa.Subquery:
        return sa.select(e.c.position, e.c[column]).where(*where).subquery(name)

    started = of_type("started", "recorded_at", e.c.type == TaskState.type, e.c.task_state == STARTED)
    sent = of_type("sent", "payload", e.c.type == TaskSent.type)
    received = of_type("received", "recorded_at", e.c.type == TaskReceived.type)
    return (
        sa.select(
            sa.func.substr(summary.c.stream_id, 6).label("task_id"),
            eff.c.task_state.label("state"),
            eff.c.position,
            summary.c.first_seen,
            started.c.recorded_at.label("started_at"),
            sa.case(
                (eff.c.task_state.in_(sorted(READY_STATES)), eff.c.recorded_at)
            ).label("finished_at"),
            received.c.recorded_at.label("received_at"),
            (sa.func.coalesce(tomb.c.forgotten, 0) == 1).label("forgotten"),
            (sa.func.coalesce(tomb.c.expired, 0) == 1).label("expired"),
            eff.c.type.label("effective_type"),
            eff.c.payload,
            sent.c.payload.label("sent_payload"),
        )
        .select_from(
            summary.join(eff, eff.c.position == summary.c.effective)
            .outerjoin(started, started.c.position == summary.c.started)
            .outerjoin(sent, sent.c.position == summary.c.sent)
            .outerjoin(received, received.c.position == summary.c.received)
            .outerjoin(tomb, tomb.c.stream_id == summary.c.stream_id)
        )
    )


#: The columns each cached upsert of :class:`SqlTarget` inserts (its parameters' names).
TASK_META_COLUMNS = ("task_id", "status", "position", "done_at", "payload")
CATALOGUE_STATE_COLUMNS = (
    "task_id", "state", "position", "first_seen", "started_at", "finished_at", "forgotten", "expired",
    *PAYLOAD_FIELDS,
)
LIFECYCLE_COLUMNS = (
    "task_id", "position", "first_seen", "started_at", "finished_at", "forgotten", "expired",
    "received_at", "state", "sent_at", "ready_at", *PAYLOAD_FIELDS,
)


def _bound(table: sa.Table, column: str) -> sa.BindParameter:
    """A parameter for ``column`` of ``table``, typed as the column (UTC times, bytes)."""
    return sa.bindparam(column, type_=table.c[column].type)


def lifecycle_columns(data: EventData) -> dict:
    """The catalogue columns a SENT or RECEIVED gives from its payload (the fold's
    effective-event fields, and a SENT's times)."""
    sent = isinstance(data, TaskSent)
    return {
        "state": STATE_OF[data.type],
        "sent_at": data.sent_at if sent else None,  # type: ignore[union-attr]
        "ready_at": ready_at(data.sent_at, data.eta) if sent else None,  # type: ignore[union-attr]
        **fields_of(data.__dict__, data.type),
    }


def _chord_state(chord_id: str, row: Any, parts: Iterable[tuple[str, str, int]]) -> ChordState:
    """A chord's state from its row in the chords table (size, claim; None: no row)
    and its part rows: a chord whose parts returned before it started has no row."""
    return ChordState(
        chord_id=chord_id,
        size=row.size if row is not None else None,
        parts=frozenset(parts),
        fired_position=row.fired_position if row is not None else None,
    )


def _life(events: sa.Table, prefix: str, tombstones: Iterable[str]):
    """Rows of ``prefix`` streams after each stream's last tombstone."""
    e = events
    last = (
        sa.select(e.c.stream_id, sa.func.max(e.c.position).label("p"))
        .where(e.c.type.in_(sorted(tombstones)), e.c.stream_id.like(f"{prefix}:%"))
        .group_by(e.c.stream_id)
        .subquery("last_tombstone")
    )
    return e.outerjoin(last, last.c.stream_id == e.c.stream_id), sa.func.coalesce(last.c.p, 0)


def rebuild_statements(
    events: sa.FromClause, t: ProjectionTables
) -> list[sa.Executable | CatalogueFill]:
    e = events
    key_start = {"task": 6, "group": 7, "chord": 7, "part": 6}  # len("task:") + 1, ...

    # task meta -------------------------------------------------------------------
    joined, life_start = _life(e, "task", TOMBSTONE_TYPES)
    is_success = e.c.task_state == STICKY_STATE
    ranked = (
        sa.select(
            e.c.stream_id,
            e.c.task_state,
            e.c.position,
            e.c.recorded_at,
            e.c.payload,
            sa.func.row_number()
            .over(
                partition_by=e.c.stream_id,
                order_by=(
                    sa.case((is_success, 0), else_=1),
                    sa.case((is_success, e.c.position), else_=-e.c.position),
                ),
            )
            .label("rn"),
        )
        .select_from(joined)
        .where(
            e.c.type == TaskState.type,
            e.c.stream_id.like("task:%"),
            e.c.position > life_start,
        )
        .subquery("ranked")
    )
    tasks = sa.insert(t.task_meta).from_select(
        ["task_id", "status", "position", "done_at", "payload"],
        sa.select(
            sa.func.substr(ranked.c.stream_id, key_start["task"]),
            ranked.c.task_state,
            ranked.c.position,
            sa.case((ranked.c.task_state.in_(sorted(READY_STATES)), ranked.c.recorded_at)),
            ranked.c.payload,
        ).where(ranked.c.rn == 1),
    )

    # groups ------------------------------------------------------------------------
    joined, life_start = _life(e, "group", TOMBSTONE_TYPES)
    granked = (
        sa.select(
            e.c.stream_id,
            e.c.position,
            e.c.recorded_at,
            e.c.payload,
            sa.func.row_number()
            .over(partition_by=e.c.stream_id, order_by=e.c.position.desc())
            .label("rn"),
        )
        .select_from(joined)
        .where(e.c.type == GroupSaved.type, e.c.position > life_start)
        .subquery("granked")
    )
    groups = sa.insert(t.groups).from_select(
        ["group_id", "position", "saved_at", "payload"],
        sa.select(
            sa.func.substr(granked.c.stream_id, key_start["group"]),
            granked.c.position,
            granked.c.recorded_at,
            granked.c.payload,
        ).where(granked.c.rn == 1),
    )

    # chord parts: the first return of each distinct header task in the chord's
    # current life, which starts at its last chord.applied (projections.chord.fold).
    # A part is in its own stream (part:<task id>, the chord's id in ref_id), or, in
    # logs written before revision 0005, in the chord's (the task's id in ref_id).
    in_chord_stream = e.c.stream_id.like("chord:%")
    chord_key = sa.func.substr(e.c.stream_id, key_start["chord"])
    lives = (
        sa.select(chord_key.label("chord_id"), sa.func.max(e.c.position).label("p"))
        .where(e.c.type == ChordApplied.type, in_chord_stream)
        .group_by(e.c.stream_id)
        .subquery("lives")
    )
    returns = (
        sa.select(
            sa.case((in_chord_stream, chord_key), else_=e.c.ref_id).label("chord_id"),
            sa.case((in_chord_stream, e.c.ref_id), else_=sa.func.substr(e.c.stream_id, key_start["part"]))
            .label("task_id"),
            e.c.task_state,
            e.c.position,
        )
        .where(e.c.type == ChordPartReturned.type)
        .subquery("returns")
    )
    first_return = (
        sa.select(
            returns,
            sa.func.row_number()
            .over(partition_by=(returns.c.chord_id, returns.c.task_id), order_by=returns.c.position)
            .label("rn"),
        )
        .select_from(returns.outerjoin(lives, lives.c.chord_id == returns.c.chord_id))
        .where(returns.c.position > sa.func.coalesce(lives.c.p, 0))
        .subquery("first_return")
    )
    parts = sa.insert(t.chord_parts).from_select(
        ["chord_id", "task_id", "status", "position"],
        sa.select(
            first_return.c.chord_id, first_return.c.task_id, first_return.c.task_state,
            first_return.c.position,
        ).where(first_return.c.rn == 1),
    )
    # the parts' count, in one row per chord (after the parts: it reads them)
    p = t.chord_parts
    counts = sa.insert(t.chord_counts).from_select(
        ["chord_id", "stripe", "returned"],
        sa.select(p.c.chord_id, sa.literal(0, sa.Integer), sa.func.count()).group_by(p.c.chord_id),
    )

    # chords: the current life's size and claim. The size is the last chord.started's
    # plus the parts added after it, or the parts added alone; None if neither.
    joined, life_start = _life(e, "chord", {ChordApplied.type})
    life = (
        sa.select(e.c.stream_id, e.c.position, e.c.type, e.c.chord_size)
        .select_from(joined)
        .where(
            e.c.type.in_([ChordApplied.type, ChordStarted.type, ChordPartAdded.type, ChordFired.type]),
            e.c.position >= life_start,  # the life's own chord.applied gives an empty life its row
        )
        .subquery("life")
    )
    last_start = (
        sa.select(life.c.stream_id, sa.func.max(life.c.position).label("p"))
        .where(life.c.type == ChordStarted.type)
        .group_by(life.c.stream_id)
        .subquery("last_start")
    )
    added = sa.func.sum(sa.case(
        (sa.and_(life.c.type == ChordPartAdded.type, life.c.position > sa.func.coalesce(last_start.c.p, 0)), 1),
        else_=0,
    ))
    per_chord = (
        sa.select(
            life.c.stream_id,
            last_start.c.p.label("last_start"),
            added.label("added"),
            sa.func.min(sa.case((life.c.type == ChordFired.type, life.c.position))).label("fired"),
        )
        .select_from(life.outerjoin(last_start, last_start.c.stream_id == life.c.stream_id))
        .group_by(life.c.stream_id, last_start.c.p)
        .subquery("per_chord")
    )
    q = per_chord
    start_size = (
        sa.select(e.c.chord_size)
        .where(e.c.stream_id == q.c.stream_id, e.c.position == q.c.last_start)
        .scalar_subquery()
    )
    chords = sa.insert(t.chords).from_select(
        ["chord_id", "size", "fired_position"],
        sa.select(
            sa.func.substr(q.c.stream_id, key_start["chord"]),
            sa.case(
                (sa.and_(q.c.last_start.is_(None), q.c.added == 0), sa.null()),
                else_=sa.func.coalesce(start_size, 0) + q.c.added,
            ),
            q.c.fired,
        ),
    )
    return [tasks, groups, parts, counts, chords, CatalogueFill(t.catalogue, catalogue_select(e))]
