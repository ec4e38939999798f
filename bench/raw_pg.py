"""What the PostgreSQL server itself can do here: the ceiling the backends are read against.

* ``INSERT+COMMIT``: one single-row insert per transaction (autocommit: one round
  trip, one WAL flush), from 1 and from 4 processes, like the store runs.
* ``PK SELECT``: one primary-key lookup of a stored row, from 1 process.

psycopg prepares a statement after it has run a few times, as a well-written
driver layer would; no backend can beat this.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import psycopg

from bench.processes import Job, Slice, timed_ops

PAYLOAD = os.urandom(200)


def create_table(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_raw (id text PRIMARY KEY, payload bytea NOT NULL)")


def insert(url: str, prefix: str, per_op: int = 1) -> Job:
    """Each child inserts ``per_op`` rows per operation, each its own transaction
    (``per_op=2``: a task's STARTED and SUCCESS as two durable commits). The first
    row of operation ``n`` is ``<prefix>-<child>-<n>`` (what ``get`` reads back,
    ``backend_ops.task_ids``); further rows add ``-<k>``."""

    def job(child: int, deadline: float) -> Slice:
        with psycopg.connect(url, autocommit=True) as conn:

            def op(n: int) -> None:
                for k in range(per_op):
                    conn.execute(
                        "INSERT INTO bench_raw (id, payload) VALUES (%s, %s)",
                        (f"{prefix}-{child}-{n}" + (f"-{k}" if k else ""), PAYLOAD),
                    )

            return timed_ops(deadline, op)

    return job


def select(url: str, ids: Sequence[str]) -> Job:
    def job(child: int, deadline: float) -> Slice:
        with psycopg.connect(url, autocommit=True) as conn:
            return timed_ops(
                deadline,
                lambda n: conn.execute(
                    "SELECT payload FROM bench_raw WHERE id = %s", (ids[n % len(ids)],)
                ).fetchone(),
                lambda n, row: row is None,
            )

    return job
