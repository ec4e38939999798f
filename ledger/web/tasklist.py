"""The Tasks and Stats pages' data: the task catalogue (:mod:`ledger.catalogue`) as web models.

Paging is newest first by first-seen time, by key, not by offset: a page asks
for the ``limit + 1`` tasks just older (``before``) or just newer (``after``)
than a listed task's (first-seen, id), so any page reads about ``limit`` rows
of an index however deep it is, and no count of the matching tasks is made.
"""

from __future__ import annotations

from datetime import datetime, timezone

from ledger.catalogue import CatalogueRow, GroupStats
from ledger.events import Encoded
from ledger.web.models import (
    StatsOut,
    StatsQuery,
    StatsRow,
    TaskPage,
    TaskQuery,
    TaskRow,
    page_key,
    shown,
)


def find_tasks(ledger, query: TaskQuery) -> TaskPage:
    """One page of the tasks matching ``query``, newest first; ValueError names a bad filter."""
    keys = query.keys()
    rows = ledger.tasks(**query.filters(), **keys, limit=query.limit + 1)
    more = len(rows) > query.limit  # one row beyond the page: another page that way
    if "after" in keys:
        rows = rows[-query.limit:] if more else rows  # the newest-first list's last ones
        older = rows[-1] if rows else None
        newer = rows[0] if more else None
    else:
        rows = rows[:query.limit]
        older = rows[-1] if more else None
        newer = rows[0] if "before" in keys and rows else None
    return TaskPage(
        query=query, tasks=[task_row(r) for r in rows],
        older=None if older is None else page_key(older.entry.first_seen, older.task_id),
        newer=None if newer is None else page_key(newer.entry.first_seen, newer.task_id),
    )


def task_row(row: CatalogueRow) -> TaskRow:
    e = row.entry

    def stored(raw: bytes | None) -> str | None:
        return None if raw is None else shown(Encoded(content_type=e.content_type or "", data=raw))

    return TaskRow(
        task_id=e.task_id, state=e.state, name=e.name, worker=e.worker, queue=e.queue,
        retries=e.retries, root_id=e.root_id, parent_id=e.parent_id, group_id=e.group_id,
        exc_type=e.exc_type, args=stored(e.args), kwargs=stored(e.kwargs),
        seen_at=e.first_seen, started_at=e.started_at, finished_at=e.finished_at,
        runtime_s=e.runtime, sent_at=e.sent_at, ready_at=e.ready_at, received_at=e.received_at,
        queue_wait_s=e.queue_wait, forgotten=e.forgotten, expired=e.expired,
    )


def task_stats(ledger, query: StatsQuery) -> StatsOut:
    """Per name, worker or queue over the tasks first seen in the period."""
    since, until = query.period(datetime.now(timezone.utc))
    groups = ledger.stats(by=query.by, since=since, until=until)
    return StatsOut(since=since, until=until, by=query.by, rows=[stats_row(g) for g in groups])


def stats_row(g: GroupStats) -> StatsRow:
    runtime = g.durations.get("runtime", {})
    wait = g.durations.get("queue_wait", {})
    return StatsRow(
        name=g.key if g.key is not None else "(none)", total=g.total, states=g.states,
        failure_rate=g.failure_rate, retry_rate=g.retry_rate,
        runtime_p50=runtime.get("p50"), runtime_p95=runtime.get("p95"),
        runtime_p99=runtime.get("p99"), runtime_max=runtime.get("max"),
        queue_wait_p50=wait.get("p50"), queue_wait_p95=wait.get("p95"), queue_wait_p99=wait.get("p99"),
        queue_wait_max=wait.get("max"),
    )
