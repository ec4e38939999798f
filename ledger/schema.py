"""The log's tables. Projection tables are defined in :mod:`projections.sql`.

``ledger_events`` is the log. Besides the envelope it carries three *index
columns* lifted out of the payload (``task_state``, ``ref_id``, ``chord_size``)
so that projections can be rebuilt with set-based SQL instead of decoding every
msgpack payload in Python. ``ref_id`` is a chord part's task id, or the group id
of a task state (how ``timeline`` finds a group's members).

``tx_id`` is PostgreSQL's ``pg_current_xact_id()`` of the appending transaction
(0 on SQLite); followers order by ``(tx_id, position)`` (see ledger/log.py).
"""

from __future__ import annotations

import sqlalchemy as sa

from projections.sql import LIVE, Position, UTCDateTime, metadata

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

projections = LIVE

__all__ = ["PRUNE_SETTING", "checkpoints", "events", "metadata", "projections"]
