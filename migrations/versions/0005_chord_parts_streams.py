"""chords: parts in streams of their own; the chord's row keeps its size and claim

Revision ID: 0005_chord_parts_streams
Revises: 0004_catalogue_lifecycle
Create Date: 2026-12-06

From this revision a returned chord part (``chord.part_returned``) is appended
to a stream of its own, ``part:<task id>``, with the chord's id in ``ref_id``,
instead of to the chord's stream: parts of one chord returned at once by
different workers then never wait for each other's commit. The part no
longer updates the chord's row, which would serialize the parts again on its
row lock: ``ledger_chords`` keeps only the size and the claim's position, and
the parts' count moves to ``ledger_chord_counts``, one row per writer (the
PostgreSQL backend's pid; 0 on SQLite and after a rebuild) whose sum is the
chord's count. The position of the part that completed the chord is read from
``ledger_chord_parts``. Parts already in chord streams stay where they are and
count alike.

Nothing is rewritten: the rows of ``ledger_chord_parts`` are those of the
older layout, and the new table is filled from them. Downgrading puts the two
columns back, filled from those rows; parts appended meanwhile (in ``part:``
streams) are not seen by the older code's rebuild.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_chord_parts_streams"
down_revision = "0004_catalogue_lifecycle"
branch_labels = None
depends_on = None

CHORDS, PARTS, COUNTS = "ledger_chords", "ledger_chord_parts", "ledger_chord_counts"


def upgrade() -> None:
    with op.batch_alter_table(CHORDS) as batch:  # SQLite drops a column by copying the table
        batch.drop_column("returned")
        batch.drop_column("completed_position")
    op.create_table(
        COUNTS,
        sa.Column("chord_id", sa.String(length=255), nullable=False),
        sa.Column("stripe", sa.Integer(), nullable=False),
        sa.Column("returned", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("chord_id", "stripe", name=op.f(f"pk_{COUNTS}")),
    )
    op.execute(sa.text(
        f"INSERT INTO {COUNTS} (chord_id, stripe, returned)"
        f" SELECT chord_id, 0, count(*) FROM {PARTS} GROUP BY chord_id"
    ))


def downgrade() -> None:
    op.drop_table(COUNTS)
    with op.batch_alter_table(CHORDS) as batch:
        batch.add_column(sa.Column("returned", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("completed_position", sa.BigInteger(), nullable=True))
    conn = op.get_bind()
    parts: dict[str, list[int]] = {}
    for chord_id, position in conn.execute(sa.text(f"SELECT chord_id, position FROM {PARTS}")):
        parts.setdefault(chord_id, []).append(position)
    for chord_id, size in conn.execute(sa.text(f"SELECT chord_id, size FROM {CHORDS}")).all():
        positions = sorted(parts.get(chord_id, ()))
        completed = positions[size - 1] if size and len(positions) >= size else None
        conn.execute(
            sa.text(f"UPDATE {CHORDS} SET returned = :n, completed_position = :c WHERE chord_id = :k"),
            {"n": len(positions), "c": completed, "k": chord_id},
        )
