"""What the PostgreSQL server itself can do here: the ceiling the backends are read against.

* ``INSERT+COMMIT``: one single-row insert per transaction (autocommit: one round
  trip, one WAL flush), from 1 and from 4 processes, like the store runs.
* ``PK SELECT``: one primary-key lookup of a stored row, from 1 process.

psycopg prepares a statement after it has run a few times, as a well-written
driver layer would; no backend can beat this.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import psycopg

from bench.processes import Job, Slice

PAYLOAD = os.urandom(200)


def create_table(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_raw (id text PRIMARY KEY, payload bytea NOT NULL)")


def insert(url: str, prefix: str) -> Job:
    def job(child: int, deadline: float) -> Slice:
        with psycopg.connect(url, autocommit=True) as conn:
            s = Slice(started=time.monotonic())
            n = 0
            while (t0 := time.monotonic()) < deadline:
                conn.execute(
                    "INSERT INTO bench_raw (id, payload) VALUES (%s, %s)", (f"{prefix}-{child}-{n}", PAYLOAD)
                )
                s.latencies.append(time.monotonic() - t0)
                n += 1
            s.ended, s.ops = time.monotonic(), n
        return s

    return job


def select(url: str, ids: Sequence[str]) -> Job:
    def job(child: int, deadline: float) -> Slice:
        with psycopg.connect(url, autocommit=True) as conn:
            s = Slice(started=time.monotonic(), extra=0)
            n = 0
            while (t0 := time.monotonic()) < deadline:
                row = conn.execute("SELECT payload FROM bench_raw WHERE id = %s", (ids[n % len(ids)],)).fetchone()
                s.latencies.append(time.monotonic() - t0)
                if row is None:
                    s.extra += 1
                n += 1
            s.ended, s.ops = time.monotonic(), n
        return s

    return job
