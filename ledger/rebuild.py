"""Operating on projections: ``rebuild`` (blue/green), ``verify``, ``prune``.

rebuild
    Fills fresh tables (``ledger_task_meta__rebuild`` ...) from the log with the
    set-based statements of :func:`ledger.store.target.rebuild_statements`, then swaps
    them in for the live tables in one short transaction. Reads and writes keep
    being served from the live tables throughout; both pause only for the swap.

    PostgreSQL, concurrent writers (the reasoning, step by step; the statements
    are :meth:`ledger.store.postgres.PostgresStore.rebuild`'s):

    1. The fill runs in a REPEATABLE READ transaction whose first statement
       returns its snapshot ``S`` (``pg_current_snapshot()``). Every statement of
       the fill sees exactly the events visible in ``S``, and so do we later.
    2. Every log row stores the xid of the transaction that appended it
       (``tx_id``), so "the events the fill did not include" is exactly
       ``NOT pg_visible_in_snapshot(tx_id, S)``: events of transactions that
       were running at ``S`` (``xip``) or began after it (``>= xmax``) — not
       merely "position > max position seen", which would lose an event whose
       transaction took a lower position but committed after ``S``.
    3. Catch-up passes apply those events to the new tables with the *live*
       statements (:class:`ledger.store.target.SqlTarget`), writing the rebuilt
       tables only (a partial rebuild leaves the others to the writers), each pass in its own
       REPEATABLE READ transaction whose snapshot becomes the next ``S``, until
       a pass is small. Per stream, ``(tx_id, position)`` order is version order
       (ledger.store.postgres guarantees it), and every projection is per stream, so
       applying in that order reproduces what the live path computed.
    4. The swap transaction locks the live projection tables (see
       ``PostgresStore._swap`` for why ``ACCESS EXCLUSIVE`` and how it avoids
       deadlocks); readers pause for this short transaction; writers block at their
       projection update — which every append does in the transaction of its
       events — so once we hold the lock, no transaction that touches a
       projection can commit. A last catch-up (READ COMMITTED, statement
       snapshot taken after the lock) therefore sees every event that will ever
       be committed before the swap, and a writer blocked on the lock updates
       the *new* table after the swap (PostgreSQL re-resolves a relation name
       when the table it waited for was dropped). Then: drop live, rename new
       to live, rename its primary key and indexes to the names of the Alembic
       model, commit.

    Costs: the fill's snapshot is an open transaction, so it holds followers
    (relay, ``follow``) back for the fill's duration, as any long reader does;
    the swap holds writers for the last catch-up plus the renames, and gives up
    after ``SWAP_LOCK_TIMEOUT`` (rolling back) rather than stall the application
    behind a long reader. One rebuild runs at a time (an advisory lock), and never
    beside a prune (another one, held by the rebuild for its whole run and by a
    prune for its transaction): a prune committed after ``S`` would be undone by the
    swap, its tables filled before it. A failed or interrupted rebuild drops its
    new tables.

    SQLite has one writer at a time: the whole rebuild runs in one
    ``BEGIN IMMEDIATE`` transaction (writers wait for it; readers continue in WAL
    mode), and the new tables are created from the live tables' own DDL
    (:meth:`ledger.store.sqlite.SQLiteStore.rebuild`).

verify
    Rebuilds into temporary tables and compares them with the live tables, all
    in one snapshot (:attr:`ledger.store.base.MaintainableStore.snapshot_options`),
    so a busy ledger verifies clean. Differences are computed with SQL
    ``EXCEPT`` and only the differing rows are read into Python.

prune
    Physically deletes events before a time, keeping what the live projections
    need so that a rebuild still reproduces them (see :func:`prune`), and records
    a ``ledger.pruned`` event in the same transaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ledger.errors import RebuildError
from ledger.events import (
    CHORD,
    TASK,
    ChordPartReturned,
    CorruptEvent,
    GroupSaved,
    LogPruned,
    NewEvent,
    TaskState,
    event_problem,
    stream_key,
    stream_kind,
)
from ledger.store.base import EncodedEvent, MaintainableStore
from ledger.store.schema import LIVE, NAMING, ProjectionTables, checkpoints
from ledger.store.schema import events as events_table
from ledger.store.target import CatalogueFill, catalogue_select, rebuild_statements, run_fill
from projections import REGISTRY
from projections.memory import Snapshot

REBUILD_SUFFIX = "__rebuild"
VERIFY_SUFFIX = "__verify"


@dataclass
class RebuildReport:
    projections: list[str]
    events: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    caught_up: int = 0
    swap_attempts: int = 1
    fill_seconds: float = 0.0
    swap_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        """Log events rebuilt per second, end to end."""
        return self.events / self.seconds if self.seconds > 0 else 0.0


def _names(projections: Sequence[str] | None) -> list[str]:
    # A projection named twice is rebuilt once (its tables were made twice, then
    # swapped in twice: the second swap found its new table gone).
    names = list(dict.fromkeys(projections)) if projections else list(REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(
            f"unknown projection {', '.join(map(repr, unknown))}; choose from {', '.join(REGISTRY)}"
        )
    return names


def _slots(names: Sequence[str]) -> list[str]:
    return [table for n in names for table in REGISTRY[n].tables]


def _prefixes(names: Sequence[str]) -> list[str]:
    return [prefix for n in names for prefix in REGISTRY[n].stream_prefixes]


def _mixed(new: ProjectionTables, slots: Sequence[str]) -> ProjectionTables:
    """New tables for the rebuilt slots, live ones elsewhere: read, never written (a
    catch-up's target writes the rebuilt slots only: ``SqlTarget(..., slots)``)."""
    return ProjectionTables(**{
        s: getattr(new if s in slots else LIVE, s)
        for s in ("task_meta", "groups", "chords", "chord_parts", "chord_counts", "catalogue")
    })


# -- rebuild ---------------------------------------------------------------------------


def rebuild(ledger, projections: Sequence[str] | None = None, progress=None) -> RebuildReport:
    """Recompute projections from the log and swap them in atomically (module docstring)."""
    names = _names(projections)
    ledger.require_schema()
    report = RebuildReport(projections=names)
    started = time.perf_counter()
    ledger.store.rebuild(_Plan(ledger.store, names, report, progress, ledger.write))
    report.seconds = time.perf_counter() - started
    return report


@dataclass
class _Plan:
    """A rebuild of ``names`` as the store runs it (:class:`ledger.store.base.RebuildPlan`)."""

    store: MaintainableStore
    names: Sequence[str]
    report: RebuildReport
    progress: object
    write: Callable

    def __post_init__(self) -> None:
        self.slots = _slots(self.names)
        self.prefixes = _prefixes(self.names)
        self.new = ProjectionTables.define(sa.MetaData(naming_convention=NAMING), REBUILD_SUFFIX)

    def count_events(self, conn: Connection) -> int:
        return _count_events(conn, self.names)

    def statements(self, conn: Connection, tables: ProjectionTables, slots: Sequence[str]) -> list:
        return _statements(self.store, tables, slots)

    def run_fill(self, conn: Connection, stmt: sa.Executable | CatalogueFill) -> None:
        try:
            run_fill(conn, stmt, type(self.store))
        except CorruptEvent as exc:
            raise RebuildError(_corruption_message([str(exc)])) from exc

    def fill(self, conn: Connection) -> None:
        report, progress = self.report, self.progress
        report.events = self.count_events(conn)
        if progress is not None:
            progress.total = report.events
        statements = self.statements(conn, self.new, self.slots)
        for _, stmt in statements:
            self.run_fill(conn, stmt)
            if progress is not None:
                progress.advance(report.events // len(statements))

    def payload_problems(self, conn: Connection, slots: Sequence[str]) -> list[str]:
        return _corrupt_payloads(conn, self.new, slots)

    def corruption(self, problems: list[str]) -> RebuildError:
        return RebuildError(_corruption_message(problems))

    def mixed(self) -> ProjectionTables:
        return _mixed(self.new, self.slots)


def _statements(
    store: MaintainableStore, tables: ProjectionTables, slots: Sequence[str]
) -> list[tuple[str, sa.Executable | CatalogueFill]]:
    by_table = {getattr(tables, s).name: s for s in slots}
    out = []
    for stmt in rebuild_statements(store.rebuild_source(), tables):
        slot = by_table.get(stmt.table.name)  # type: ignore[attr-defined]
        if slot is not None:
            out.append((slot, stmt))
    return out


def _count_events(conn: Connection, names: Sequence[str]) -> int:
    """Events the rebuild of ``names`` reads (the whole log for a full rebuild)."""
    e = events_table
    q = sa.select(sa.func.count()).select_from(e)
    if set(names) != set(REGISTRY):
        q = q.where(sa.or_(*(e.c.stream_id.like(f"{p}:%") for p in _prefixes(names))))
    return conn.execute(q).scalar_one()


#: Rebuilt tables whose rows carry an event's payload: slot -> (key column, event model).
_PAYLOAD_SLOTS = {"task_meta": ("task_id", TaskState), "groups": ("group_id", GroupSaved)}


def _corrupt_payloads(conn: Connection, tables: ProjectionTables, slots: Sequence[str]) -> list[str]:
    """Rows about to be served that are not valid events (rebuild copies bytes set-based).

    Each is validated as the live path validates it (its pydantic model, ~9 µs
    a row; msgpack alone let ``{"task_id": ...}`` without a state through, to
    crash ``show`` and ``get()`` later). Only the rows a projection serves are
    checked here; ``verify`` checks every event of the log.
    """
    problems = []
    for slot, (key_field, model) in _PAYLOAD_SLOTS.items():
        if slot not in slots:
            continue
        t = getattr(tables, slot)
        rows = conn.execute(
            sa.select(t.c[key_field], t.c.position, t.c.payload).execution_options(yield_per=5000)
        )
        for key, position, payload in rows:
            stream_id = f"{model.stream_prefix}:{key}"
            problem = event_problem(model.type, model.schema_version, payload)
            if problem is not None:
                problems.append(f"corrupt event at log position {position} ({stream_id}): {problem}")
    return problems


def _corruption_message(problems: list[str]) -> str:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return (
        f"{problems[0]}{more}; rebuild stopped, the live projections are unchanged. "
        "Restore the event from a backup, or append a correcting event for the stream."
    )


def _corrupt_events(conn: Connection) -> list[str]:
    """Every event of the log that is not a valid event of its type (verify's full scan)."""
    e = events_table
    rows = conn.execute(
        sa.select(e.c.position, e.c.stream_id, e.c.type, e.c.schema_version, e.c.payload)
        .order_by(e.c.position)
        .execution_options(yield_per=5000)
    )
    return [
        f"corrupt event at log position {position} ({stream_id}): {problem}"
        for position, stream_id, type_, version, payload in rows
        if (problem := event_problem(type_, version, payload)) is not None
    ]


def _version_gaps(ledger, conn: Connection) -> list[str]:
    """Stream versions missing from the log that no prune explains (verify).

    Versions are 1, 2, 3... per stream, so a deleted event leaves a gap even
    where the projections still match (deleting a task's STARTED changes no
    row). A gap is a prune's when that prune came after the event before the
    gap and listed the stream (or listed too many streams to name them all).
    """
    e = events_table
    w = {"partition_by": e.c.stream_id, "order_by": e.c.stream_version}
    versions = sa.select(
        e.c.stream_id, e.c.stream_version, e.c.position,
        sa.func.lag(e.c.stream_version).over(**w).label("prev_version"),
        sa.func.lag(e.c.position).over(**w).label("prev_position"),
    ).where(~e.c.stream_id.like("ledger:%")).subquery()
    gaps = conn.execute(
        sa.select(versions).where(
            versions.c.stream_version - sa.func.coalesce(versions.c.prev_version, 0) > 1
        ).order_by(versions.c.position)
    ).all()
    if not gaps:
        return []
    prunes = [
        (event.position, set(event.data.streams), len(event.data.streams) >= PRUNED_STREAMS_LISTED)
        for event in ledger.log.read_stream(conn, f"{LogPruned.stream_prefix}:maintenance")
    ]
    out = []
    for stream_id, version, position, prev_version, prev_position in gaps:
        if any(at > (prev_position or 0) and (stream_id in streams or truncated)
               for at, streams, truncated in prunes):
            continue
        first = (prev_version or 0) + 1
        missing = f"version {first}" if first == version - 1 else f"versions {first}..{version - 1}"
        out.append(
            f"stream-version gap at log position {position} ({stream_id}): {missing} missing, "
            "deleted outside prune"
        )
    return out


# -- verify ---------------------------------------------------------------------------

_KEYS = {
    "task_meta": ("task_id",),
    "groups": ("group_id",),
    "chords": ("chord_id",),
    "chord_parts": ("chord_id", "task_id"),
    "chord_counts": ("chord_id",),
    "catalogue": ("task_id",),
}


#: What verify counts, by kind (the JSON summary's ``counts`` keys): bad events in the
#: log, and differing rows per projection table.
VERIFY_KINDS = (
    "corrupt_events", "version_gaps", "task_meta", "groups", "chords", "chord_parts", "chord_counts"
)


@dataclass
class VerifyReport:
    """What ``verify`` found: every difference counted by kind, the first ``limit`` described."""

    counts: dict[str, int]
    differences: list[str]
    limit: int | None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def hint(self) -> str | None:
        """What to do next, or None when the projections match the log."""
        if not self.total:
            return None
        hints = []
        if any(self.counts[k] for k in VERIFY_KINDS[2:]):
            hints.append("run `celery-ledger rebuild` to replace the live projections with the log's")
        if self.counts["corrupt_events"] or self.counts["version_gaps"]:
            hints.append("the log itself was changed: restore the events from a backup "
                         "(rebuild refuses to serve a corrupt event)")
        return "; ".join(hints)

    def to_json(self) -> dict:
        return {
            "clean": not self.total,
            "total": self.total,
            "counts": self.counts,
            "shown": len(self.differences),
            "differences": self.differences,
            "hint": self.hint,
        }


def verify(ledger, projections: Sequence[str] | None = None) -> list[str]:
    """Every difference between the live projections and a rebuild from the log (none: [])."""
    return verify_report(ledger, projections).differences


def verify_report(
    ledger, projections: Sequence[str] | None = None, *, limit: int | None = None
) -> VerifyReport:
    """Compare the live projections and the log with a rebuild; describe the first ``limit``.

    Differences are counted in SQL and only the first ``limit`` of each kind are
    read and described, so a ledger where every row differs verifies as fast as
    one where none does (each described difference costs two point reads).
    """
    names = _names(projections)
    slots = _slots(names)
    ledger.require_schema()
    scratch = ProjectionTables.define(sa.MetaData(), VERIFY_SUFFIX)
    store = ledger.store
    with ledger.engine.connect() as conn:
        conn = conn.execution_options(**store.snapshot_options)
        with conn.begin() as tx:
            made = []
            try:
                for slot in slots:
                    store.create_scratch_table(conn, getattr(LIVE, slot), getattr(scratch, slot))
                    made.append(slot)
                corrupt, gaps = _corrupt_events(conn), _version_gaps(ledger, conn)
                # A corrupt payload stops the catalogue's fill; the lines above say where.
                usable = [s for s in slots if not (corrupt and s == "catalogue")]
                for _, stmt in _statements(store, scratch, usable):
                    run_fill(conn, stmt, type(store))
                counts, rows = _differences(store, conn, scratch, usable, limit)
            finally:
                # Also when verify failed: SQLite's temporary tables outlive the
                # transaction, on the pooled connection the next verify gets.
                for slot in made:
                    store.drop_scratch_table(conn, getattr(scratch, slot))
            tx.rollback()
    counts = {"corrupt_events": len(corrupt), "version_gaps": len(gaps), **counts}
    described = corrupt[:limit] + gaps[:limit] + rows
    return VerifyReport(counts, described[:limit] if limit is not None else described, limit)


def _differing_keys(
    conn: Connection, expected: sa.Table, live: sa.Table, slot: str, limit: int | None
) -> tuple[int, list[tuple]]:
    """How many keys differ between the tables, and the first ``limit`` of them (sorted)."""
    a, b = _comparable(expected, slot), _comparable(live, slot)
    keys = _KEYS[slot]
    both = sa.union(*(
        sa.select(*(sub.c[k] for k in keys))
        for sub in (a.except_(b).subquery(), b.except_(a).subquery())
    )).subquery()
    count = conn.execute(sa.select(sa.func.count()).select_from(both)).scalar_one()
    first = sa.select(*(both.c[k] for k in keys)).order_by(*(both.c[k] for k in keys))
    if limit is not None:
        first = first.limit(limit)
    return count, [tuple(r) for r in conn.execute(first)] if count else []


def _comparable(table: sa.Table, slot: str) -> sa.Select:
    """The rows of a projection table as a rebuild must reproduce them: every column,
    but a chord's count as its sum (its rows are per writer live, one after a rebuild)."""
    if slot == "chord_counts":
        return sa.select(table.c.chord_id, sa.func.sum(table.c.returned).label("returned")).group_by(
            table.c.chord_id
        )
    return sa.select(*table.c)


def _chord_count(conn: Connection, table: sa.Table, chord_id: str) -> int:
    return conn.execute(
        sa.select(sa.func.coalesce(sa.func.sum(table.c.returned), 0)).where(table.c.chord_id == chord_id)
    ).scalar_one()


def _differences(
    store: MaintainableStore, conn: Connection, scratch: ProjectionTables, slots: Sequence[str],
    limit: int | None,
) -> tuple[dict[str, int], list[str]]:
    """Differing rows counted per projection, and the first ``limit`` described."""
    expected, found = Snapshot(), Snapshot()
    exp_target, live_target = store.target_for(_mixed(scratch, slots)), store.target
    counts = dict.fromkeys(VERIFY_KINDS[2:], 0)
    keys: dict[str, list[tuple]] = {}
    for slot in slots:
        counts[slot], keys[slot] = _differing_keys(
            conn, getattr(scratch, slot), getattr(LIVE, slot), slot, limit
        )
    for (task_id,) in keys.get("task_meta", ()):
        _put(expected.task_meta, task_id, exp_target.task(conn, task_id))
        _put(found.task_meta, task_id, live_target.task(conn, task_id))
    for (group_id,) in keys.get("groups", ()):
        _put(expected.groups, group_id, exp_target.group(conn, group_id))
        _put(found.groups, group_id, live_target.group(conn, group_id))
    for (task_id,) in sorted(keys.get("catalogue", ())):
        _put(expected.catalogue, task_id, exp_target.catalogue_entry(conn, task_id))
        _put(found.catalogue, task_id, live_target.catalogue_entry(conn, task_id))
    chord_ids = {k[0] for k in keys.get("chords", ())} | {k[0] for k in keys.get("chord_parts", ())}
    for chord_id in sorted(chord_ids):
        _put(expected.chords, chord_id, exp_target.chord(conn, chord_id))
        _put(found.chords, chord_id, live_target.chord(conn, chord_id))
    miscounted = [
        f"chord_counts[{chord_id!r}]: expected {_chord_count(conn, scratch.chord_counts, chord_id)} "
        f"parts, found {_chord_count(conn, LIVE.chord_counts, chord_id)}"
        for (chord_id,) in keys.get("chord_counts", ())
    ]
    return counts, expected.differences(found) + miscounted


def _put(table: dict, key: str, value) -> None:
    if value is not None:
        table[key] = value


# -- prune -----------------------------------------------------------------------------


@dataclass
class PruneReport:
    before: datetime
    events_deleted: int
    streams: list[str]
    kept_for_projections: int
    #: Nothing was deleted: what a prune would delete now.
    dry_run: bool = False
    #: The follower checkpoint that stopped the prune short, and what it kept.
    held_by: str | None = None
    kept_for_followers: int = 0

    def summary(self) -> list[str]:
        """What the prune did (or would do), in lines for people."""
        verb = "would prune" if self.dry_run else "pruned"
        lines = [
            f"{verb} {self.events_deleted:,} events recorded before {self.before.isoformat()} "
            f"from {len(self.streams):,} streams; kept {self.kept_for_projections:,} older events "
            "that live projections or followers still need"
        ]
        if self.held_by is not None:
            lines.append(
                f"stopped short: follower {self.held_by!r} has not read {self.kept_for_followers:,} "
                "of those older events yet; they are kept until its checkpoint passes them "
                "(delete its row in ledger_checkpoints if that follower is gone for good)"
            )
        return lines


#: At most this many stream ids are listed in the ``ledger.pruned`` event.
PRUNED_STREAMS_LISTED = 10_000


def prune(ledger, before: datetime, *, dry_run: bool = False) -> PruneReport:
    """Delete events recorded before ``before``; rebuild and verify stay consistent.

    Kept, whatever their age:

    * the event each live ``ledger_task_meta`` / ``ledger_groups`` row points to
      (``position``): with everything older in its stream gone, a rebuild picks
      exactly that event again — it is the first SUCCESS of its life, or the last
      state, and no older tombstone remains to end its life;
    * every event of a chord stream and of its parts' streams unless all of them
      are older than ``before`` and the chord completed: a chord counter needs
      all its parts.
      A completed, fully pruned chord loses its counter rows too, in the same
      transaction, so the live tables still equal a rebuild;
    * the ``ledger:*`` maintenance streams (the record of earlier prunes);
    * every event a follower with a checkpoint in ``ledger_checkpoints`` (the
      Kafka relay) has not read yet: the cutoff never passes the first event
      after the oldest checkpoint in follow order, so the relay still sends
      everything (the report names the checkpoint that held the prune back).

    ``dry_run=True`` counts what would be deleted and changes nothing.

    The catalogue rows of the task streams cut are folded again from what is
    left (a task whose events all went leaves the catalogue too).

    The cutoff is a *position*, the first event recorded at or after ``before``,
    because PostgreSQL stamps ``recorded_at`` with the transaction's start time
    and times are therefore not strictly in position order. The projection
    tables are locked against writers (``SHARE`` mode; readers continue) for the
    prune so that the rows deciding what is kept cannot move meanwhile, in the
    order writers take them (:data:`ledger.store.target.WRITE_ORDER`), after
    waiting for a running rebuild (:meth:`ledger.store.base.MaintainableStore.lock_for_prune`).
    """
    T, e = LIVE, events_table
    ledger.require_schema()

    store = ledger.store

    def work(conn: Connection) -> PruneReport:
        if not dry_run:
            store.lock_for_prune(conn)
        cutoff = conn.execute(
            sa.select(sa.func.min(e.c.position)).where(e.c.recorded_at >= before)
        ).scalar()
        if cutoff is None:
            cutoff = conn.execute(sa.select(sa.func.coalesce(sa.func.max(e.c.position), 0))).scalar_one() + 1
        time_cutoff = cutoff
        held_by, unread = _oldest_follower(conn)
        if unread is not None and unread < cutoff:
            cutoff = unread  # a position cutoff keeps the chord and pinning rules whole
        else:
            held_by = None
        key = sa.func.substr(e.c.stream_id, 7)  # after "group:" / "chord:"
        task_key = sa.func.substr(e.c.stream_id, 6)  # after "task:"
        old = e.c.position < cutoff
        pinned_task = sa.exists().where(T.task_meta.c.task_id == task_key, T.task_meta.c.position == e.c.position)
        pinned_group = sa.exists().where(T.groups.c.group_id == key, T.groups.c.position == e.c.position)
        later, parts = e.alias("later"), T.chord_parts

        def chord_alive(chord_id: sa.ColumnElement) -> sa.ColumnElement:
            """A chord whose stream or parts' streams (``part:``, the chord in ref_id)
            have an event at or after the cutoff, or that is incomplete, stays whole:
            its counter still needs every part."""
            counted = (
                sa.select(sa.func.count()).where(parts.c.chord_id == chord_id)
                .correlate_except(parts).scalar_subquery()
            )
            return sa.or_(
                sa.exists().where(later.c.stream_id == sa.literal("chord:") + chord_id, later.c.position >= cutoff),
                sa.exists().where(
                    later.c.ref_id == chord_id, later.c.type == ChordPartReturned.type,
                    later.c.stream_id.like("part:%"), later.c.position >= cutoff,
                ),
                sa.exists().where(
                    T.chords.c.chord_id == chord_id,
                    sa.or_(T.chords.c.size.is_(None), counted < T.chords.c.size),
                ),
            )

        doomed = sa.and_(
            old,
            ~e.c.stream_id.like("ledger:%"),
            sa.or_(
                sa.and_(e.c.stream_id.like("task:%"), ~pinned_task),
                sa.and_(e.c.stream_id.like("group:%"), ~pinned_group),
                sa.and_(e.c.stream_id.like("chord:%"), ~chord_alive(key)),
                sa.and_(e.c.stream_id.like("part:%"), ~chord_alive(e.c.ref_id)),
            ),
        )
        affected = [r[0] for r in conn.execute(
            sa.select(e.c.stream_id).where(doomed).group_by(e.c.stream_id).order_by(e.c.stream_id)
        )]
        kept = conn.execute(
            sa.select(sa.func.count()).where(old, ~e.c.stream_id.like("ledger:%"), ~doomed)
        ).scalar_one()
        for_followers = 0 if held_by is None else conn.execute(
            sa.select(sa.func.count()).where(
                e.c.position >= cutoff, e.c.position < time_cutoff, ~e.c.stream_id.like("ledger:%")
            )
        ).scalar_one()
        if dry_run:
            deleted = conn.execute(sa.select(sa.func.count()).where(doomed)).scalar_one()
            return PruneReport(before, deleted, affected, kept, True, held_by, for_followers)
        gone_chords = sorted(
            {stream_key(s) for s in affected if stream_kind(s) == CHORD}
            | {r[0] for r in conn.execute(
                sa.select(e.c.ref_id).where(doomed, e.c.stream_id.like("part:%")).distinct()
            )}
        )
        store.allow_prune(conn)
        deleted = conn.execute(sa.delete(e).where(doomed)).rowcount
        for i in range(0, len(gone_chords), 500):
            chunk = gone_chords[i : i + 500]
            conn.execute(sa.delete(T.chord_parts).where(T.chord_parts.c.chord_id.in_(chunk)))
            conn.execute(sa.delete(T.chord_counts).where(T.chord_counts.c.chord_id.in_(chunk)))
            conn.execute(sa.delete(T.chords).where(T.chords.c.chord_id.in_(chunk)))
        # The catalogue describes what the log keeps: a cut task's row is folded
        # again from its remaining events (first seen, flags), or goes with them.
        cut_tasks = [s for s in affected if stream_kind(s) == TASK]
        for i in range(0, len(cut_tasks), 500):
            chunk = cut_tasks[i : i + 500]
            keys = [stream_key(s) for s in chunk]
            conn.execute(sa.delete(T.catalogue).where(T.catalogue.c.task_id.in_(keys)))
            CatalogueFill(T.catalogue, catalogue_select(e, streams=chunk), whole_log=False).run(conn, type(store))
        if deleted:  # a prune that changed nothing is no event: cron's hourly run adds none
            record = LogPruned(
                before=before, events_deleted=deleted, streams=affected[:PRUNED_STREAMS_LISTED]
            )
            recorded, _ = ledger.log.append(conn, [EncodedEvent.of(NewEvent(record))])
            ledger.target.apply(conn, recorded)
        return PruneReport(before, deleted, affected, kept, False, held_by, for_followers)

    return ledger.read(work) if dry_run else ledger.write(work)


def _oldest_follower(conn: Connection) -> tuple[str | None, int | None]:
    """The checkpoint furthest behind in follow order, and the first position it has not read.

    Follow order is ``(tx_id, position)`` (position alone on SQLite, where tx_id
    is 0); an event a follower has not read may have a lower position than its
    checkpoint on PostgreSQL, hence the smallest position among the unread.
    """
    c, e = checkpoints, events_table
    row = conn.execute(
        sa.select(c.c.name, c.c.tx_id, c.c.position).order_by(c.c.tx_id, c.c.position).limit(1)
    ).first()
    if row is None:
        return None, None
    unread = conn.execute(
        sa.select(sa.func.min(e.c.position)).where(
            sa.tuple_(e.c.tx_id, e.c.position) > sa.tuple_(row.tx_id, row.position)
        )
    ).scalar()
    return row.name, unread

