"""task catalogue: ledger_tasks, one row per task, back-filled from the log

Revision ID: 0003_catalogue
Revises: 0002_integrity
Create Date: 2026-12-02

The table's columns are spelled out (frozen). The back-fill is the catalogue's
rebuild (:func:`ledger.store.target.catalogue_select`): set-based SQL picks each
task's events, one payload per task is decoded, rows go in batched.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from ledger.store import store_type
from ledger.store.schema import UTCDateTime
from ledger.store.target import CatalogueFill, catalogue_select

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
INDEXES = {
    "ix_ledger_tasks_first_seen": ["first_seen"],
    "ix_ledger_tasks_root_id": ["root_id"],
    "ix_ledger_tasks_name_first_seen": ["name", "first_seen"],
    "ix_ledger_tasks_state_first_seen": ["state", "first_seen"],
    "ix_ledger_tasks_worker_first_seen": ["worker", "first_seen"],
}


def upgrade() -> None:
    op.create_table(
        TABLE,
        *(sa.Column(name, type_, nullable=nullable) for name, type_, nullable in COLUMNS),
        sa.PrimaryKeyConstraint("task_id", name=op.f("pk_ledger_tasks")),
    )
    # Rows first, indexes after: building an index once is cheaper than
    # maintaining it row by row through the back-fill.
    events = sa.table(
        "ledger_events",
        sa.column("position", POSITION),
        sa.column("stream_id", sa.String()),
        sa.column("type", sa.String()),
        sa.column("task_state", sa.String()),
        sa.column("recorded_at", UTCDateTime()),
        sa.column("payload", sa.LargeBinary()),
    )
    date_columns = {"first_seen", "started_at", "finished_at"}
    target = sa.table(
        TABLE,
        *(
            sa.column(name, UTCDateTime() if name in date_columns else type_)
            for name, type_, _ in COLUMNS
        ),
    )
    CatalogueFill(target, catalogue_select(events)).run(op.get_bind(), store_type(op.get_bind()))
    for name, columns in INDEXES.items():
        op.create_index(op.f(name), TABLE, columns)


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(op.f(name), table_name=TABLE)
    op.drop_table(TABLE)
