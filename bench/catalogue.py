"""Task catalogue query times on a large generated log (PostgreSQL or SQLite).

``python -m bench.catalogue URL N_TASKS [--runs 20]`` grows the log with
:func:`bench.rebuild_log.generate_log` (varied payloads: 7 names, 5 workers, 2
queues; half the tasks FAILURE after a retry) to ``N_TASKS`` tasks (5 events per
task), rebuilds the projections (the catalogue's fill is part of the rate
printed), then times each of the issue's questions ``--runs`` times through
``Ledger.tasks`` / ``Ledger.stats`` and prints p50 and max per question. Built
to run at 1,000,000 tasks (5,000,000 events); ``--quick`` sizes are the
operator's choice on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

#: tasks per generated unit of bench.rebuild_log (tasks a and b) and its events
TASKS_PER_UNIT, EVENTS_PER_UNIT = 2, 10


def _timed(fn, runs: int) -> tuple[float, float, int]:
    times, rows = [], 0
    for _ in range(runs):
        t = time.perf_counter()
        rows = len(fn())
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), max(times), rows


def main(argv: list[str] | None = None) -> int:
    from bench.rebuild_log import generate_log
    from ledger.api import Ledger
    from ledger.rebuild import rebuild

    p = argparse.ArgumentParser(prog="python -m bench.catalogue", description=__doc__)
    p.add_argument("url")
    p.add_argument("tasks", type=int)
    p.add_argument("--runs", type=int, default=20)
    a = p.parse_args(argv)
    ledger = Ledger.open(a.url, upgrade=True)
    with ledger.engine.connect() as conn:
        have = conn.execute(sa.text("SELECT COUNT(*) FROM ledger_events")).scalar_one()
    want = a.tasks // TASKS_PER_UNIT * EVENTS_PER_UNIT
    if have < want:
        generate_log(a.url, want - have, variants=50)
    report = rebuild(ledger)
    print(f"rebuild: {report.events:,} events in {report.seconds:.1f}s ({report.rate:,.0f} events/s), "
          f"catalogue {report.rows.get('ledger_tasks', 0):,} tasks")
    if ledger.engine.dialect.name == "postgresql":
        with ledger.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(sa.text("ANALYZE ledger_tasks"))
    now = datetime.now(timezone.utc)
    some_task = ledger.tasks(limit=1)[0].task_id
    questions = {
        "tasks --state FAILURE --since -1h --limit 50":
            lambda: ledger.tasks(state="FAILURE", since=now - timedelta(hours=1), limit=50),
        "tasks --name bench.task3 --limit 50": lambda: ledger.tasks(name="bench.task3", limit=50),
        "tasks --root ID (a one-task workflow)": lambda: ledger.tasks(root=some_task),
        "tasks --worker celery@w2 --since -10m --limit 50":
            lambda: ledger.tasks(worker="celery@w2", since=now - timedelta(minutes=10), limit=50),
        "stats --since -24h": lambda: ledger.stats(since=now - timedelta(hours=24)),
    }
    print(f"\n| question ({ledger.engine.dialect.name}, {report.rows.get('ledger_tasks', 0):,} tasks) | p50 ms | max ms | rows |")
    print("|---|---|---|---|")
    for label, fn in questions.items():
        p50, worst, rows = _timed(fn, a.runs if not label.startswith("stats") else max(3, a.runs // 5))
        print(f"| `{label}` | {p50:.1f} | {worst:.1f} | {rows} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
