"""initial schema: the log, follower checkpoints and the inline projections

Revision ID: 0001
Revises:
Create Date: 2026-11-25

Migrations are frozen: they spell out types instead of importing the models.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# SQLite only aliases the rowid as INTEGER PRIMARY KEY; BIGINT elsewhere.
POSITION = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
UTC_DATETIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "ledger_events",
        sa.Column("position", POSITION, sa.Identity(always=False), nullable=False),
        sa.Column("tx_id", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("stream_id", sa.String(length=300), nullable=False),
        sa.Column("stream_version", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(length=40), nullable=False),
        sa.Column("schema_version", sa.SmallInteger(), nullable=False),
        sa.Column("recorded_at", UTC_DATETIME, nullable=False),
        sa.Column("task_state", sa.String(length=50), nullable=True),
        sa.Column("ref_id", sa.String(length=255), nullable=True),
        sa.Column("chord_size", sa.Integer(), nullable=True),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("position", name=op.f("pk_ledger_events")),
        sa.UniqueConstraint("event_id", name=op.f("uq_ledger_events_event_id")),
        sa.UniqueConstraint(
            "stream_id", "stream_version", name=op.f("uq_ledger_events_stream_id_stream_version")
        ),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_ledger_events_recorded_at"), "ledger_events", ["recorded_at"])
    op.create_index(op.f("ix_ledger_events_tx_id_position"), "ledger_events", ["tx_id", "position"])

    op.create_table(
        "ledger_checkpoints",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("tx_id", sa.BigInteger(), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", UTC_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_ledger_checkpoints")),
    )
    op.create_table(
        "ledger_task_meta",
        sa.Column("task_id", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=50), nullable=False),
        sa.Column("position", POSITION, nullable=False),
        sa.Column("done_at", UTC_DATETIME, nullable=True),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("task_id", name=op.f("pk_ledger_task_meta")),
    )
    op.create_index(op.f("ix_ledger_task_meta_done_at"), "ledger_task_meta", ["done_at"])
    op.create_table(
        "ledger_groups",
        sa.Column("group_id", sa.String(length=255), nullable=False),
        sa.Column("position", POSITION, nullable=False),
        sa.Column("saved_at", UTC_DATETIME, nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("group_id", name=op.f("pk_ledger_groups")),
    )
    op.create_index(op.f("ix_ledger_groups_saved_at"), "ledger_groups", ["saved_at"])
    op.create_table(
        "ledger_chords",
        sa.Column("chord_id", sa.String(length=255), nullable=False),
        sa.Column("size", sa.Integer(), nullable=True),
        sa.Column("returned", sa.Integer(), nullable=False),
        sa.Column("completed_position", POSITION, nullable=True),
        sa.Column("fired_position", POSITION, nullable=True),
        sa.PrimaryKeyConstraint("chord_id", name=op.f("pk_ledger_chords")),
    )
    op.create_table(
        "ledger_chord_parts",
        sa.Column("chord_id", sa.String(length=255), nullable=False),
        sa.Column("task_id", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=50), nullable=False),
        sa.Column("position", POSITION, nullable=False),
        sa.PrimaryKeyConstraint("chord_id", "task_id", name=op.f("pk_ledger_chord_parts")),
    )


def downgrade() -> None:
    op.drop_table("ledger_chord_parts")
    op.drop_table("ledger_chords")
    op.drop_index(op.f("ix_ledger_groups_saved_at"), table_name="ledger_groups")
    op.drop_table("ledger_groups")
    op.drop_index(op.f("ix_ledger_task_meta_done_at"), table_name="ledger_task_meta")
    op.drop_table("ledger_task_meta")
    op.drop_table("ledger_checkpoints")
    op.drop_index(op.f("ix_ledger_events_tx_id_position"), table_name="ledger_events")
    op.drop_index(op.f("ix_ledger_events_recorded_at"), table_name="ledger_events")
    op.drop_table("ledger_events")
