"""task catalogue: ledger_tasks, one row per task, back-filled from the log

Revision ID: 0003_catalogue
Revises: 0002_integrity
Create Date: 2026-12-02

Frozen: this module imports nothing of the package (``ledger``, ``projections``),
so it keeps meaning what it meant when written however the live code changes.
The table's columns, the event type names, the catalogue's rule (as it stood
in ``projections.catalogue`` and ``projections.sql.catalogue_select``) and the
payload keys it reads are spelled out here. The back-fill is set-based SQL that
picks each task's effective event, first event, last STARTED and tombstone
flags; one payload per task is then decoded (msgpack has no SQL form) and the
rows go in batched (binary COPY on PostgreSQL, ``executemany`` on SQLite).
"""

from __future__ import annotations

import msgpack
import sqlalchemy as sa
from alembic import op

revision = "0003_catalogue"
down_revision = "0002_integrity"
branch_labels = None
depends_on = None

POSITION = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
UTC_DATETIME = sa.DateTime(timezone=True)
TABLE = "ledger_tasks"

COLUMNS = (
    ("task_id", sa.String(length=255), False),
    ("state", sa.String(length=50), False),
    ("position", POSITION, False),
    ("first_seen", UTC_DATETIME, False),
    ("started_at", UTC_DATETIME, True),
    ("finished_at", UTC_DATETIME, True),
    ("name", sa.String(), True),
    ("worker", sa.String(), True),
    ("queue", sa.String(), True),
    ("retries", sa.Integer(), True),
    ("parent_id", sa.String(length=255), True),
    ("root_id", sa.String(length=255), True),
    ("group_id", sa.String(length=255), True),
    ("exc_type", sa.String(), True),
    ("content_type", sa.String(length=100), True),
    ("args", sa.LargeBinary(), True),
    ("kwargs", sa.LargeBinary(), True),
    ("forgotten", sa.Boolean(), False),
    ("expired", sa.Boolean(), False),
)
#: PostgreSQL's name of each column type, for the back-fill's binary COPY.
PG_TYPES = {
    "position": "bigint", "retries": "integer", "args": "bytea", "kwargs": "bytea",
    "first_seen": "timestamptz", "started_at": "timestamptz", "finished_at": "timestamptz",
    "forgotten": "boolean", "expired": "boolean",
}
INDEXES = {
    "ix_ledger_tasks_first_seen": ["first_seen"],
    "ix_ledger_tasks_root_id": ["root_id"],
    "ix_ledger_tasks_name_first_seen": ["name", "first_seen"],
    "ix_ledger_tasks_state_first_seen": ["state", "first_seen"],
    "ix_ledger_tasks_worker_first_seen": ["worker", "first_seen"],
}


TASK_STATE, FORGOTTEN, EXPIRED = "task.state", "task.forgotten", "results.expired"
STARTED, SUCCESS = "STARTED", "SUCCESS"
READY_STATES = ("FAILURE", "REVOKED", "SUCCESS")
#: The columns taken from the effective event's payload, by its keys.
PAYLOAD_KEYS = ("name", "worker", "queue", "retries", "parent_id", "root_id", "group_id", "exc_type")
#: The back-fill's row: the selected columns, then the payload's (payload_values).
FILL_COLUMNS = (
    "task_id", "state", "position", "first_seen", "started_at", "finished_at", "forgotten",
    "expired", *PAYLOAD_KEYS, "content_type", "args", "kwargs",
)
BATCH = 10_000


def upgrade() -> None:
    op.create_table(
        TABLE,
        *(sa.Column(name, type_, nullable=nullable) for name, type_, nullable in COLUMNS),
        sa.PrimaryKeyConstraint("task_id", name=op.f("pk_ledger_tasks")),
    )
    # Rows first, indexes after: building an index once is cheaper than
    # maintaining it row by row through the back-fill.
    back_fill(op.get_bind())
    for name, columns in INDEXES.items():
        op.create_index(op.f(name), TABLE, columns)


