"""task catalogue: ledger_tasks, one row per task, back-filled from the log

Revision ID: 0003_catalogue
Revises: 0002_integrity
Create Date: 2026-12-02

The table's columns are spelled out (frozen). Its rows are filled by the next
revision (0004_catalogue_lifecycle), which added the lifecycle's columns and
fills the catalogue from the log once, with its rules frozen there: a ledger
upgraded to head fills it once, not twice. (Until 0004 this revision filled
the table itself, with the live rebuild code -- which then changed under it.)
"""

from __future__ import annotations

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
    for name, columns in INDEXES.items():
        op.create_index(op.f(name), TABLE, columns)


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(op.f(name), table_name=TABLE)
    op.drop_table(TABLE)
