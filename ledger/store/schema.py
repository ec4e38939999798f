"""The schema: the log, the projections' tables and the followers' checkpoints.

One :class:`sqlalchemy.MetaData` for all of them, which Alembic compares with the
database (``celery-ledger db check``). Dialect options of a table (a partial
index, SQLite's AUTOINCREMENT) are written here, beside the column they are
for: the definitions must stay one model for every database.

``ledger_events`` is the log. Besides the envelope it carries three *index
columns* lifted out of the payload (``task_state``, ``ref_id``, ``chord_size``)
so that projections can be rebuilt with set-based SQL instead of decoding every
msgpack payload in Python. ``ref_id`` is a chord part's task id, or the group id
of a task state (how ``timeline`` finds a group's members).

``tx_id`` is PostgreSQL's ``pg_current_xact_id()`` of the appending transaction
(0 on SQLite); followers order by ``(tx_id, position)`` (see :mod:`ledger.store.base`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timezone

import sqlalchemy as sa

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: One MetaData for the log and the projections; Alembic compares against it.
metadata = sa.MetaData(naming_convention=NAMING)


class UTCDateTime(sa.TypeDecorator):
    """Timezone-aware UTC datetimes on every dialect (SQLite stores naive text)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: the ledger stores UTC only")
        # In UTC for every database: one that keeps no zone (SQLite's text
        # DATETIME formats the fields and drops tzinfo) then stores UTC too.
        return value.astimezone(timezone.utc)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)

Position = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


@dataclass(frozen=True)
class ProjectionTables:
    """The projection tables; ``rebuild`` fills a second set and swaps it in."""

    task_meta: sa.Table
    groups: sa.Table
    chords: sa.Table
    chord_parts: sa.Table
    chord_counts: sa.Table
    catalogue: sa.Table

    def all(self) -> tuple[sa.Table, ...]:
        return (self.task_meta, self.groups, self.chords, self.chord_parts, self.chord_counts, self.catalogue)

    @classmethod
    def define(cls, md: sa.MetaData, suffix: str = "") -> ProjectionTables:
        return cls(
            task_meta=sa.Table(
                f"ledger_task_meta{suffix}",
                md,
                sa.Column("task_id", sa.String(255), primary_key=True),
                sa.Column("status", sa.String(50), nullable=False),
                sa.Column("position", Position, nullable=False),
                sa.Column("done_at", UTCDateTime(), nullable=True, index=True),
                sa.Column("payload", sa.LargeBinary(), nullable=False),
            ),
            groups=sa.Table(
                f"ledger_groups{suffix}",
                md,
                sa.Column("group_id", sa.String(255), primary_key=True),
                sa.Column("position", Position, nullable=False),
                sa.Column("saved_at", UTCDateTime(), nullable=False, index=True),
                sa.Column("payload", sa.LargeBinary(), nullable=False),
            ),
            chords=sa.Table(
                f"ledger_chords{suffix}",
                md,
                sa.Column("chord_id", sa.String(255), primary_key=True),
                sa.Column("size", sa.Integer(), nullable=True),
                # the count of returned parts is chord_parts' (projections.chord)
                sa.Column("fired_position", Position, nullable=True),
            ),
            chord_parts=sa.Table(
                f"ledger_chord_parts{suffix}",
                md,
                sa.Column("chord_id", sa.String(255), primary_key=True),
                sa.Column("task_id", sa.String(255), primary_key=True),
                sa.Column("status", sa.String(50), nullable=False),
                sa.Column("position", Position, nullable=False),
            ),
            # The number of a chord's rows in chord_parts, in a row per writer
            # (``stripe``: the PostgreSQL backend's pid, 0 elsewhere and after a
            # rebuild): a part adds 1 to its own writer's row, so parts written
            # at once by different workers never wait for each other's row lock,
            # and the claim sums a few rows instead of counting every part.
            chord_counts=sa.Table(
                f"ledger_chord_counts{suffix}",
                md,
                sa.Column("chord_id", sa.String(255), primary_key=True),
                sa.Column("stripe", sa.Integer(), primary_key=True),
                sa.Column("returned", sa.Integer(), nullable=False),
            ),
            catalogue=_catalogue_table(md, f"ledger_tasks{suffix}"),
        )


