"""integrity: the log refuses UPDATE, DELETE and TRUNCATE except through prune (PostgreSQL);
ledger_events.ref_id is indexed (a task state's group id: timeline finds members)

Revision ID: 0002_integrity
Revises: 0001
Create Date: 2026-12-02

Events are never changed; only ``celery-ledger prune`` deletes old ones, and it
says so in its own transaction (``SET LOCAL ledger.prune = 'on'``, which ends
with that transaction). Anything else that tries -- a hand-written DELETE, an
edit of a payload -- is refused by a statement-level trigger, so the history
cannot be rewritten by mistake (it is a guard, not access control: a role that
may run DDL can drop it). SQLite has no session settings a trigger could read;
there ``verify`` reports the stream-version gaps a deletion leaves.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_integrity"
down_revision = "0001"
branch_labels = None
depends_on = None

GUARD = """
CREATE FUNCTION ledger_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('ledger.prune', true), '') <> 'on' THEN
        RAISE EXCEPTION 'ledger_events is append-only: % refused (events are never changed; '
            'celery-ledger prune deletes old ones)', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    # Task states stored before this revision carry no ref_id; timeline finds
    # their groups' members through saved groups only.
    op.create_index(
        op.f("ix_ledger_events_ref_id"), "ledger_events", ["ref_id"],
        postgresql_where=sa.text("ref_id IS NOT NULL"), sqlite_where=sa.text("ref_id IS NOT NULL"),
    )
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute(GUARD)
    op.execute(
        "CREATE TRIGGER ledger_events_append_only BEFORE UPDATE OR DELETE OR TRUNCATE "
        "ON ledger_events FOR EACH STATEMENT EXECUTE FUNCTION ledger_events_append_only()"
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_ledger_events_ref_id"), table_name="ledger_events")
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER ledger_events_append_only ON ledger_events")
    op.execute("DROP FUNCTION ledger_events_append_only()")
