"""task catalogue: SENT/RECEIVED rows, sent/ready/received times, group_id index

Revision ID: 0004_catalogue_lifecycle
Revises: 0003_catalogue
Create Date: 2026-12-06

SENT and RECEIVED give a task a catalogue row before any Celery state (state
SENT or RECEIVED) and the times its queue wait is measured from:
``sent_at``/``ready_at`` (the attempt's SENT: the publisher's clock, and its ETA
if later) and ``received_at``. Every row may change, so the catalogue is filled
again from the log: one set-based SELECT per whole log picks each task's
effective event, first event, attempt's SENT/RECEIVED/STARTED and tombstone
flags (window functions and GROUP BY, no query per task); the effective payload
and the SENT's are decoded as the rows stream through (msgpack has no SQL form)
and go in as COPY (PostgreSQL) or batched INSERTs.

Everything it needs is frozen here -- the table's columns, the fold's rules as
SQL, the payload fields -- so later code cannot change what this revision does.
"""

from __future__ import annotations

from datetime import timezone

import msgpack
import sqlalchemy as sa
from alembic import op

revision = "0004_catalogue_lifecycle"
down_revision = "0003_catalogue"
branch_labels = None
depends_on = None

TABLE = "ledger_tasks"
UTC_DATETIME = sa.DateTime(timezone=True)
NEW_COLUMNS = ("sent_at", "ready_at", "received_at")
GROUP_INDEX = "ix_ledger_tasks_group_id"
#: 0003's indexes, dropped through the fill and built again after it
INDEXES = {
    "ix_ledger_tasks_first_seen": ["first_seen"],
    "ix_ledger_tasks_root_id": ["root_id"],
    "ix_ledger_tasks_name_first_seen": ["name", "first_seen"],
    "ix_ledger_tasks_state_first_seen": ["state", "first_seen"],
    "ix_ledger_tasks_worker_first_seen": ["worker", "first_seen"],
    GROUP_INDEX: ["group_id"],
}

TASK_STATE, SENT_TYPE, RECEIVED_TYPE = "task.state", "task.sent", "task.received"
FORGOTTEN_TYPE, EXPIRED_TYPE = "task.forgotten", "results.expired"
STARTED, STICKY_STATE = "STARTED", "SUCCESS"
READY_STATES = ("FAILURE", "REVOKED", "SUCCESS")
PAYLOAD_FIELDS = (
    "name", "worker", "queue", "retries", "parent_id", "root_id", "group_id",
    "exc_type", "content_type", "args", "kwargs",
)
RECEIVED_FIELDS = ("name", "worker", "retries")
BATCH = 10_000


def upgrade() -> None:
    for name in NEW_COLUMNS:
        op.add_column(TABLE, sa.Column(name, UTC_DATETIME, nullable=True))
    # Rows first, indexes after: building an index once is cheaper than
    # maintaining it row by row through the fill.
    for name in INDEXES:
        if name != GROUP_INDEX:
            op.drop_index(op.f(name), table_name=TABLE)
    op.execute(sa.text(f"DELETE FROM {TABLE}"))
    _fill(op.get_bind())
    for name, columns in INDEXES.items():
        op.create_index(op.f(name), TABLE, columns)


def downgrade() -> None:
    op.drop_index(op.f(GROUP_INDEX), table_name=TABLE)
    # Rows of tasks only sent or received have no Celery state: 0003's catalogue
    # lists only tasks with one.
    op.execute(sa.text(f"DELETE FROM {TABLE} WHERE state IN ('SENT', 'RECEIVED')"))
    with op.batch_alter_table(TABLE) as batch:  # SQLite drops a column by copying the table
        for name in NEW_COLUMNS:
            batch.drop_column(name)