def _catalogue_table(md: sa.MetaData, name: str) -> sa.Table:
    """The task catalogue (:mod:`projections.catalogue`), beside ``ledger_task_meta``.

    A table of its own, not columns of task meta: its row outlives ``forget()``
    and expiry (task meta's row must go, Celery then reports PENDING), and the
    indexes below would otherwise weigh on ``get_task_meta``'s table. Indexes
    serve the catalogue's filters, newest first: ``(x, first_seen)`` for the
    filters asked with a time range or a limit, ``root_id`` for a workflow,
    ``group_id`` for a group's members (the timeline, a chord's header).
    Queue, exception type and args are filtered on rows these narrow down.
    """
    return sa.Table(
        name,
        md,
        sa.Column("task_id", sa.String(255), primary_key=True),
        sa.Column("state", sa.String(50), nullable=False),
        sa.Column("position", Position, nullable=False),
        sa.Column("first_seen", UTCDateTime(), nullable=False, index=True),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("sent_at", UTCDateTime(), nullable=True),
        sa.Column("ready_at", UTCDateTime(), nullable=True),
        sa.Column("received_at", UTCDateTime(), nullable=True),
        sa.Column("name", sa.String(), nullable=True),
        sa.Column("worker", sa.String(), nullable=True),
        sa.Column("queue", sa.String(), nullable=True),
        sa.Column("retries", sa.Integer(), nullable=True),
        sa.Column("parent_id", sa.String(255), nullable=True),
        sa.Column("root_id", sa.String(255), nullable=True, index=True),
        sa.Column("group_id", sa.String(255), nullable=True, index=True),
        sa.Column("exc_type", sa.String(), nullable=True),
        sa.Column("content_type", sa.String(100), nullable=True),
        sa.Column("args", sa.LargeBinary(), nullable=True),
        sa.Column("kwargs", sa.LargeBinary(), nullable=True),
        sa.Column("forgotten", sa.Boolean(), nullable=False),
        sa.Column("expired", sa.Boolean(), nullable=False),
        *(
            sa.Index(f"ix_{name}_{col}_first_seen", col, "first_seen")
            for col in ("name", "state", "worker")
        ),
    )


LIVE = ProjectionTables.define(metadata)


events = sa.Table(
    "ledger_events",
    metadata,
    sa.Column(
        "position",
        Position,
        sa.Identity(always=False),
        primary_key=True,
    ),
    sa.Column("tx_id", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("event_id", sa.Uuid(), nullable=False, unique=True),
    sa.Column("stream_id", sa.String(300), nullable=False),
    sa.Column("stream_version", sa.Integer(), nullable=False),
    sa.Column("type", sa.String(40), nullable=False),
    sa.Column("schema_version", sa.SmallInteger(), nullable=False),
    sa.Column("recorded_at", UTCDateTime(), nullable=False, index=True),
    sa.Column("task_state", sa.String(50), nullable=True),
    sa.Column("ref_id", sa.String(255), nullable=True),
    sa.Column("chord_size", sa.Integer(), nullable=True),
    sa.Column("payload", sa.LargeBinary(), nullable=False),
    sa.UniqueConstraint("stream_id", "stream_version"),
    sa.Index(None, "tx_id", "position"),
    # Task states of group members and chord parts/additions (ref_id is NULL for
    # most events, which a partial index leaves out: no cost for plain tasks).
    sa.Index(
        None, "ref_id",
        postgresql_where=sa.text("ref_id IS NOT NULL"), sqlite_where=sa.text("ref_id IS NOT NULL"),
    ),
    sqlite_autoincrement=True,  # never reuse a position, even after prune
)

#: The transaction setting that lets a prune past the log's append-only trigger
#: on PostgreSQL (migrations/versions/0002_integrity.py).
PRUNE_SETTING = "ledger.prune"

#: Positions of followers (relay, remote projections) stored beside the log.
checkpoints = sa.Table(
    "ledger_checkpoints",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("tx_id", sa.BigInteger(), nullable=False),
    sa.Column("position", sa.BigInteger(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)

__all__ = [
    "LIVE", "NAMING", "PRUNE_SETTING", "Position", "ProjectionTables", "UTCDateTime", "checkpoints",
    "events", "metadata",
]
