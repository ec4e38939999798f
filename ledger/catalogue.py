"""Finding tasks without their id: queries and statistics on the task catalogue.

The catalogue (``ledger_tasks``, folded by :mod:`projections.catalogue`) has one
row per task. :func:`find_tasks` filters it (name exact or glob, state, worker,
queue, exception type, first-seen time range, workflow root, args text) newest
first, or lists the slowest; :func:`task_stats` groups it by name, worker or
queue and computes counts by state, failure and retry rates and duration
percentiles in one SQL statement per question, never a Python loop over tasks.

Durations are named in :data:`DURATIONS`: ``runtime`` (last STARTED to the
ready state) and ``queue_wait`` (from when the task could run -- sent, or its ETA
if later -- to when its attempt began: STARTED, else RECEIVED; never negative).
Each gets its p50/p95/p99/max in :func:`task_stats`, computed by the database.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ledger.audit import decode_value
from ledger.errors import BadFilter
from ledger.events import Encoded
from ledger.store import store_type
from ledger.store.base import MAX_SQL_INT
from ledger.store.schema import LIVE, ProjectionTables
from projections.catalogue import TaskEntry

#: Celery's state of a task that failed for good (its failure rate counts these).
FAILURE = "FAILURE"
RETRY = "RETRY"
PERCENTILES = (0.5, 0.95, 0.99)
GROUP_BY = ("name", "worker", "queue")
#: The durations :func:`task_stats` gives percentiles of (:func:`_duration` defines them).
DURATIONS = ("runtime", "queue_wait")
DEFAULT_LIMIT = 100


@dataclass(frozen=True)
class TaskFilter:
    """What :func:`find_tasks` keeps. Unset fields do not filter."""

    name: str | None = None
    state: Sequence[str] | str | None = None
    worker: str | None = None
    queue: str | None = None
    exception: str | None = None
    #: first-seen time range: since <= first_seen < until
    since: datetime | None = None
    until: datetime | None = None
    root: str | None = None
    args: str | None = None
    #: the N slowest (by runtime) instead of the newest
    slowest: int | None = None
    limit: int | None = DEFAULT_LIMIT
    #: keyset paging, a listed task's (first_seen, task_id): the tasks listed after
    #: it (older), or the ``limit`` listed just before it (newer), still newest first
    before: tuple[datetime, str] | None = None
    after: tuple[datetime, str] | None = None

    def __post_init__(self) -> None:
        for field in ("slowest", "limit"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise BadFilter(f"{field} must be at least 1, not {value}")
        if self.before and self.after:
            raise BadFilter("before and after: page one way at a time")
        if (self.before or self.after) and self.slowest is not None:
            raise BadFilter("before/after page the newest-first list, not --slowest")
        if self.since and self.until and self.since >= self.until:
            raise BadFilter(f"since ({self.since.isoformat()}) is not before until ({self.until.isoformat()})")

    @property
    def states(self) -> list[str]:
        if self.state is None:
            return []
        return [self.state] if isinstance(self.state, str) else list(self.state)


@dataclass(frozen=True)
class CatalogueRow:
    """A task as listed: the catalogue row, its runtime and its chord (if a header part)."""

    entry: TaskEntry
    chord_id: str | None

    @property
    def task_id(self) -> str:
        return self.entry.task_id

    def record(self) -> dict[str, Any]:
        """JSON-ready: ids, state and every catalogue field; args/kwargs decoded
        when JSON or msgpack, else ``<pickle N bytes>`` (never unpickled)."""
        e = self.entry
        out = {"task_id": e.task_id, "name": e.name, "state": e.state}
        out |= {k: v for k, v in asdict(e).items() if k not in ("args", "kwargs", "content_type")}
        for key in ("first_seen", "started_at", "finished_at", "sent_at", "ready_at", "received_at"):
            out[key] = out[key].isoformat() if out[key] else None
        out["runtime"] = e.runtime
        out["queue_wait"] = e.queue_wait
        out["chord_id"] = self.chord_id
        for key in ("args", "kwargs"):
            raw = getattr(e, key)
            out[key] = None if raw is None else decode_value(Encoded(content_type=e.content_type or "", data=raw))[1]
        return out


def find_tasks(conn: Connection, f: TaskFilter, tables: ProjectionTables = LIVE) -> list[CatalogueRow]:
    """The tasks ``f`` keeps, newest first (or slowest first with ``f.slowest``)."""
    t, c = tables.catalogue, tables.chords
    q = sa.select(t, c.c.chord_id.label("chord_of")).select_from(
        t.outerjoin(c, c.c.chord_id == t.c.group_id)
    )
    q = q.where(*_conditions(conn, t, f))
    if f.slowest is not None:
        runtime = _duration(conn, t, "runtime")
        q = q.where(runtime.is_not(None)).order_by(runtime.desc(), t.c.task_id).limit(
            min(f.slowest, f.limit, MAX_SQL_INT) if f.limit else min(f.slowest, MAX_SQL_INT)
        )
    elif f.after is not None:
        # The page just newer than the key: read upwards from it, then turn it over.
        seen, task_id = f.after
        q = q.where(t.c.first_seen >= seen, sa.or_(
            t.c.first_seen > seen, sa.and_(t.c.first_seen == seen, t.c.task_id > task_id)))
        q = q.order_by(t.c.first_seen, t.c.task_id)
    else:
        if f.before is not None:
            # Keyset, not OFFSET: a deep page reads its own rows only. The plain
            # range on first_seen is what the (x, first_seen) indexes can scan.
            seen, task_id = f.before
            q = q.where(t.c.first_seen <= seen, sa.or_(
                t.c.first_seen < seen, sa.and_(t.c.first_seen == seen, t.c.task_id < task_id)))
        q = q.order_by(t.c.first_seen.desc(), t.c.task_id.desc())
    if f.slowest is None and f.limit is not None:
        q = q.limit(min(f.limit, MAX_SQL_INT))
    rows = []
    for row in conn.execute(q):
        values = dict(row._mapping)
        chord_of = values.pop("chord_of")
        rows.append(CatalogueRow(TaskEntry(**values), chord_of))
    return rows[::-1] if f.after is not None else rows


def _conditions(conn: Connection, t: sa.Table, f: TaskFilter) -> list:
    where: list = []
    if f.name is not None:
        where.append(_name_match(t.c.name, f.name))
    if f.states:
        where.append(t.c.state.in_(f.states))
    for column, value in ((t.c.worker, f.worker), (t.c.queue, f.queue), (t.c.exc_type, f.exception)):
        if value is not None:
            where.append(column == value)
    if f.since is not None:
        where.append(t.c.first_seen >= f.since)
    if f.until is not None:
        where.append(t.c.first_seen < f.until)
    if f.root is not None:
        # The whole workflow: the tasks stamped with this root, and the root itself.
        where.append(sa.or_(t.c.root_id == f.root, t.c.task_id == f.root))
    if f.args:
        where.append(sa.or_(_contains(conn, t.c.args, f.args), _contains(conn, t.c.kwargs, f.args)))
    return where


_GLOB = str.maketrans({"*": "%", "?": "_", "%": "\\%", "_": "\\_", "\\": "\\\\"})


def _name_match(column: sa.ColumnElement, pattern: str) -> sa.ColumnElement:
    """Exact unless the pattern holds a glob wildcard (``*`` any run, ``?`` one character)."""
    if "*" not in pattern and "?" not in pattern:
        return column == pattern
    return column.like(pattern.translate(_GLOB), escape="\\")


def _contains(conn: Connection, column: sa.ColumnElement, text: str) -> sa.ColumnElement:
    """The stored bytes contain ``text``'s UTF-8 bytes (JSON and msgpack keep strings as
    UTF-8, so this finds a string argument or a number as written)."""
    return store_type(conn).contains(column, text.encode())


def _seconds(conn: Connection, start: sa.ColumnElement, end: sa.ColumnElement) -> sa.ColumnElement:
    """``end - start`` in seconds as a float (NULL if either is)."""
    return store_type(conn).seconds_between(start, end)


def _duration(conn: Connection, t: sa.Table, name: str) -> sa.ColumnElement:
    """Seconds of one of :data:`DURATIONS` per catalogue row (NULL where not measured):
    the rules of :attr:`TaskEntry.runtime` and :attr:`TaskEntry.queue_wait`."""
    if name == "runtime":
        return _seconds(conn, t.c.started_at, t.c.finished_at)
    wait = _seconds(conn, t.c.ready_at, sa.func.coalesce(t.c.started_at, t.c.received_at))
    # Never negative (the publisher's clock and the database's may differ a little);
    # not greatest(), which would turn NULL (never began) into 0 on PostgreSQL.
    return sa.case((wait < 0, 0.0), else_=wait)


# -- statistics -----------------------------------------------------------------------


@dataclass(frozen=True)
class GroupStats:
    """One group of :func:`task_stats`: counts, rates and duration percentiles (seconds)."""

    key: str | None
    total: int
    states: dict[str, int]
    #: FAILURE / total
    failure_rate: float
    #: tasks that retried at least once (Celery's ``retries`` > 0, or in RETRY now) / total
    retry_rate: float
    #: duration name -> {"p50", "p95", "p99", "max", "count"} (None where nothing was measured)
    durations: dict[str, dict[str, float | None]]

    def record(self) -> dict[str, Any]:
        return asdict(self)


def task_stats(
    conn: Connection,
    *,
    by: str = "name",
    since: datetime | None = None,
    until: datetime | None = None,
    tables: ProjectionTables = LIVE,
) -> list[GroupStats]:
    """Per ``by`` (name, worker or queue) over the tasks first seen in [since, until),
    most tasks first."""
    if by not in GROUP_BY:
        raise BadFilter(f"cannot group by {by!r}; choose from {', '.join(GROUP_BY)}")
    t = tables.catalogue
    where = _conditions(conn, t, TaskFilter(since=since, until=until, limit=None))
    key = t.c[by].label("key")
    retried = sa.or_(t.c.retries > 0, t.c.state == RETRY)
    counts = conn.execute(
        sa.select(
            key, t.c.state, sa.func.count().label("n"),
            sa.func.sum(sa.case((retried, 1), else_=0)).label("retried"),
        ).where(*where).group_by(key, t.c.state)
    ).all()
    groups: dict[str | None, dict[str, Any]] = {}
    for k, state, n, retried_n in counts:  # one row per (group, state), not per task
        g = groups.setdefault(k, {"states": {}, "retried": 0})
        g["states"][state] = n
        g["retried"] += retried_n or 0
    durations = {name: _percentiles(conn, key, where, _duration(conn, t, name)) for name in DURATIONS}
    out = []
    for k, g in groups.items():
        total = sum(g["states"].values())
        out.append(GroupStats(
            key=k,
            total=total,
            states=dict(sorted(g["states"].items())),
            failure_rate=g["states"].get(FAILURE, 0) / total,
            retry_rate=g["retried"] / total,
            durations={name: d.get(k, _no_durations()) for name, d in durations.items()},
        ))
    return sorted(out, key=lambda s: (-s.total, s.key or ""))


def _no_durations() -> dict[str, float | None]:
    return {**{_label(p): None for p in PERCENTILES}, "max": None, "count": 0}


def _label(p: float) -> str:
    return f"p{round(p * 100)}"


def _percentiles(
    conn: Connection, key: sa.ColumnElement, where: list, seconds: sa.ColumnElement
) -> dict[str | None, dict[str, float | None]]:
    """Per group: the duration's percentiles (continuous, as PostgreSQL's
    ``percentile_cont``: linear between the two nearest ranks), max and count."""
    where = [*where, seconds.is_not(None)]
    q = store_type(conn).percentiles(key, seconds, where, {_label(p): p for p in PERCENTILES})
    return {
        row.key: {**{_label(p): _micro(row._mapping[_label(p)]) for p in PERCENTILES},
                  "max": _micro(row.max), "count": row.count}
        for row in conn.execute(q)
    }


def _micro(seconds: float | None) -> float | None:
    # The times are microseconds; the float arithmetic's last digits mean nothing.
    return None if seconds is None else round(seconds, 6)