def _select(dialect: str) -> sa.Select:
    e = sa.table(
        "ledger_events",
        sa.column("position", sa.BigInteger()),
        sa.column("stream_id", sa.String()),
        sa.column("type", sa.String()),
        sa.column("task_state", sa.String()),
        sa.column("recorded_at", UTC_DATETIME),
        sa.column("payload", sa.LargeBinary()),
    )
    if dialect == "postgresql":
        # Ids compared bytewise: sorting them under a libc locale is 1.6x slower.
        e = sa.select(
            *(sa.collate(c, "C").label(c.name) if c.name == "stream_id" else c for c in e.c)
        ).subquery("ledger_events")
    catalogue_event = sa.and_(
        e.c.type.in_([TASK_STATE, SENT_TYPE, RECEIVED_TYPE]), e.c.stream_id.like("task:%")
    )
    # The life a row shows ends at the stream's last state; a tombstone before it
    # started that life, tombstones after it set the flags.
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
            flag(FORGOTTEN_TYPE).label("forgotten"),
            flag(EXPIRED_TYPE).label("expired"),
        )
        .select_from(e.join(last, last.c.stream_id == e.c.stream_id))
        .where(e.c.type.in_([FORGOTTEN_TYPE, EXPIRED_TYPE]))
        .group_by(e.c.stream_id)
        .subquery("tomb")
    )
    life = (
        sa.select(
            e.c.stream_id, e.c.position, e.c.type, e.c.task_state,
            # SUCCESS is sticky: the events after the life's first SUCCESS change nothing
            sa.func.min(sa.case((e.c.task_state == STICKY_STATE, e.c.position)))
            .over(partition_by=e.c.stream_id).label("first_success"),
            # the life's first event's time, carried rather than joined back by position
            sa.func.first_value(e.c.recorded_at)
            .over(partition_by=e.c.stream_id, order_by=e.c.position).label("first_seen"),
        )
        .select_from(e.outerjoin(tomb, tomb.c.stream_id == e.c.stream_id))
        .where(catalogue_event, e.c.position > sa.func.coalesce(tomb.c.life_start, 0))
        .subquery("life")
    )
    # Events in effect, each with the life's last SENT in effect (its attempt's start).
    k = (
        sa.select(
            life.c.stream_id, life.c.position, life.c.type, life.c.task_state, life.c.first_success,
            life.c.first_seen,
            sa.func.max(sa.case((life.c.type == SENT_TYPE, life.c.position)))
            .over(partition_by=life.c.stream_id).label("sent"),
        )
        .where(sa.or_(life.c.first_success.is_(None), life.c.position <= life.c.first_success))
        .subquery("kept")
    )
    this_attempt = sa.or_(k.c.sent.is_(None), k.c.position > k.c.sent)

    def latest(*conditions):
        return sa.func.max(sa.case((sa.and_(*conditions), k.c.position)))

    summary = (
        sa.select(
            k.c.stream_id,
            # Celery's state if the life has one, else the latest of the highest
            # lifecycle state (RECEIVED over SENT)
            sa.func.coalesce(
                sa.func.min(k.c.first_success),
                latest(k.c.type == TASK_STATE),
                latest(k.c.type == RECEIVED_TYPE),
                sa.func.max(k.c.sent),
            ).label("effective"),
            sa.func.min(k.c.first_seen).label("first_seen"),  # one value per life
            latest(k.c.task_state == STARTED, this_attempt).label("started"),
            sa.func.max(k.c.sent).label("sent"),
            latest(k.c.type == RECEIVED_TYPE, this_attempt).label("received"),
        )
        .group_by(k.c.stream_id)
        .subquery("summary")
    )
    eff = e.alias("effective")

    # Each joined back by position from the events of its type only: a smaller hash.
    def of_type(name: str, column: str, *where):
        return sa.select(e.c.position, e.c[column]).where(*where).subquery(name)

    started = of_type("started", "recorded_at", e.c.type == TASK_STATE, e.c.task_state == STARTED)
    sent = of_type("sent", "payload", e.c.type == SENT_TYPE)
    received = of_type("received", "recorded_at", e.c.type == RECEIVED_TYPE)
    return sa.select(
        sa.func.substr(summary.c.stream_id, 6).label("task_id"),
        eff.c.task_state.label("state"),
        eff.c.position,
        summary.c.first_seen,
        started.c.recorded_at.label("started_at"),
        sa.case((eff.c.task_state.in_(READY_STATES), eff.c.recorded_at)).label("finished_at"),
        received.c.recorded_at.label("received_at"),
        sa.func.coalesce(tomb.c.forgotten, 0).label("forgotten"),
        sa.func.coalesce(tomb.c.expired, 0).label("expired"),
        eff.c.type.label("effective_type"),
        eff.c.payload,
        sent.c.payload.label("sent_payload"),
    ).select_from(
        summary.join(eff, eff.c.position == summary.c.effective)
        .outerjoin(started, started.c.position == summary.c.started)
        .outerjoin(sent, sent.c.position == summary.c.sent)
        .outerjoin(received, received.c.position == summary.c.received)
        .outerjoin(tomb, tomb.c.stream_id == summary.c.stream_id)
    )


