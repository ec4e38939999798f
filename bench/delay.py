"""What recording SENT costs a publisher: ``.delay()`` with ``ledger_track_sent`` on and off.

    .venv/bin/python -m bench.delay [--rounds 5] [--seconds 2] [--processes 1,4]
        [--broker redis://127.0.0.1:6379/13]   (default: $LEDGER_BENCH_REDIS)

With tracking on, every ``.delay()`` appends a ``task.sent`` event (one
autocommitted statement on PostgreSQL, one ``BEGIN IMMEDIATE`` transaction on
SQLite) before the message goes to the broker. Measured on a fresh PostgreSQL
database and a fresh SQLite file, tracking off and on interleaved in an order
that rotates every round, publishing to a queue nobody consumes (its keys are
deleted at the end); the table shows medians over the rounds.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid

import sqlalchemy as sa
from celery import Celery

from bench.args import measuring_parser
from bench.contenders import redis_cleanup, scratch_database
from bench.processes import Job, Slice, merge, run_forked, timed_ops
from bench.stats import Run
from ledger.api import Ledger
from ledger.events import TaskSent
from ledger.store import engine as database
from ledger.store.schema import events


def make_app(backend: str, broker: str, queue: str, track: bool) -> Celery:
    app = Celery("bench_delay", broker=broker, backend=backend, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        ledger_track_sent=track,
        broker_connection_retry_on_startup=True,
    )
    app.task(name="bench.noop")(noop)
    return app


def noop(n: int) -> int:
    """Never runs: nobody consumes the bench's queue."""
    return n


def delay_job(backend: str, broker: str, queue: str, track: bool) -> Job:
    """Each child builds its app (own connections) and calls ``.delay()`` until the deadline."""

    def job(child: int, deadline: float) -> Slice:
        began = time.monotonic()
        task = make_app(backend, broker, queue, track).tasks["bench.noop"]
        task.delay(-1)  # connects to the broker and the database before the clock runs
        # the full measuring time after that start (slow under load: many connects)
        return timed_ops(deadline + time.monotonic() - began, task.delay)

    return job


def sent_events(url: str) -> int:
    ledger = Ledger.open(url)
    q = sa.select(sa.func.count()).where(events.c.type == TaskSent.type)
    return ledger.read(lambda c: c.execute(q).scalar_one())


def measure(urls: dict[str, str], broker: str, rounds: int, seconds: float,
            processes: list[int]) -> dict[tuple[str, int, bool], list[Run]]:
    queue = f"bench-delay-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    cases = [(db, procs, track) for db in urls for procs in processes for track in (False, True)]
    runs: dict[tuple[str, int, bool], list[Run]] = {case: [] for case in cases}
    try:
        for r in range(rounds):
            for db, procs, track in cases[r % len(cases):] + cases[: r % len(cases)]:
                before = sent_events(urls[db])
                database._engines.clear()  # children build their own engines after fork
                run = merge(run_forked(delay_job(f"ledger+{urls[db]}", broker, queue, track), procs, seconds))
                recorded = sent_events(urls[db]) - before
                expected = run.ops + procs if track else 0  # + each child's warm-up call
                if recorded != expected:
                    run.ok, run.note = False, f"{recorded} task.sent recorded for {expected} delays"
                runs[(db, procs, track)].append(run)
                print(f"[round {r + 1}/{rounds}] {db:<10} {procs} process(es) tracking "
                      f"{'on ' if track else 'off'}: {run.rate or 0:,.0f} delays/s, p50 "
                      f"{(run.p50 or 0) * 1000:.2f} ms, p99 {(run.p99 or 0) * 1000:.2f} ms",
                      file=sys.stderr, flush=True)
    finally:
        redis_cleanup(queue, broker)
    return runs


def table(runs: dict[tuple[str, int, bool], list[Run]]) -> str:
    def med(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    lines = [
        "| database | processes | ledger_track_sent | .delay() rate (median) | p50 ms | p99 ms | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for (db, procs, track), rs in runs.items():
        rate, p50, p99 = (med([getattr(r, k) for r in rs]) for k in ("rate", "p50", "p99"))
        off = runs[(db, procs, False)]
        note = "; ".join(sorted({r.note for r in rs if r.note}))
        if track and rate:
            off_rate = med([r.rate for r in off])
            note = (f"{rate / off_rate:.2f}x the rate off" if off_rate else "") + (f"; {note}" if note else "")
        lines.append(
            f"| {db} | {procs} | {'on' if track else 'off'} | {rate or 0:,.0f} delays/s | "
            f"{(p50 or 0) * 1000:.2f} | {(p99 or 0) * 1000:.2f} | {note} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = measuring_parser("python -m bench.delay", __doc__, rounds=5, seconds=2.0, processes="1,4",
                         who="publishing", broker_help="Redis broker URL (default: LEDGER_BENCH_REDIS)")
    a = p.parse_args(argv)
    tmpdir = tempfile.mkdtemp(prefix="ledger_bench_delay_")
    try:
        with scratch_database(f"ledger_bench_delay_{os.getpid()}") as pg_url:
            urls = {
                "postgresql": pg_url.replace("postgresql://", "postgresql+psycopg://", 1),
                "sqlite": f"sqlite:///{tmpdir}/ledger.db",
            }
            try:
                for url in urls.values():
                    Ledger.open(url, upgrade=True).engine.dispose()
                runs = measure(urls, a.broker, a.rounds, a.seconds, a.processes)
                print(f"\n.delay() with ledger_track_sent off and on; {a.rounds} rounds x {a.seconds} s, medians\n")
                print(table(runs))
            finally:
                database._engines.clear()
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
