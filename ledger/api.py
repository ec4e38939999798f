"""The Ledger facade: append (with inline projections, one transaction), reads, history.

    >>> ledger = Ledger.open("sqlite:///ledger.db", upgrade=True)
    >>> ledger.append([TaskState(task_id="t1", status="STARTED")])
    >>> ledger.task_meta("t1").status
    'STARTED'

A writer always reads its own writes: the projection rows are updated in the
transaction that appends the events.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ledger.errors import (
    BadFilter,
    EventTooLarge,
    RetryableConflict,
    SchemaMissing,
    VersionConflict,
)
from ledger.events import (
    CHORD,
    TASK,
    ChordApplied,
    ChordFired,
    ChordPartReturned,
    EventData,
    GroupExpired,
    NewEvent,
    RecordedEvent,
    ResultExpired,
    stream_id,
    validate,
)
from ledger.store import store_for
from ledger.store.base import MAX_SQL_INT, START, Checkpoint, EncodedEvent, commits_relaxed
from ledger.store.engine import engine_for, is_concurrency_failure, is_disconnect, safe_url
from ledger.store.schema import checkpoints
from ledger.store.schema import events as events_table
from projections.chord import ChordState
from projections.group import GroupState
from projections.memory import MemoryTarget, Snapshot
from projections.task_meta import TaskMeta

if TYPE_CHECKING:
    from ledger.catalogue import CatalogueRow, GroupStats

#: A chord's saved header group and its returned parts' task rows (:meth:`Ledger.chord_header`).
ChordInputs = tuple[GroupState | None, dict[str, TaskMeta | None]]

log = logging.getLogger("ledger")
T = TypeVar("T")


@dataclass
class AppendResult:
    """What an append wrote: new events, and ids that were already there."""

    recorded: list[RecordedEvent] = field(default_factory=list)
    duplicates: list = field(default_factory=list)


@dataclass(frozen=True)
class RetryPolicy:
    """How a unit of work is retried: conflicts always, disconnects ``attempts`` times."""

    attempts: int = 5
    base_sleep: float = 0.05
    max_sleep: float = 2.0

    def sleep(self, attempt: int) -> float:
        # Full jitter (AWS architecture blog): spreads out writers that collided.
        return random.uniform(0, min(self.max_sleep, self.base_sleep * (2**attempt)))


class Ledger:
    """An event log with its projections, on one database."""

    def __init__(
        self,
        engine: Engine,
        *,
        retry: RetryPolicy | None = None,
        notify: str = "ready",
        max_payload_bytes: int | None = None,
    ) -> None:
        self.engine = engine
        #: Largest encoded event payload :meth:`append` accepts (None: no limit).
        self.max_payload_bytes = max_payload_bytes
        #: The database's statements (:mod:`ledger.store`); the facade names no database.
        self.store = store_for(engine, notify=notify)
        self.log = self.store.log
        self.target = self.store.target
        self.retry = retry or RetryPolicy()

    @classmethod
    def open(
        cls,
        url: str,
        *,
        upgrade: bool = False,
        retry: RetryPolicy | None = None,
        notify: str = "ready",
    ) -> Ledger:
        """Open the ledger at ``url`` (``sqlite:///file.db`` or ``postgresql+psycopg://...``).

        ``upgrade=True`` runs the Alembic migrations first; otherwise the schema
        must exist (``celery-ledger db upgrade``). ``notify`` says which appends
        send a PostgreSQL NOTIFY: ``"ready"`` (every event but a task state that
        is not ready) or ``"all"`` (see :mod:`ledger.store.postgres`).
        """
        ledger = cls(engine_for(url), retry=retry, notify=notify)
        if upgrade:
            ledger.upgrade()
        return ledger

    @property
    def url(self) -> str:
        """The database URL with the password hidden."""
        return safe_url(self.engine.url)

    def upgrade(self, revision: str = "head") -> None:
        from ledger.migrate import upgrade

        upgrade(self.engine, revision)

    def schema_missing(self) -> SchemaMissing | None:
        """Why this database cannot serve the ledger yet (no schema, an older one), or None.

        The fix is named, never applied: creating or migrating a schema implicitly
        would take a DDL-capable role and Alembic's ownership away from the
        operator (``ledger_auto_upgrade = True`` is the explicit opt-in).
        """
        from ledger import migrate

        current, head = migrate.current(self.engine), migrate.head()
        if current == head:
            return None
        state = "has no ledger schema" if current is None else f"has ledger schema {current}"
        return SchemaMissing(
            f"{self.url} {state}; this celery-ledger needs {head}: run "
            f"`celery-ledger db upgrade --db {self.url}`"
        )

    def require_schema(self) -> None:
        """Raise :class:`ledger.errors.SchemaMissing` unless the schema is at head."""
        problem = self.schema_missing()
        if problem is not None:
            raise problem

    def _schema_error(self, exc: sa.exc.DBAPIError) -> Exception | None:
        """The schema problem behind a statement that failed, or None.

        A database not migrated to this code's revision fails its statements in
        whatever way the difference takes -- a missing table, a missing column, a
        dropped column still NOT NULL (0005 drops columns) -- so any failure that
        is not a lost connection is checked against the schema's revision: say
        what to run, once, in one line (a worker otherwise logged 4,531 SQL
        tracebacks a minute). Only on the error path: a read of the revision.
        """
        if is_disconnect(exc):
            return None
        try:
            return self.schema_missing()
        except sa.exc.DBAPIError:
            return None  # the revision cannot be read either: the original error says more

    def __repr__(self) -> str:
        return f"Ledger({self.url!r})"

    # -- writing --------------------------------------------------------------------

    def append(self, events: Iterable[EventData | NewEvent]) -> AppendResult:
        """Append events and update the projections in one transaction.

        Idempotent on ``event_id``: an event already in the log is skipped and
        listed in ``duplicates``. Raises :class:`ledger.events.InvalidEvent` for
        an invalid payload (:class:`ledger.errors.EventTooLarge` for one over
        ``max_payload_bytes``) and :class:`ledger.errors.VersionConflict` when an
        ``expected_version`` does not hold; nothing is written in either case.
        """
        items = [EncodedEvent.of(self._new(e)) for e in events]
        if not items:
            return AppendResult()
        if self.max_payload_bytes is not None:
            for item in items:
                self._check_size(item)
        alone = self.store.autocommit_append(items)
        if alone is not None:
            recorded, missing = self._retrying(alone, write=True)
            if missing:  # raises VersionConflict unless a duplicate
                self.read(lambda conn: self.log.explain_no_row(conn, missing[0]))
            return AppendResult(recorded, [item.new.event_id for item in missing])
        return self.write(lambda conn: self._append_in(conn, items), relaxed=commits_relaxed(items))

    def _append_in(self, conn: Connection, items: list[EncodedEvent]) -> AppendResult:
        """Append ``items`` and update the projections in the caller's transaction."""
        return AppendResult(*self.store.append(conn, items))

    def _check_size(self, item: EncodedEvent) -> None:
        # The whole payload counts: result, traceback, args, kwargs, children.
        size, limit = len(item.payload), self.max_payload_bytes
        if limit is not None and size > limit:
            data = item.new.data
            raise EventTooLarge(
                f"{data.type} event of {data.stream_id} is {size} bytes encoded; the limit "
                f"(ledger_max_payload_bytes) is {limit} bytes"
            )

    @staticmethod
    def _new(event: EventData | NewEvent) -> NewEvent:
        if isinstance(event, NewEvent):
            return NewEvent(validate(event.data), event.event_id, event.expected_version)
        return NewEvent(validate(event))

    def return_chord_part(
        self,
        chord_id: str,
        task_id: str,
        status: str,
        group_index: int | None = None,
        body_task_id: str | None = None,
    ) -> bool:
        """Record that header task ``task_id`` of chord ``chord_id`` returned.

        Returns True exactly once per life of the chord: to the caller that must
        send the body. The part's event id is derived from (chord, task), so a
        redelivered part is the same event and counts once. The part is appended
        to a stream of its own and waits for no other part; once it is in the
        log, a caller that finds the chord complete and unclaimed claims the
        body with a ``chord.fired`` event in the chord's stream: the part that
        commits last always finds it so, and claims serialize on the stream's
        version, so at most one per life gets in.
        If the process died between the part and the claim, a redelivery of any
        part claims then. ``body_task_id`` (the body's task id) is recorded in
        the claim.

        A chord applied again (``chord.applied``: a frozen chord reuses its
        header task ids) finds the first life's id taken by a part it has not
        counted: the part is then recorded under an id of the current life.
        """
        return self.return_chord_part_read(chord_id, task_id, status, group_index, body_task_id)[0]

    def return_chord_part_read(
        self,
        chord_id: str,
        task_id: str,
        status: str,
        group_index: int | None = None,
        body_task_id: str | None = None,
        *,
        result: EventData | NewEvent | None = None,
    ) -> tuple[bool, ChordInputs | None]:
        """:meth:`return_chord_part`, and when it claims the body, the chord's inputs as
        :meth:`chord_header` reads them, where the store reads them with the claim
        (PostgreSQL: in the same round trip); None when not read.

        ``result`` (the part's own task state) is appended first: in the same
        transaction where the store can (PostgreSQL), else by :meth:`append`. It is
        checked as :meth:`append` checks it before anything is written.
        """
        part = ChordPartReturned(
            chord_id=chord_id, task_id=task_id, status=status, group_index=group_index
        )
        first = EncodedEvent.of(NewEvent(part, ChordPartReturned.deterministic_event_id(chord_id, task_id)))
        claim = self._claim_of(chord_id, first.new.event_id, body_task_id)
        before = None
        if result is not None:
            before = EncodedEvent.of(self._new(result))
            self._check_size(before)
        together = self.store.chord_part_write(first, claim, before)
        if together is None and self.store.writes_serially:
            # One write at a time (SQLite): the part's transaction sees every part
            # committed before it, so it can claim and read the inputs itself -- one
            # commit where the general path below takes three.
            recorded, claimed, inputs = self.write(
                lambda conn: self._part_in(conn, chord_id, first, claim, before)
            )
            if claimed or recorded:
                return claimed, inputs
        elif together is None and before is not None:
            self.append([before.new])
        if together is not None:
            # The common case in one unit: a part returning for the first time. A part
            # already in the log (a redelivery, or the same task id in a later life of
            # the chord) that claimed nothing takes the general path below.
            recorded, claimed, inputs = self._retrying(together, write=True)
            if claimed or recorded:
                return claimed, inputs

        def record(conn: Connection) -> uuid.UUID:
            """Append the part if this life has not counted it; its event id in this life."""
            if self._append_in(conn, [first]).recorded:
                return first.new.event_id
            life = self._chord_life(conn, chord_id)
            if life is None:
                return first.new.event_id  # a redelivery in the chord's only life
            # The same task id in a later life of the chord, or a redelivery in it.
            again = NewEvent(part, ChordPartReturned.deterministic_event_id(chord_id, task_id, life))
            state = self.target.chord(conn, chord_id)
            if state is None or not state.has_part(task_id):
                self._append_in(conn, [EncodedEvent.of(again)])
            return again.event_id

        counted = self.write(record)
        # After the part's commit, in a transaction of its own: a part that commits
        # last sees every part (return_chord_part). The claim's id names the life.
        claim = self._claim_of(chord_id, counted, body_task_id)
        return self.write(lambda conn: self._claim_chord(conn, chord_id, claim)), None

    def _part_in(
        self, conn: Connection, chord_id: str, part: EncodedEvent, claim: EncodedEvent,
        before: EncodedEvent | None,
    ) -> tuple[bool, bool, ChordInputs | None]:
        """``before``, the part and, if the chord is then complete and unclaimed, the claim
        and the chord's inputs, in the caller's transaction (writers one at a time)."""
        if before is not None:
            self._append_in(conn, [before])
        if not self._append_in(conn, [part]).recorded:
            return False, False, None  # a redelivery or a later life: the general path
        claimed = self._claim_chord(conn, chord_id, claim)
        return True, claimed, self.store.chord_header(conn, chord_id) if claimed else None

    @staticmethod
    def _claim_of(chord_id: str, completed_by: uuid.UUID, body_task_id: str | None) -> EncodedEvent:
        """The ``chord.fired`` of a claim made after the part ``completed_by`` (an event id)."""
        return EncodedEvent.of(NewEvent(
            ChordFired(chord_id=chord_id, body_task_id=body_task_id),
            ChordFired.deterministic_event_id(chord_id, completed_by),
        ))

    def _claim_chord(self, conn: Connection, chord_id: str, claim: EncodedEvent) -> bool:
        """Claim the body if the chord is complete and unclaimed.

        The chord stream's version and the chord's state are read in one statement
        (one snapshot), and the claim expects that version: a claim (or any chord
        event) appended since fails it, and the unit is retried -- to find the
        claim, if that was one. (Read in two statements, the version had to come
        first: a claim committed between the reads would otherwise be missed and
        a second one appended after it.)
        """
        version = self.target.claimable_version(conn, chord_id)
        if version is None:
            return False
        expecting = EncodedEvent.of(NewEvent(claim.new.data, claim.new.event_id, version))
        try:
            return bool(self._append_in(conn, [expecting]).recorded)
        except VersionConflict as exc:
            raise RetryableConflict(f"chord {chord_id!r} moved on while it was claimed") from exc

    def _chord_life(self, conn: Connection, chord_id: str) -> int | None:
        """Position of the ``chord.applied`` that began the chord's current life (None: none)."""
        applied = [
            e.position for e in self.log.read_stream(conn, stream_id(CHORD, chord_id))
            if e.type == ChordApplied.type
        ]
        return applied[-1] if applied else None

    def write(self, work: Callable[[Connection], T], *, relaxed: bool = False) -> T:
        """Run ``work`` in a write transaction, retrying conflicts and lost connections.

        ``relaxed``: the commit need not wait for its flush to disk
        (:func:`ledger.store.base.commits_relaxed` says which appends may). SQLite
        honours it here; PostgreSQL commits such an append in a statement of its
        own (:meth:`ledger.store.postgres.PostgresLog.append_fused_autocommit`)."""

        def run() -> T:
            with self.engine.connect() as conn:
                conn = conn.execution_options(ledger_write=True, ledger_relaxed=relaxed)
                with conn.begin():
                    return work(conn)

        return self._retrying(run, write=True)

    def read(self, work: Callable[[Connection], T], *, single_statement: bool = False) -> T:
        """Run ``work`` in a read transaction (one snapshot), retrying lost connections.

        ``single_statement=True`` skips BEGIN/ROLLBACK where the database allows
        (:attr:`ledger.store.base.Store.single_statement_options`): one SELECT is
        consistent on its own, and a point read is then one round trip.
        """
        options = self.store.single_statement_options if single_statement else {}

        def run() -> T:
            with self.engine.connect() as conn:
                return work(conn.execution_options(**options) if options else conn)

        return self._retrying(run)

    def _retrying(self, unit: Callable[[], T], *, write: bool = False) -> T:
        """``unit()``, again after a lost connection (``retry.attempts`` in all) or, for a
        write, a conflict or a transaction the database rolled back for a concurrent one
        (a deadlock, a serialization failure; up to 50 times): the one retry loop of
        every read and write."""
        attempt = 0
        while True:
            try:
                return unit()
            except RetryableConflict as exc:
                # Always safe: the transaction rolled back, the events keep their ids.
                if attempt >= 50:
                    raise
                log.debug("append conflict, retrying: %s", exc)
            except sa.exc.DBAPIError as exc:
                if write and is_concurrency_failure(exc):
                    # PostgreSQL rolled the whole transaction back (it lost a deadlock,
                    # e.g. to prune's table locks, or a serialization failure): as safe
                    # to run again as a conflict, and retried as one.
                    if attempt >= 50:
                        raise
                    log.debug("ledger write rolled back by the database, retrying: %s", exc.orig)
                else:
                    problem = self._schema_error(exc)
                    if problem is not None:
                        raise problem from None
                    if not is_disconnect(exc) or attempt + 1 >= self.retry.attempts:
                        raise
                    if write:
                        log.warning(
                            "ledger write failed (%s); retry %d/%d",
                            type(exc.orig or exc).__name__,
                            attempt + 1,
                            self.retry.attempts - 1,
                        )
            time.sleep(self.retry.sleep(attempt))
            attempt += 1

    # -- reading projections -----------------------------------------------------------

    def task_meta(self, task_id: str, *, as_of: datetime | int | None = None) -> TaskMeta | None:
        """The task's current projection row, or as it was at a time or log position."""
        if as_of is None:
            if not self.could_hold(task_id):  # no task has that id (Redis: PENDING too)
                return None
            return self._retrying(lambda: self.store.task_meta(task_id))
        return self._replay(stream_id(TASK, task_id), as_of).state.task_meta.get(task_id)

    def task_metas(self, task_ids: Iterable[str]) -> dict[str, TaskMeta]:
        """Current projection rows of many tasks by id (ids without a row are absent)."""
        ids = [i for i in task_ids if self.could_hold(i)]
        if not ids:
            return {}
        rows = self.read(lambda c: self.target.tasks(c, ids), single_statement=len(ids) <= 500)
        return {m.task_id: m for m in rows}

    def expire_finished(self, cutoff: datetime, limit: int = 1000) -> tuple[int, int]:
        """Expire up to ``limit`` tasks done and groups saved before ``cutoff``.

        Appends a ``results.expired`` / ``group.expired`` tombstone for each, in
        one transaction, each expecting the stream version read with its row. A
        task that started a new life (or a group saved again) between the read
        and the append fails its expectation and is left out: the tombstone would
        have ended the new life. Returns ``(found, expired)``; what was left out
        is found again by the next call if it is still old.
        """
        tasks, groups = self.read(lambda c: self.target.finished_before(c, cutoff, limit, events_table))
        pending = [
            NewEvent(ResultExpired(task_id=t, expired_before=cutoff), expected_version=v)
            for t, v in tasks
        ] + [
            NewEvent(GroupExpired(group_id=g, expired_before=cutoff), expected_version=v)
            for g, v in groups
        ]
        found = len(pending)
        while pending:
            try:
                self.append(pending)
                break
            except VersionConflict as exc:
                pending = [e for e in pending if e.data.stream_id != exc.stream_id]
        return found, len(pending)

    # -- the task catalogue ------------------------------------------------------------

    def tasks(self, **filters: Any) -> list[CatalogueRow]:
        """Tasks found by :class:`ledger.catalogue.TaskFilter` fields (``name`` exact or
        glob, ``state``, ``worker``, ``queue``, ``exception``, ``since``/``until`` on the
        first event's time, ``root``, ``args``, ``slowest``, ``limit``), newest first.

        >>> ledger.tasks(name="shop.*", state="FAILURE", since=yesterday, limit=50)
        """
        from ledger.catalogue import TaskFilter, find_tasks

        try:
            f = TaskFilter(**filters)
        except TypeError:
            unknown = sorted(set(filters) - set(TaskFilter.__dataclass_fields__))
            raise BadFilter(f"unknown filter {', '.join(unknown)}") from None
        for key in ("before", "after"):
            if (at := filters.get(key)) is not None and not self.could_hold(at[1]):
                # Not a task this database lists, and no place in its order is exact.
                raise BadFilter(f"{key}: the task id {at[1]!r} has a NUL character, which this database cannot hold")
        # A text the database cannot hold matches no task: it holds no such text.
        if not self.could_hold(*(v for v in filters.values() if isinstance(v, str))):
            return []
        return self.read(lambda c: find_tasks(c, f, self.target.t))

    def stats(
        self, *, by: str = "name", since: datetime | None = None, until: datetime | None = None
    ) -> list[GroupStats]:
        """Per task name, worker or queue: counts by state, failure and retry rates,
        runtime percentiles (see :func:`ledger.catalogue.task_stats`)."""
        from ledger.catalogue import task_stats

        return self.read(lambda c: task_stats(c, by=by, since=since, until=until, tables=self.target.t))

    def group(self, group_id: str) -> GroupState | None:
        if not self.could_hold(group_id):
            return None
        return self.read(lambda c: self.target.group(c, group_id), single_statement=True)

    def chord(self, chord_id: str) -> ChordState | None:
        if not self.could_hold(chord_id):
            return None
        return self.read(lambda c: self.target.chord(c, chord_id))

    def chord_header(self, chord_id: str) -> tuple[GroupState | None, dict[str, TaskMeta | None]]:
        """The chord's saved header group and its returned parts' task rows, in one read."""
        if not self.could_hold(chord_id):
            return None, {}
        return self.read(lambda c: self.store.chord_header(c, chord_id), single_statement=True)

    def snapshot(self) -> Snapshot:
        """Every live projection row (tests and verify)."""
        return self.read(self.target.snapshot)

    def _replay(self, stream_id: str, as_of: datetime | int) -> MemoryTarget:
        if not self.could_hold(stream_id):
            return MemoryTarget()
        if isinstance(as_of, int):
            until = min(as_of, MAX_SQL_INT)  # past it: the whole stream, not an OverflowError
            events = self.read(lambda c: self.log.read_stream(c, stream_id, until_position=until))
        else:
            events = self.read(lambda c: self.log.read_stream(c, stream_id, until_time=as_of))
        target = MemoryTarget()
        target.apply(events)
        return target

    # -- reading the log ---------------------------------------------------------------

    def could_hold(self, *texts: str) -> bool:
        """Whether this database could have stored every one of ``texts``.

        PostgreSQL's text holds no NUL character (and refuses one as a statement's
        parameter): no stored id or value has one, so reads by an id or a filter
        with a NUL answer "none" instead of failing. SQLite stores them.
        """
        return self.store.holds_nul or not any("\x00" in t for t in texts)

    def read_stream(self, stream_id: str) -> list[RecordedEvent]:
        if not self.could_hold(stream_id):
            return []
        return self.read(lambda c: self.log.read_stream(c, stream_id))

    def chord_events(self, chord_id: str) -> list[RecordedEvent]:
        """The chord's own events and its returned parts', in log order."""
        if not self.could_hold(chord_id):
            return []
        return self.read(lambda c: self.log.read_chord(c, chord_id))

    def history(self, task_id: str) -> list[RecordedEvent]:
        """Every event of the task, forgotten or not, in order."""
        return self.read_stream(stream_id(TASK, task_id))

    def checkpoint_of(self, position: int | Checkpoint) -> Checkpoint:
        if isinstance(position, Checkpoint):
            return position
        return self.read(lambda c: self.log.checkpoint_of(c, position))

    def read_from(self, after: int | Checkpoint = START, limit: int = 1000) -> list[RecordedEvent]:
        """Up to ``limit`` committed events after ``after`` in follow order.

        ``after`` is a :class:`Checkpoint` or a position (0 = the beginning).
        Follow order is position order on SQLite and ``(tx_id, position)`` on
        PostgreSQL; in both no committed event is ever skipped.
        """
        cp, limit = self.checkpoint_of(after), _row_count("limit", limit)
        return self.read(lambda c: self.log.read_from(c, cp, limit))

    def follow(
        self,
        from_position: int | Checkpoint = START,
        *,
        batch: int = 1000,
        stop: threading.Event | None = None,
        idle_timeout: float | None = None,
        poll_interval: float = 0.1,
        read_interval: float = 0.0,
    ) -> Iterator[RecordedEvent]:
        """Yield every event after ``from_position``, then new ones as they commit.

        Wakes on LISTEN/NOTIFY on PostgreSQL and polls every ``poll_interval``
        (the only wake-up on SQLite; on PostgreSQL it finds the events that do
        not notify, see :mod:`ledger.store.postgres`). Ends when ``stop`` is set or after
        ``idle_timeout`` seconds without an event.

        ``read_interval`` is the least time between two reads of a caught-up
        follower: when events come faster, those committed meanwhile arrive
        together in the next read instead of one read (and one wake-up of
        whatever consumes them) per commit. An event then waits at most that
        long; when they come slower, none waits.
        """
        cp, batch = self.checkpoint_of(from_position), _row_count("batch", batch)
        idle_since = last_read = time.monotonic()
        wait = poll_interval
        with self.store.listener() as listener:
            while stop is None or not stop.is_set():
                pause = last_read + read_interval - time.monotonic()
                if pause > 0 and (stop.wait(pause) if stop is not None else time.sleep(pause)):
                    return
                last_read = time.monotonic()
                events = self.read(lambda c, cp=cp: self.log.read_from(c, cp, batch))
                for event in events:
                    yield event
                    cp = Checkpoint(event.tx_id, event.position)
                if events:
                    idle_since = time.monotonic()
                    wait = poll_interval
                    continue
                if idle_timeout is not None and time.monotonic() - idle_since >= idle_timeout:
                    return
                # A notification comes at commit, but the event may still sit behind
                # an older open transaction (follow order, ledger.store): look again
                # soon, backing off to the poll interval, rather than a full poll later.
                wait = 0.02 if listener.wait(wait) else min(poll_interval, wait * 2)

    # -- checkpoints of followers stored beside the log ----------------------------------

    def load_checkpoint(self, name: str, conn: Connection | None = None) -> Checkpoint:
        def q(c: Connection) -> Checkpoint:
            row = c.execute(
                sa.select(checkpoints.c.tx_id, checkpoints.c.position).where(
                    checkpoints.c.name == name
                )
            ).first()
            return Checkpoint(*row) if row else START

        return q(conn) if conn is not None else self.read(q)

    def save_checkpoint(self, conn: Connection, name: str, cp: Checkpoint) -> None:
        """Store a follower's checkpoint in the caller's transaction."""
        self.store.save_checkpoint(conn, name, cp)

    def follower_lag(self) -> dict:
        """How far followers are held back: events not yet visible in follow order."""
        return self.read(self.store.follower_lag)


def _row_count(name: str, value: int) -> int:
    """A count of events to read: a whole number of at least 1 (SQLite took a negative
    LIMIT as none, PostgreSQL refused it), at most :data:`MAX_SQL_INT` (more asks for all)."""
    if type(value) is not int or value < 1:
        raise ValueError(f"{name} must be a whole number of at least 1, not {value!r}")
    return min(value, MAX_SQL_INT)