def _loads(payload: bytes, task_id: str) -> dict:
    try:  # timestamp=3: msgpack timestamps come back as aware UTC datetimes
        return msgpack.unpackb(payload, raw=False, timestamp=3, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise RuntimeError(f"corrupt payload in the events of task:{task_id}: {exc}") from exc


def _part(encoded, key: str):
    return None if encoded is None else encoded[key]


def _fields(p: dict, event_type: str) -> dict:
    args, kwargs = p.get("args"), p.get("kwargs")
    return {
        "name": p.get("name"),
        # a RECEIVED's worker is its hostname; a SENT's hostname is the publisher's
        "worker": p.get("hostname") if event_type == RECEIVED_TYPE else p.get("worker"),
        "queue": p.get("queue"),
        "retries": p.get("retries"),
        "parent_id": p.get("parent_id"),
        "root_id": p.get("root_id"),
        "group_id": p.get("group_id"),
        "exc_type": p.get("exc_type"),
        "content_type": _part(args if args is not None else kwargs, "content_type"),
        "args": _part(args, "data"),
        "kwargs": _part(kwargs, "data"),
    }


def _row(row: tuple) -> tuple:
    *values, forgotten, expired, effective_type, payload, sent_payload = row
    fields = _fields(_loads(payload, values[0]), effective_type)
    times: tuple = (None, None)
    if sent_payload is not None:
        s = _loads(sent_payload, values[0])
        eta = s.get("eta")
        times = (s["sent_at"], s["sent_at"] if eta is None else max(s["sent_at"], eta))
        if effective_type == RECEIVED_TYPE:
            # a RECEIVED gives these; the rest (queue, ids, arguments) is the attempt's SENT's
            fields = {**_fields(s, SENT_TYPE), **{k: fields[k] for k in RECEIVED_FIELDS}}
    return (*values, bool(forgotten), bool(expired), *times, *(fields[k] for k in PAYLOAD_FIELDS))


#: PostgreSQL's name of the filled columns' types that are not varchar (binary COPY).
PG_TYPES = {
    "position": "bigint", "retries": "integer", "args": "bytea", "kwargs": "bytea",
    "forgotten": "boolean", "expired": "boolean",
    **dict.fromkeys(("first_seen", "started_at", "finished_at", "received_at", "sent_at", "ready_at"),
                    "timestamptz"),
}


def _fill(conn: sa.Connection) -> None:
    # Rows go through the driver's own cursors, not SQLAlchemy's result rows: at
    # 1,000,000 tasks the per-row cost is the fill's cost (SQLAlchemy's rows and
    # UTC conversions 4 of 24 s, text COPY 3.7 µs a row against binary's 1.3,
    # measured), and the selected times are written back as the driver read them.
    pg = conn.dialect.name == "postgresql"
    if pg:
        # Read the whole result (a server-side cursor plans for its first 10%), with
        # hash/merge joins: on a log never ANALYZEd the planner's nested loops re-run
        # the tombstone aggregate per task.
        conn.execute(sa.text("SET LOCAL cursor_tuple_fraction = 1.0"))
        conn.execute(sa.text("SET LOCAL enable_nestloop = off"))
    select = _select(conn.dialect.name)
    compiled = select.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    columns = [*select.selected_columns.keys()][:-5] + ["forgotten", "expired", "sent_at", "ready_at",
                                                         *PAYLOAD_FIELDS]
    names = ", ".join(columns)
    raw = conn.connection.driver_connection
    if pg:
        types = [PG_TYPES.get(c, "varchar") for c in columns]
        with raw.cursor(name="ledger_catalogue_0004") as source:
            source.execute(str(compiled), compiled.params)
            conn.execute(sa.text("SET LOCAL enable_nestloop = on"))
            while chunk := source.fetchmany(BATCH):
                with raw.cursor() as cur, cur.copy(f"COPY {TABLE} ({names}) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(types)
                    for row in chunk:
                        copy.write_row(_row(row))
        return
    insert = f"INSERT INTO {TABLE} ({names}) VALUES ({', '.join('?' * len(columns))})"
    sent_at = columns.index("sent_at")
    source = raw.cursor()
    try:
        source.execute(str(compiled), [compiled.params[k] for k in compiled.positiontup or ()])
        while chunk := source.fetchmany(BATCH):
            batch = []
            for row in chunk:
                values = _row(row)
                # SQLite keeps UTC times as naive text, always with microseconds
                # (as the selected ones are already).
                times = tuple(None if t is None else t.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
                              for t in values[sent_at:sent_at + 2])
                batch.append((*values[:sent_at], *times, *values[sent_at + 2:]))
            raw.executemany(insert, batch)
    finally:
        source.close()