def catalogue_select(dialect: str) -> sa.Select:
    """Each task's row but its payload columns, then the effective event's payload."""
    e = sa.table(
        "ledger_events",
        sa.column("position", POSITION),
        sa.column("stream_id", sa.String()),
        sa.column("type", sa.String()),
        sa.column("task_state", sa.String()),
        sa.column("recorded_at", UTC_DATETIME),
        sa.column("payload", sa.LargeBinary()),
    )
    if dialect == "postgresql":
        # Ids compared bytewise: sorting under a libc locale is 1.6x slower.
        e = sa.select(
            *(sa.collate(c, "C").label(c.name) if c.name == "stream_id" else c for c in e.c)
        ).subquery("ledger_events")
    task_state = sa.and_(e.c.type == TASK_STATE, e.c.stream_id.like("task:%"))
    # The life a row shows ends at the stream's last task.state: a tombstone
    # before it started that life, tombstones after it set the flags.
    last = (
        sa.select(e.c.stream_id, sa.func.max(e.c.position).label("last"))
        .where(task_state).group_by(e.c.stream_id).subquery("last_state")
    )
    after_last = e.c.position > last.c.last

    def flag(type_: str):
        return sa.func.max(sa.case((sa.and_(after_last, e.c.type == type_), 1), else_=0))

    tomb = (
        sa.select(
            e.c.stream_id,
            sa.func.max(sa.case((e.c.position < last.c.last, e.c.position))).label("life_start"),
            flag(FORGOTTEN).label("forgotten"),
            flag(EXPIRED).label("expired"),
        )
        .select_from(e.join(last, last.c.stream_id == e.c.stream_id))
        .where(e.c.type.in_([FORGOTTEN, EXPIRED]))
        .group_by(e.c.stream_id)
        .subquery("tomb")
    )
    life = (
        sa.select(
            e.c.stream_id, e.c.position, e.c.task_state,
            # SUCCESS is sticky: the events after the life's first SUCCESS change nothing
            sa.func.min(sa.case((e.c.task_state == SUCCESS, e.c.position)))
            .over(partition_by=e.c.stream_id).label("first_success"),
        )
        .select_from(e.outerjoin(tomb, tomb.c.stream_id == e.c.stream_id))
        .where(task_state, e.c.position > sa.func.coalesce(tomb.c.life_start, 0))
        .subquery("life")
    )
    in_effect = sa.or_(life.c.first_success.is_(None), life.c.position <= life.c.first_success)
    summary = (
        sa.select(
            life.c.stream_id,
            sa.func.coalesce(sa.func.min(life.c.first_success), sa.func.max(life.c.position))
            .label("effective"),
            sa.func.min(life.c.position).label("first"),
            sa.func.max(
                sa.case((sa.and_(life.c.task_state == STARTED, in_effect), life.c.position))
            ).label("started"),
        )
        .group_by(life.c.stream_id)
        .subquery("summary")
    )
    eff, first, started = e.alias("effective"), e.alias("first"), e.alias("started")
    return (
        sa.select(
            sa.func.substr(summary.c.stream_id, 6).label("task_id"),
            eff.c.task_state.label("state"),
            eff.c.position,
            first.c.recorded_at.label("first_seen"),
            started.c.recorded_at.label("started_at"),
            sa.case((eff.c.task_state.in_(READY_STATES), eff.c.recorded_at)).label("finished_at"),
            (sa.func.coalesce(tomb.c.forgotten, 0) == 1).label("forgotten"),
            (sa.func.coalesce(tomb.c.expired, 0) == 1).label("expired"),
            eff.c.payload,
        )
        .select_from(
            summary.join(eff, eff.c.position == summary.c.effective)
            .join(first, first.c.position == summary.c.first)
            .outerjoin(started, started.c.position == summary.c.started)
            .outerjoin(tomb, tomb.c.stream_id == summary.c.stream_id)
        )
    )


def payload_values(payload: bytes) -> tuple:
    """The payload columns of a stored ``task.state`` event (a msgpack map)."""
    # strict_map_key=False: results may be maps with non-string keys; the values
    # read here are strings, ints and bytes, so no extension hook is needed.
    data = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    get = data.get
    args, kwargs = get("args"), get("kwargs")
    encoded = args if args is not None else kwargs
    return (
        *(get(k) for k in PAYLOAD_KEYS),
        None if encoded is None else encoded["content_type"],
        None if args is None else args["data"],
        None if kwargs is None else kwargs["data"],
    )


def back_fill(conn: sa.Connection) -> int:
    """Fill the catalogue from the log; returns the rows written."""
    pg = conn.dialect.name == "postgresql"
    select = catalogue_select(conn.dialect.name)
    compiled = select.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    columns = ", ".join(FILL_COLUMNS)
    raw = conn.connection.driver_connection
    filled = 0

    def rows(chunk: list[tuple]) -> list[tuple]:
        out = []
        for *values, payload in chunk:
            try:
                out.append((*values, *payload_values(payload)))
            except Exception as exc:  # msgpack raises several unrelated types on bad input
                raise ValueError(
                    f"corrupt payload at log position {values[2]} (task:{values[0]}): {exc}"
                ) from exc
        return out

    if pg:
        # The SELECT reads the whole log: a server-side cursor must not be planned
        # for its first rows, and on a log never ANALYZEd the planner's guesses pick
        # nested loops over millions of rows; hash and merge joins read each input once.
        conn.exec_driver_sql("SET LOCAL cursor_tuple_fraction = 1.0")
        conn.exec_driver_sql("SET LOCAL enable_nestloop = off")
        with raw.cursor(name="ledger_catalogue_back_fill") as source:
            source.execute(str(compiled), compiled.params)
            conn.exec_driver_sql("SET LOCAL enable_nestloop = on")
            copy_in = f"COPY {TABLE} ({columns}) FROM STDIN (FORMAT BINARY)"
            types = [PG_TYPES.get(name, "varchar") for name in FILL_COLUMNS]
            while chunk := source.fetchmany(BATCH):
                with raw.cursor() as cur, cur.copy(copy_in) as copy:
                    copy.set_types(types)
                    for row in rows(chunk):
                        copy.write_row(row)
                filled += len(chunk)
        return filled
    insert = f"INSERT INTO {TABLE} ({columns}) VALUES ({', '.join('?' * len(FILL_COLUMNS))})"
    source = raw.cursor()
    try:
        source.execute(str(compiled), [compiled.params[k] for k in compiled.positiontup or ()])
        while chunk := source.fetchmany(BATCH):
            raw.executemany(insert, rows(chunk))
            filled += len(chunk)
    finally:
        source.close()
    return filled


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(op.f(name), table_name=TABLE)
    op.drop_table(TABLE)
