"""The Tasks and Stats pages' data, from what the facade offers until the catalogue lands.

Provisional: the task catalogue (``Ledger.tasks()``/``Ledger.stats()``, issue 16)
is being built beside this console. Until it is on main, the Tasks page lists
the task-meta projection newest first (by the log position of each task's
effective event), filtering by state and time in SQL and by the other fields
after decoding each row, scanning at most :data:`SCAN_LIMIT` rows per request;
Stats folds the period's ``task.state`` events (at most :data:`STATS_EVENTS`).
Forgotten and expired tasks have no task-meta row and are not listed. Both say so
in their ``note`` when they stopped short.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections import Counter
from datetime import datetime, timezone

import sqlalchemy as sa

from ledger.events import TaskState, decode
from ledger.web.models import StatsOut, StatsQuery, StatsRow, TaskPage, TaskQuery, TaskRow, shown

SCAN_LIMIT = 20_000
STATS_EVENTS = 200_000
_BATCH = 1000


def find_tasks(ledger, query: TaskQuery) -> TaskPage:
    """One page of the tasks matching ``query``, newest first."""
    meta, log = ledger.target.t.task_meta, ledger.log.table
    q = (sa.select(meta.c.task_id, meta.c.status, meta.c.position, meta.c.payload, log.c.recorded_at)
         .join(log, log.c.position == meta.c.position).order_by(meta.c.position.desc()))
    if query.state:
        q = q.where(meta.c.status == query.state.upper())
    if query.since:
        q = q.where(log.c.recorded_at >= query.since)
    if query.until:
        q = q.where(log.c.recorded_at < query.until)
    skip = (query.page - 1) * query.limit
    want = skip + query.limit + 1
    found: list[TaskRow] = []
    scanned, before = 0, None
    while len(found) < want and scanned < SCAN_LIMIT:
        batch = q if before is None else q.where(meta.c.position < before)
        rows = ledger._read(lambda c, b=batch: c.execute(b.limit(_BATCH)).all())
        for row in rows:
            task = _row(row)
            if _matches(task, query):
                found.append(task)
        scanned += len(rows)
        if len(rows) < _BATCH:
            break
        before = rows[-1].position
    note = None
    if len(found) < want and scanned >= SCAN_LIMIT:
        note = f"searched the {SCAN_LIMIT:,} most recent tasks only (the catalogue will search all)"
    return TaskPage(query=query, tasks=found[skip: skip + query.limit],
                    has_more=len(found) > skip + query.limit, note=note)


def _row(row) -> TaskRow:
    data: TaskState = decode(TaskState.type, TaskState.schema_version, row.payload)  # type: ignore[assignment]
    exc_type = data.exc_type
    if exc_type is None and data.status == "FAILURE":
        decoded = shown(data.result) or ""
        exc_type = json.loads(decoded).get("exc_type") if decoded.startswith("{") else None
    return TaskRow(
        task_id=row.task_id, state=row.status, name=data.name, worker=data.worker,
        queue=data.queue, retries=data.retries, root_id=data.root_id, parent_id=data.parent_id,
        group_id=data.group_id, exc_type=exc_type, args=shown(data.args), kwargs=shown(data.kwargs),
        seen_at=row.recorded_at.astimezone(timezone.utc),
    )


def _matches(task: TaskRow, q: TaskQuery) -> bool:
    if q.name and not (fnmatch.fnmatchcase(task.name or "", q.name) if any(c in q.name for c in "*?[")
                       else task.name == q.name):
        return False
    if q.worker and task.worker != q.worker:
        return False
    if q.queue and task.queue != q.queue:
        return False
    if q.exception and task.exc_type != q.exception:
        return False
    if q.root and q.root not in (task.root_id, task.task_id):
        return False
    return not (q.args and q.args not in f"{task.args or ''} {task.kwargs or ''}")


def task_stats(ledger, query: StatsQuery) -> StatsOut:
    """Per task name over the period, from the period's ``task.state`` events."""
    since, until = query.period(datetime.now(timezone.utc))
    log = ledger.log.table
    q = (sa.select(log.c.stream_id, log.c.task_state, log.c.recorded_at, log.c.payload)
         .where(log.c.type == TaskState.type, log.c.recorded_at >= since, log.c.recorded_at < until)
         .order_by(log.c.position).limit(STATS_EVENTS))
    rows = ledger._read(lambda c: c.execute(q).all())
    names: dict[str, str] = {}
    final: dict[str, str] = {}
    retried: set[str] = set()
    started: dict[str, datetime] = {}
    ended: dict[str, datetime] = {}
    for stream_id, state, at, payload in rows:
        if stream_id not in names:
            names[stream_id] = decode(TaskState.type, TaskState.schema_version, payload).name or "(unnamed)"  # type: ignore[attr-defined]
        if final.get(stream_id) != "SUCCESS":  # SUCCESS is sticky (Celery's rule)
            final[stream_id] = state
        if state == "RETRY":
            retried.add(stream_id)
        if state == "STARTED":
            started[stream_id] = at  # the last attempt's start
        if state in ("SUCCESS", "FAILURE", "REVOKED"):
            ended.setdefault(stream_id, at)
    by_name: dict[str, list[str]] = {}
    for stream_id, name in names.items():
        by_name.setdefault(name, []).append(stream_id)
    out = []
    for name, streams in sorted(by_name.items()):
        states = Counter(final[s] for s in streams)
        runtimes = sorted((ended[s] - started[s]).total_seconds() for s in streams
                          if s in started and s in ended and ended[s] >= started[s])
        out.append(StatsRow(
            name=name, total=len(streams), states=dict(states),
            failure_rate=states.get("FAILURE", 0) / len(streams),
            retry_rate=sum(s in retried for s in streams) / len(streams),
            runtime_p50=_rank(runtimes, 50), runtime_p95=_rank(runtimes, 95),
            runtime_p99=_rank(runtimes, 99), runtime_max=runtimes[-1] if runtimes else None,
        ))
    note = f"only the period's first {STATS_EVENTS:,} events were counted" if len(rows) >= STATS_EVENTS else None
    return StatsOut(since=since, until=until, rows=out, note=note)


def _rank(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]
