"""The task catalogue at scale: its fill rates, its questions, and what its indexes cost stores.

``python -m bench.catalogue URL N_TASKS [--runs 20]`` grows the log with
:func:`bench.rebuild_log.generate_log` (7 names, 5 workers, 2 queues; half the
tasks FAILURE after a retry; 5 events per task, first-seen times spread over
the last 20 hours) to ``N_TASKS`` tasks, then measures, printing a table and
keeping it in ``bench/results/catalogue-<dialect>-<N_TASKS>.json``:

* **back-fill**: the catalogue dropped back to migration 0003 and filled again
  by ``db upgrade`` (0004's fill from the whole log), in log events per second;
* **rebuild** of every projection, events per second;
* **questions**: the issue's ``tasks``/``stats`` questions through
  ``Ledger.tasks``/``Ledger.stats``, p50 and max of ``--runs`` runs (stats: a
  fifth as many). Times are relative to the newest generated task's first-seen
  time, so a log generated once answers the same questions later; ``--root`` asks for a
  20-task workflow appended through the store path once;
* **store cost of the catalogue's indexes** (PostgreSQL, ``--store-seconds`` > 0):
  STARTED+SUCCESS appends per second for ``--store-seconds``, alternately with
  the catalogue's secondary indexes and without them (dropped, then built
  again), ``--rounds`` times each, order rotating; the spread of each side is
  the run's noise.

Built for 1,000,000 tasks (5,000,000 events). Generate once into a database you
keep and pass it again: the log is only topped up. ``--skip-fill`` reuses the
catalogue as it is (questions and store cost only).
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from datetime import timedelta

import sqlalchemy as sa

#: tasks per generated unit of bench.rebuild_log (tasks a and b) and its events
TASKS_PER_UNIT, EVENTS_PER_UNIT = 2, 10
#: how far back the generated first-seen times reach
SPAN_S = 20 * 3600
WORKFLOW_ROOT = "bench-workflow-root"
WORKFLOW_TASKS = 20


def _timed(fn, runs: int) -> dict:
    times, rows = [], 0
    for _ in range(runs):
        t = time.perf_counter()
        rows = len(fn())
        times.append((time.perf_counter() - t) * 1000)
    return {"p50_ms": round(statistics.median(times), 2), "max_ms": round(max(times), 2),
            "runs": runs, "rows": rows}


def _workflow(ledger) -> None:
    """A chain of 20 tasks under one root, stored as a worker stores them (once per log)."""
    from ledger.events import TaskState

    if ledger.tasks(root=WORKFLOW_ROOT, limit=1):
        return
    for i in range(WORKFLOW_TASKS):
        task_id = WORKFLOW_ROOT if i == 0 else f"bench-workflow-{i}"
        common = dict(task_id=task_id, name="bench.workflow_step", root_id=WORKFLOW_ROOT,
                      parent_id=None if i == 0 else WORKFLOW_ROOT, worker="celery@w0", queue="celery")
        ledger.append([TaskState(status="STARTED", **common)])
        ledger.append([TaskState(status="SUCCESS", **common)])


def back_fill(ledger) -> dict:
    """The catalogue refilled from the whole log by migration 0004, as ``db upgrade`` does it."""
    from ledger import migrate

    with ledger.engine.connect() as conn:
        events = conn.execute(sa.text("SELECT COUNT(*) FROM ledger_events")).scalar_one()
    migrate.downgrade(ledger.engine, "0003_catalogue")
    t = time.perf_counter()
    migrate.upgrade(ledger.engine)
    seconds = time.perf_counter() - t
    return {"events": events, "seconds": round(seconds, 1), "events_per_s": round(events / seconds)}


def _analyze(ledger) -> None:
    # As autovacuum would after a bulk load (it may be off): the planner needs row counts.
    with ledger.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(sa.text("ANALYZE ledger_tasks"))


def questions(ledger, runs: int) -> dict:
    # the newest generated task (the workflow and the store-cost tasks come later)
    newest = ledger.tasks(name="bench.task*", limit=1)[0].entry.first_seen
    asked = {
        "tasks --state FAILURE --since -1h --limit 50":
            lambda: ledger.tasks(state="FAILURE", since=newest - timedelta(hours=1), limit=50),
        "tasks --name bench.task3 --limit 50": lambda: ledger.tasks(name="bench.task3", limit=50),
        f"tasks --root ID (a {WORKFLOW_TASKS}-task workflow)": lambda: ledger.tasks(root=WORKFLOW_ROOT),
        "tasks --worker celery@w2 --since -10m --limit 50":
            lambda: ledger.tasks(worker="celery@w2", since=newest - timedelta(minutes=10), limit=50),
        "tasks --slowest 20 --since -1h":
            lambda: ledger.tasks(slowest=20, since=newest - timedelta(hours=1)),
        "stats --since -24h": lambda: ledger.stats(since=newest - timedelta(hours=24)),
    }
    return {label: _timed(fn, max(3, runs // 5) if label.startswith("stats") else runs)
            for label, fn in asked.items()}


def _store_rate(ledger, seconds: float) -> float:
    from ledger.events import TaskState

    prefix, n = uuid.uuid4().hex[:8], 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        fields = dict(task_id=f"store-{prefix}-{n}", name=f"bench.store{n % 7}",
                      worker=f"celery@w{n % 5}", queue="celery")
        ledger.append([TaskState(status="STARTED", **fields)])
        ledger.append([TaskState(status="SUCCESS", **fields)])
        n += 1
    return n / seconds


def store_cost(ledger, seconds: float, rounds: int) -> dict:
    """STARTED+SUCCESS tasks/s with and without the catalogue's secondary indexes, interleaved."""
    with ledger.engine.connect() as conn:
        indexes = [
            (name, definition) for name, definition in conn.execute(sa.text(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'ledger_tasks'"
                " AND indexname <> 'pk_ledger_tasks' ORDER BY indexname"))
        ]
    rates: dict[str, list[float]] = {"with indexes": [], "without indexes": []}
    try:
        for r in range(rounds):
            for side in (("with indexes", "without indexes") if r % 2 == 0 else ("without indexes", "with indexes")):
                with ledger.engine.begin() as conn:
                    present = conn.execute(sa.text(
                        "SELECT count(*) FROM pg_indexes WHERE tablename = 'ledger_tasks'"
                        " AND indexname <> 'pk_ledger_tasks'")).scalar_one()
                    if side == "without indexes" and present:
                        for name, _ in indexes:
                            conn.execute(sa.text(f'DROP INDEX "{name}"'))
                    elif side == "with indexes" and not present:
                        for _, definition in indexes:
                            conn.execute(sa.text(definition))
                rates[side].append(round(_store_rate(ledger, seconds)))
    finally:
        with ledger.engine.begin() as conn:
            for _, definition in indexes:
                conn.execute(sa.text(definition.replace("CREATE INDEX", "CREATE INDEX IF NOT EXISTS", 1)))
    out: dict = {"indexes": [name for name, _ in indexes], "seconds_each": seconds}
    for side, values in rates.items():
        out[side] = {"runs": values, "median": statistics.median(values), "min": min(values), "max": max(values)}
    out["with / without"] = round(out["with indexes"]["median"] / out["without indexes"]["median"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    from bench.kept import keep
    from bench.rebuild_log import generate_log
    from ledger.api import Ledger
    from ledger.rebuild import rebuild

    p = argparse.ArgumentParser(prog="python -m bench.catalogue", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("tasks", type=int)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--skip-fill", action="store_true", help="no back-fill, no rebuild: the catalogue as it is")
    p.add_argument("--store-seconds", type=float, default=3.0, help="0: no store-cost measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-keep", action="store_true", help="print only, keep no results file")
    a = p.parse_args(argv)
    ledger = Ledger.open(a.url, upgrade=True)
    with ledger.engine.connect() as conn:
        have = conn.execute(sa.text("SELECT COUNT(*) FROM ledger_events")).scalar_one()
    want = a.tasks // TASKS_PER_UNIT * EVENTS_PER_UNIT
    measured: dict = {"tasks": a.tasks, "dialect": ledger.engine.dialect.name}
    if have < want:
        t = time.perf_counter()
        generate_log(a.url, want - have, variants=50, span=SPAN_S)
        measured["generated"] = {"events": want - have, "seconds": round(time.perf_counter() - t, 1)}
    if not a.skip_fill:
        measured["back-fill"] = back_fill(ledger)
        print(f"back-fill (migration 0004): {measured['back-fill']}", flush=True)
        report = rebuild(ledger)
        measured["rebuild"] = {"events": report.events, "seconds": round(report.seconds, 1),
                               "events_per_s": round(report.rate), "rows": report.rows}
        print(f"rebuild: {measured['rebuild']}", flush=True)
    _workflow(ledger)
    if ledger.engine.dialect.name == "postgresql":
        _analyze(ledger)
    measured["questions"] = questions(ledger, a.runs)
    print(f"\n| question ({ledger.engine.dialect.name}, {a.tasks:,} tasks) | p50 ms | max ms | rows |")
    print("|---|---|---|---|")
    for label, q in measured["questions"].items():
        print(f"| `{label}` | {q['p50_ms']:.1f} | {q['max_ms']:.1f} | {q['rows']} |")
    if a.store_seconds > 0 and ledger.engine.dialect.name == "postgresql":
        measured["store cost"] = store_cost(ledger, a.store_seconds, a.rounds)
        print(f"\nstore STARTED+SUCCESS, tasks/s: {measured['store cost']}")
    if not a.no_keep:
        print("kept in", keep(f"catalogue-{ledger.engine.dialect.name}-{a.tasks}", measured))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
