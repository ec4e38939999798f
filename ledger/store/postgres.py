"""PostgreSQL: every statement, lock, setting and wake-up the ledger runs on PostgreSQL.

Why followers never skip an event
---------------------------------
No writer waits for another. Each row stores the appending
transaction's id (``pg_current_xact_id()``). A reader takes only rows whose
transaction is older than the oldest transaction still running
(``pg_current_snapshot()``'s oldest running one): all of those have committed or
aborted, so nothing can appear below them later. It orders by
``(tx_id, position)`` and checkpoints on that pair. Measured on the project's
2-core reference machine (PostgreSQL 15, 2 transitions per task): this keeps
~1,900 tasks/s with 4 writers where a table lock kept ~690. The cost: a
long-open transaction in the ledger's database holds followers back
(``Ledger.follower_lag`` reports it). Transaction ids are the server's, not the
database's, so the horizon skips the running transactions that
``pg_stat_activity`` shows in *other* databases (they cannot write this log):
another application's long transaction on a shared server held every event
back by 0.4 s at p99 before (measured, ``bench.web``). One it cannot place (no
privilege to see it, a prepared transaction) still holds followers back.

Per-stream order must agree with follow order. A transaction gets its xid at
its first write, which is the INSERT below, after the statement's snapshot
showed every earlier version of the stream; so prior versions always carry
smaller xids. The RETURNING clause checks that anyway (a batch touching
several streams could break it) and the unit of work is retried with a new
transaction if not. It compares with the stream's latest version only (an
index lookup, not a scan of a long stream): every append checked its own
predecessor, so ``tx_id`` never decreases along a stream.

Which appends NOTIFY
--------------------
An append wakes ``result.get()`` waiters and followers with
``pg_notify(NOTIFY_CHANNEL, stream_id)``. A notifying transaction takes
PostgreSQL's notification lock (one for the whole cluster, "database 0" in
async.c) before its commit and holds it until the commit is flushed, so
notifying commits queue behind each other's WAL flush -- other databases'
too. Measured with 4 processes storing STARTED+SUCCESS through Celery's
backend API on 2 cores, 7 alternating 8 s runs: 1,525-1,844 tasks/s when only
ready states notify against 1,370-1,718 when every store does (the former ahead
in 6 of 7 pairs, by ~12% at the median); no difference with 1 process.

A chord part stored with its result (:meth:`PostgresLog.return_chord_part`)
notifies in a transaction of its own, sent in the same pipeline right after the
part's commit: a transaction that only notifies writes nothing but its commit
record, which PostgreSQL does not wait to flush (measured: 0.03-0.07 ms against
1.3-3 ms for an insert's commit on this machine under other sessions' I/O), so
the parts of a chord do not queue behind each other's flush on the
notification lock. Waiters are woken once the event is durable and visible, as before. A plain
store keeps the NOTIFY in its own statement: splitting it off takes a pipeline,
which cost a store more client and server CPU than the lock cost it (one
process, 3 alternating runs of 2,000 tasks: 378-545 against 547-847 µs of
client CPU per task), and stores are CPU-bound with 4 processes on 2 cores. A
second round trip for it instead (no pipeline) did no better: 4 processes, 6
alternating 2 s runs at load 1.3-2.4, ahead in 1 of the 6 pairs.

By default (``notify="ready"``) every event notifies except a task state that
is not ready -- STARTED, RETRY, custom progress states -- a task's SENT and
RECEIVED (``task.sent``, ``task.received``): no waiter wakes for those
(``get()`` waits for a ready state) -- and a chord's returned parts and
its claim (``chord.fired``): nothing waits on them, and every part's commit
would otherwise queue behind the other workers' notifying commits. Followers find those at the next
notification or their next poll (``poll_interval``, 0.1 s by default).
``notify="all"`` notifies every event.

Hot paths
---------
A store, a point read and a chord's part go through the pooled connection's
psycopg connection (:func:`driver_fetch`, :func:`pooled_fetch`), each event with
its projection update in one statement (:class:`FusedUpdates`). Outside a
transaction they run on libpq's level, all of a round trip's statements sent in
one flush (:func:`_pipelined`, :class:`PointRead`). The process's
main thread keeps its connection checked out (:func:`_kept`), with generic plans,
and prepares these statements on it once when it opens it
(:meth:`PostgresStore._warm_up`). A chord part with its result, and the claim
if the chord is then complete, is one pipelined transaction; the part takes no
lock and waits for no other part (:meth:`PostgresLog.return_chord_part`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, ClassVar, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import URL, Connection, Engine

from ledger.errors import RebuildError, RetryableConflict, VersionConflict
from ledger.events import (
    CHORD,
    LIFECYCLE_TYPES,
    ChordApplied,
    ChordFired,
    ChordPartReturned,
    EventData,
    GroupExpired,
    GroupForgotten,
    GroupSaved,
    NewEvent,
    RecordedEvent,
    ResultExpired,
    TaskForgotten,
    TaskReceived,
    TaskSent,
    TaskState,
    stream_kind,
)
from ledger.settings import NOTIFY_MODES, pool_size_from_env
from ledger.store.base import (
    BIND_TYPES,
    EVENT_COLUMNS,
    Appended,
    Checkpoint,
    EncodedEvent,
    FollowableLog,
    Listener,
    MaintainableStore,
    RebuildPlan,
    RelayLock,
    commits_relaxed,
    row_to_event,
)
from ledger.store.schema import LIVE, PRUNE_SETTING, ProjectionTables
from ledger.store.schema import events as events_table
from ledger.store.target import WRITE_ORDER, CatalogueFill, claimable_sql, lifecycle_columns
from projections.catalogue import (
    LIFECYCLE_TIMES,
    PAYLOAD_FIELDS,
    RECEIVED_FIELDS,
    SENT_FIELDS,
    STARTED,
    fields_of,
)
from projections.lifecycle import RANK, STATE_OF
from projections.task_meta import READY_STATES, STICKY_STATE, TaskMeta

log = logging.getLogger("ledger.store.postgres")
T = TypeVar("T")

#: The channel appends NOTIFY on and waiters LISTEN to (payload: the stream id).
NOTIFY_CHANNEL = "ledger_events"


def _pg_notify(stream: str) -> str:
    """The one NOTIFY of the ledger: ``stream`` (an SQL text expression) on the channel."""
    return f"pg_notify('{NOTIFY_CHANNEL}', {stream})"


#: The select-list item of an append that notifies when ``:notify`` is true.
_NOTIFY = f"CASE WHEN CAST(:notify AS boolean) THEN {_pg_notify('CAST(:stream_id AS text)')} END AS notified"

#: The status of the row (without a task id) a chord part's read returns when the
#: chord is complete and nobody claimed it (:meth:`PostgresLog.return_chord_part`).
CLAIMABLE = "ledger:claimable"

#: A chord's returned parts and its claim: nothing waits on them (module docstring).
_CHORD_RETURNS = frozenset({ChordPartReturned.type, ChordFired.type})


def create_engine(u: URL) -> Engine:
    """The engine for a PostgreSQL URL (psycopg 3)."""
    return sa.create_engine(
        u,
        pool_size=pool_size_from_env(),
        max_overflow=16,
        pool_recycle=1800,
        # Disconnects are handled by retrying the whole unit of work
        # (ledger.api.Ledger.write), so no pre-ping round trip per checkout.
        pool_pre_ping=False,
    )


# -- the driver-level hot path -----------------------------------------------------------

_NAMED_PARAM = re.compile(r"(?<![:\w]):(\w+)")


def driver_sql(sql: str) -> str:
    """``:name`` binds (SQLAlchemy text) as psycopg's ``%(name)s``; ``::casts`` untouched."""
    return _NAMED_PARAM.sub(r"%(\1)s", sql)


def driver_fetch(conn: Connection, statements: list[tuple[str, dict]]) -> list[tuple | None]:
    """Run PostgreSQL statements on the pooled connection's psycopg connection.

    For the hot paths only (a store, a point read, a batch of stores): skipping
    SQLAlchemy's per-statement compile/result machinery saves ~300 µs of the
    ~500 µs a statement costs in Python (measured on this machine), psycopg
    prepares each statement server-side, and several statements go out in one
    pipeline instead of one round trip each. They run in order, in the caller's
    transaction. Errors come back as SQLAlchemy's own exception classes and a
    broken connection is invalidated in the pool, exactly as
    ``Connection.execute`` would do, so retries work the same. Returns each
    statement's first row. ``sql`` uses psycopg placeholders (see :func:`driver_sql`).
    """
    prepared = conn.connection.info.setdefault(_PREPARED, set())
    return _on_driver(conn, *statements[0], lambda raw: _run_statements(raw, statements, prepared))


def driver_fetchall(conn: Connection, sql: str, params: dict) -> list[tuple]:
    """One statement's rows as plain tuples (see :func:`driver_fetch`)."""
    return _on_driver(conn, sql, params, lambda raw: raw.execute(sql, params).fetchall())


def pooled_fetch(engine: Engine, statements: list[tuple[str, dict]]) -> list[tuple | None]:
    """Autocommitted statements' first rows on a pooled psycopg connection.

    The hot paths outside a transaction (a lone store, a batch of stores) take no
    SQLAlchemy ``Connection``: checking one out, switching it to AUTOCOMMIT and
    back and its reset on return cost ~30 µs of the ~110 µs a point read took
    (measured; the SELECT itself is ~70 µs). The statements go out as one
    pipeline (:func:`_pipelined`), which PostgreSQL runs as one implicit
    transaction, committed at the pipeline's end. Errors and invalidation as in
    :func:`driver_fetch`.
    """
    return pooled_pipeline(engine, statements)[0]


def pooled_pipeline(
    engine: Engine, statements: list[tuple[str, dict]], reads: Sequence[tuple[str, dict]] = ()
) -> tuple[list[tuple | None], list[list[tuple]]]:
    """:func:`pooled_fetch`'s transaction, then ``reads``, in the same round trip;
    returns the transaction's first rows and each read's rows.

    ``reads`` run after the transaction committed (a pipeline sync before each),
    each on its own, so they hold none of the transaction's locks, and they see
    what it wrote. They also run when the transaction failed (the error is raised
    after the round trip), so they must be harmless then.
    """
    return _pooled(engine, *statements[0], lambda raw, info: _pipelined(raw, info, statements, reads))


def _checkout(engine: Engine) -> Any:
    """A pooled connection of ``engine``; a failure to connect raised as ``engine.connect()`` raises it."""
    import psycopg

    try:
        return engine.raw_connection()
    except psycopg.Error as orig:
        raise sa.exc.DBAPIError.instance(None, None, orig, psycopg.Error, dialect=engine.dialect) from orig


def _pooled(engine: Engine, sql: str, params: dict, run: Callable[[Any, dict], T]) -> T:
    """``run(psycopg_connection, record_info)`` on a pooled connection in autocommit mode.

    The process's main thread keeps one such connection checked out (:func:`_kept`):
    a checkout, the switch to autocommit and back, and the reset on return cost
    ~20 µs of client CPU per store or point read (measured, see the README's
    benchmark notes). Other threads check one out each time: a kept connection per
    thread would hold as many connections as a threaded worker has threads.
    """
    import psycopg

    if threading.get_ident() == _MAIN_THREAD:
        fairy = _kept(engine)
        raw = fairy.driver_connection
        try:
            return run(raw, fairy.info)
        except psycopg.Error as orig:
            error = _driver_error(engine, fairy, sql, params, orig)
            if raw.broken or raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                _drop_kept(engine)
            raise error from orig
        except BaseException:
            _drop_kept(engine)  # interrupted mid-statement (a time limit): state unknown
            raise
    fairy = _checkout(engine)
    try:
        raw = fairy.driver_connection
        raw.autocommit = True
        try:
            return run(raw, fairy.info)
        finally:
            if not raw.broken:
                raw.autocommit = False
    except psycopg.Error as orig:
        raise _driver_error(engine, fairy, sql, params, orig) from orig
    finally:
        fairy.close()


#: Gevent and eventlet patch get_ident per greenlet: only the main one keeps a connection.
_MAIN_THREAD = threading.main_thread().ident
#: Per engine: (process id, its pool, the main thread's kept connection).
_KEPT: weakref.WeakKeyDictionary[Engine, tuple[int, Any, Any]] = weakref.WeakKeyDictionary()


def _kept(engine: Engine) -> Any:
    """The main thread's pooled connection of ``engine``, checked out once, in autocommit.

    Given up when its process is not this one (a forked child: the parent's socket
    is not ours), when the engine was disposed (a new pool) or when it was
    invalidated (a disconnect): the next call checks out a fresh one.
    """
    import psycopg

    kept = _KEPT.get(engine)
    if kept is not None:
        pid, pool, fairy = kept
        if pid == os.getpid() and pool is engine.pool and fairy.is_valid:
            return fairy
        _drop_kept(engine)
    fairy = _checkout(engine)
    try:
        raw = fairy.driver_connection
        raw.autocommit = True
        raw.execute(_GENERIC_PLANS)
        warm_up = _WARM_UPS.get(engine)
        if warm_up is not None and (warm := warm_up()) is not None:
            warm(raw, fairy.info)
    except psycopg.Error as orig:
        error = _driver_error(engine, fairy, _GENERIC_PLANS, {}, orig)
        _close(fairy)
        raise error from orig
    except BaseException:
        _close(fairy)
        raise
    if not sa.event.contains(engine, "engine_disposed", _drop_kept):
        # engine.dispose() closes the engine's connections; a test or a bench then
        # drops or clones the database, which an open connection would prevent.
        sa.event.listen(engine, "engine_disposed", _drop_kept)
    _KEPT[engine] = (os.getpid(), engine.pool, fairy)
    return fairy


#: The kept connection runs only the hot paths' statements, keyed lookups whose best
#: plan does not depend on the values: plan each once, not at each of its first five
#: runs as PostgreSQL does by default. This connection only, not the pool's.
_GENERIC_PLANS = "SET plan_cache_mode = force_generic_plan"
#: Per engine: what prepares its hot statements on a new kept connection (the store's).
_WARM_UPS: weakref.WeakKeyDictionary[Engine, weakref.WeakMethod] = weakref.WeakKeyDictionary()


def _drop_kept(engine: Engine) -> None:
    kept = _KEPT.pop(engine, None)
    if kept is not None and kept[0] == os.getpid():
        _close(kept[2])  # it may have been interrupted mid-statement


def _close(fairy: Any) -> None:
    """Close a kept connection rather than return it: the pool's other users expect
    a connection that is not in autocommit mode and has no session settings."""
    if fairy.is_valid:
        fairy.invalidate()


def pooled_point_read(engine: Engine, lookup: PointRead, key: str) -> tuple | None:
    """The row ``lookup`` finds by ``key``, or None: ``get_task_meta``'s hot path.

    One prepared statement run on libpq's level (psycopg's ``pgconn``) and its
    row loaded by psycopg's own loaders: psycopg's cursor machinery around the
    same round trip cost ~45 µs of client CPU per read (107 µs against 62 µs for
    a primary-key SELECT, one process, on the 2-core VM of the README's
    benchmarks), as much as the rest of a ``get_task_meta``. The wait is
    psycopg's, so a signal or Ctrl-C interrupts it as it would a cursor's.
    Errors, invalidation and retries as in :func:`pooled_fetch`.
    """
    return _pooled(engine, lookup.sql, {"key": key}, lambda raw, info: lookup.run(raw, info, key))


class PointRead:
    """A one-row lookup by one text parameter (``$1``), prepared once per connection."""

    def __init__(self, name: str, sql: str) -> None:
        from psycopg import errors, generators
        from psycopg.adapt import Transformer
        from psycopg.pq import ExecStatus, Format

        self.name = name.encode()
        self.sql = sql
        self._sql = sql.encode()
        self._execute, self._error = generators.execute, errors.error_from_result
        self._transformer, self._ok = Transformer, (ExecStatus.COMMAND_OK, ExecStatus.TUPLES_OK)
        self._binary = [Format.BINARY]

    def run(self, raw: Any, info: dict, key: str) -> tuple | None:
        pg = raw.pgconn
        for attempt in (1, 2):
            # Per connection: prepared once; its row loaders (the columns' types
            # never change) chosen by the first row read, then reused.
            loader = info.get(self.name)
            if loader is None:
                pg.send_prepare(self.name, self._sql)
                self._check(raw, raw.wait(self._execute(pg)))
                loader = info[self.name] = self._transformer(raw)
            # The key goes in binary format, with its length: text-format parameters
            # are C strings to libpq, which would cut a key at a NUL (PostgreSQL
            # refuses the NUL instead, as it does through a cursor).
            pg.send_query_prepared(self.name, [key.encode()], self._binary, self._binary[0])
            try:
                result = self._check(raw, raw.wait(self._execute(pg)))
            except Exception as exc:
                if getattr(exc, "sqlstate", None) != "26000" or attempt == 2:
                    raise
                # The statement is gone (a DEALLOCATE ALL on this session): again.
                info.pop(self.name, None)
                continue
            if not result.ntuples:
                return None
            loader.set_pgresult(result, set_loaders=loader.pgresult is None)
            return loader.load_row(0, tuple)
        raise AssertionError("unreachable")

    def _check(self, raw: Any, results: list) -> Any:
        (result,) = results
        if result.status not in self._ok:
            raise self._error(result, encoding=raw.info.encoding)
        return result


#: Per pooled connection (its record's ``info``): the names of the statements
#: :func:`_pipelined` prepared on it, by (SQL, parameter types).
_NAMED = "ledger_named"
#: ... the psycopg Transformer that dumps their parameters and loads their rows,
#: and the numbers their names take.
_TRANSFORMER, _NUMBERS = "ledger_transformer", "ledger_numbers"
_PARAM = re.compile(r"%\((\w+)\)s|%%")


@functools.lru_cache(maxsize=256)
def _numbered(sql: str) -> tuple[bytes, tuple[str, ...]]:
    """``sql`` with psycopg's ``%(name)s`` placeholders as ``$1``, ``$2``, ...; and
    the names in that order (see :func:`driver_sql`)."""
    names: dict[str, int] = {}

    def number(m: re.Match) -> str:
        if m.group(1) is None:
            return "%"
        return f"${names.setdefault(m.group(1), len(names) + 1)}"

    return _PARAM.sub(number, sql).encode(), tuple(names)


def _pipelined(
    raw: Any, info: dict, statements: Sequence[tuple[str, dict]], reads: Sequence[tuple[str, dict]] = ()
) -> tuple[list[tuple | None], list[list[tuple]]]:
    """Statements (one transaction: one pipeline sync) then ``reads`` (a sync each)
    on libpq's level: the first row of each statement, every row of each read.

    psycopg's own pipeline sends each statement as it is queued, polling the
    socket before each: ~630 µs of client CPU per chord part (3 statements, 2
    reads) under a profiler, more than the rest of Celery's ``mark_as_done``.
    Here everything is queued in libpq's buffer and goes out in one flush, the
    server's replies are read in one pass, and each statement is prepared once
    per connection under a name of ours (its PREPARE in the same round trip as
    its first run). Parameters are dumped by psycopg's own dumpers and rows
    loaded by its loaders, so values travel as through a cursor (a binary one
    for the reads' rows). An error is
    raised, as psycopg's exception, once every reply is read and the connection
    is idle again. If a statement of ours is gone from the session (``DEALLOCATE
    ALL``), all are prepared again and what failed is sent once more: the whole
    pipeline if the transaction failed (it did nothing), else the reads only (it
    committed). A name is kept only for a PREPARE that succeeded.
    """
    from psycopg import errors, generators
    from psycopg.adapt import PyFormat, Transformer
    from psycopg.pq import ExecStatus, Format, PipelineStatus

    named = info.setdefault(_NAMED, {})
    tx = info.get(_TRANSFORMER)
    if tx is None:
        tx = info[_TRANSFORMER] = Transformer(raw)
        info[_NUMBERS] = itertools.count()
    numbers = info[_NUMBERS]
    units = [(sql, params, False) for sql, params in statements] + [(sql, params, True) for sql, params in reads]
    dumped = []  # per unit: (key: (SQL, parameter types), query, values, formats)
    for sql, params, _ in units:
        query, names = _numbered(sql)
        values = tx.dump_sequence([params[n] for n in names], [PyFormat.AUTO] * len(names))
        dumped.append(((sql, tuple(tx.types)), query, values, list(tx.formats)))
    pg = raw.pgconn

    def exchange(todo: list[int]) -> tuple[dict[int, Any], Any, int | None]:
        """Send units ``todo`` (the statements' one transaction first) and read every
        reply: each unit's result, and the first error with its unit's index."""
        expected: list[tuple[str, int | None, Any]] = []  # ("unit" | "prepare" | "sync", unit, key)
        pg.enter_pipeline_mode()
        try:
            for i in todo:
                (_, _, read), (key, query, values, formats) = units[i], dumped[i]
                if read:
                    pg.pipeline_sync()  # ends the transaction (or the read before)
                    expected.append(("sync", None, None))
                name = named.get(key)
                if name is None:
                    # never a name used before on this session: after a DEALLOCATE
                    # of some of them the others may still exist
                    name = named[key] = f"ledger_p{next(numbers)}".encode()
                    pg.send_prepare(name, query, param_types=key[1])
                    expected.append(("prepare", i, key))
                # A read's rows come back in binary: a chord's header read returns
                # every part's payload, which text format would send hex-encoded.
                pg.send_query_prepared(
                    name, values, param_formats=formats, result_format=Format.BINARY if read else Format.TEXT
                )
                expected.append(("unit", i, None))
            pg.pipeline_sync()
            expected.append(("sync", None, None))
            replies = raw.wait(communicate(len(expected)))
            pg.exit_pipeline_mode()
        except BaseException:
            if pg.pipeline_status != PipelineStatus.OFF:
                raw.close()  # replies unread, state unknown: the pool drops the connection
            raise
        results, failure, failed_unit = {}, None, None
        for (kind, i, key), reply in zip(expected, replies, strict=True):
            status = reply[0].status if reply else None
            if kind == "prepare" and status != ExecStatus.COMMAND_OK:
                named.pop(key, None)  # not prepared (it failed, or an earlier error aborted it)
            if status == ExecStatus.FATAL_ERROR and failure is None:
                failure, failed_unit = reply[0], i
            if kind == "unit":
                results[i] = reply[0]
        return results, failure, failed_unit

    def communicate(count: int) -> Any:
        yield from generators.send(pg)
        replies = []
        for _ in range(count):
            replies.append((yield from generators.fetch_many(pg)))
        return replies

    everything = list(range(len(units)))
    results, failure, failed_unit = exchange(everything)
    if failure is not None:
        error = errors.error_from_result(failure, encoding=raw.info.encoding)
        if getattr(error, "sqlstate", None) != "26000":
            raise error
        # Our statements are gone from the session (DEALLOCATE ALL): prepare them
        # again, and send again what did not run. A read's failure leaves the
        # transaction committed: only the reads go again, never the transaction.
        named.clear()
        again = everything if failed_unit is None or failed_unit < len(statements) else everything[len(statements):]
        retried, failure, _ = exchange(again)
        if failure is not None:
            raise errors.error_from_result(failure, encoding=raw.info.encoding)
        results.update(retried)
    rows: list[tuple | None] = []
    read_rows: list[list[tuple]] = []
    for i, (_, _, read) in enumerate(units):
        result = results[i]
        tx.set_pgresult(result)
        if read:
            read_rows.append(tx.load_rows(0, result.ntuples, tuple))
        else:
            rows.append(tx.load_row(0, tuple) if result.ntuples else None)
    return rows, read_rows


#: The statements psycopg prepared on a connection for :func:`driver_fetch` (in
#: its record's ``info``).
_PREPARED = "ledger_prepared"


def _run_statements(raw: Any, statements: list[tuple[str, dict]], prepared: set[str]) -> list[tuple | None]:
    """Statements in the caller's transaction, through psycopg: it begins the
    transaction on the first (a libpq-level :func:`_pipelined` would not)."""
    sql, params = statements[0]
    if len(statements) == 1 and sql in prepared:
        return [raw.execute(sql, params, prepare=True).fetchone()]
    # Outside a pipeline psycopg prepares a new statement in a round trip of its
    # own before running it; in one, PREPARE and EXECUTE share the round trip. A
    # prefork child that completes a chord runs most statements for its first time.
    with raw.pipeline():
        cursors = [raw.execute(sql, params, prepare=True) for sql, params in statements]
    prepared.update(sql for sql, _ in statements)
    return [cur.fetchone() for cur in cursors]


def _on_driver(conn: Connection, sql: str, params: dict, run: Callable[[Any], T]) -> T:
    """``run(psycopg_connection)``, with psycopg errors raised as SQLAlchemy's."""
    import psycopg

    fairy = conn.connection
    try:
        return run(fairy.driver_connection)
    except psycopg.Error as orig:
        error = _driver_error(conn.engine, fairy, sql, params, orig)
        if error.connection_invalidated:
            conn.invalidate(orig)
        raise error from orig


def _driver_error(engine: Engine, fairy: Any, sql: str, params: dict, orig: Exception) -> sa.exc.DBAPIError:
    """``orig`` (a psycopg error) as SQLAlchemy's own class; a disconnect retires the pool."""
    import psycopg

    disconnect = engine.dialect.is_disconnect(orig, fairy.dbapi_connection, None)
    if disconnect:
        _invalidate_pool(engine, fairy, orig)
    return sa.exc.DBAPIError.instance(
        sql, params, orig, psycopg.Error, connection_invalidated=disconnect, dialect=engine.dialect
    )


def _invalidate_pool(engine: Engine, fairy: Any, exc: BaseException) -> None:
    """After a disconnect, retire every connection of the pool made before now.

    What ``Connection.execute`` does on a disconnect (SQLAlchemy's
    ``Pool._invalidate``): after a server restart or a network cut all idle
    pooled connections are dead too, and a retry that only dropped its own
    would meet the next dead one -- more of them than it has attempts.
    """
    engine.pool._invalidate(fairy, exc)


# -- projections fused with the append ---------------------------------------------------


@dataclass(frozen=True)
class FusedSql:
    """A projection update written as CTEs after ``ev`` (see :meth:`FusedUpdates.get`)."""

    ctes: str
    #: more bind values the CTEs read, from the event's payload model
    binds: Callable[[EventData], dict] | None = None


class FusedUpdates:
    """The live projection statements of :class:`ledger.store.target.SqlTarget`, each
    written against the appended row so that an event and its update are one statement."""

    def __init__(self, tables: ProjectionTables) -> None:
        self.t = tables
        self._fused_sql = self._build_fused_sql()

    def get(self, event_type: str) -> FusedSql | None:
        """This projection's update for one event, as SQL reading the appended row.

        Used by :meth:`PostgresLog.append_fused` inside ``WITH ev AS
        (INSERT ... RETURNING position, recorded_at, ...)``; binds ``:key`` (the
        stream key), ``:task_state``, ``:ref_id`` and ``:payload``. The same rules as the
        handlers above, written against ``ev``: a duplicate event (no ``ev`` row)
        changes nothing.

        The returned :class:`FusedSql` holds one or more CTEs, the last named
        ``projection``. Chord started/part-added events return None: they take
        the general path (they are rare; applied chords, returned parts and the
        claim are the hot ones).
        """
        return self._fused_sql.get(event_type)

    def _build_fused_sql(self) -> dict[str, FusedSql]:
        tm, g = self.t.task_meta.name, self.t.groups.name
        c, p, n = self.t.chords.name, self.t.chord_parts.name, self.t.chord_counts.name
        # A returned part is a row per distinct task id of the chord (its id in
        # :ref_id, the part's stream being part:<task id>), counted in this
        # backend's own row of the chord's count: the same rule as
        # SqlTarget._chord_part_returned. Neither the chord's row nor another
        # writer's count is touched, so the parts of a chord never wait for each
        # other's row lock.
        part_returned = FusedSql(
            f"part AS (INSERT INTO {p} (chord_id, task_id, status, position)"
            " SELECT CAST(:ref_id AS varchar), CAST(:key AS varchar),"
            " CAST(:task_state AS varchar), ev.position FROM ev"
            " ON CONFLICT DO NOTHING RETURNING chord_id),"
            f" counted AS (INSERT INTO {n} (chord_id, stripe, returned)"
            " SELECT chord_id, pg_backend_pid(), 1 FROM part"
            f" ON CONFLICT (chord_id, stripe) DO UPDATE SET returned = {n}.returned + 1),"
            " projection AS (SELECT position FROM ev)"
        )
        fired = FusedSql(
            f"projection AS (INSERT INTO {c} (chord_id, size, fired_position)"
            " SELECT CAST(:key AS varchar), NULL, ev.position FROM ev"
            f" ON CONFLICT (chord_id) DO UPDATE SET"
            f" fired_position = COALESCE({c}.fired_position, excluded.fired_position))"
        )
        # SENT/RECEIVED change the catalogue only (Celery's view ignores them); the
        # fused path keeps them one autocommitted round trip on PostgreSQL -- SENT
        # is on the publisher's .delay() path.
        catalogue = self._catalogue_sql()
        lifecycle = {
            t: FusedSql(f"{catalogue[t]}, projection AS (SELECT position FROM ev)", binds=_lifecycle_binds)
            for t in (TaskSent.type, TaskReceived.type)
        }
        # A new life starts empty: the same rule as _chord_applied. A data-modifying
        # CTE runs whether or not the statement reads it.
        applied = FusedSql(
            f"reset AS (DELETE FROM {p} WHERE chord_id = CAST(:key AS varchar)"
            " AND EXISTS (SELECT 1 FROM ev)),"
            f" recount AS (DELETE FROM {n} WHERE chord_id = CAST(:key AS varchar)"
            " AND EXISTS (SELECT 1 FROM ev)),"
            f" projection AS (INSERT INTO {c} (chord_id, size, fired_position)"
            " SELECT CAST(:key AS varchar), NULL, NULL FROM ev"
            " ON CONFLICT (chord_id) DO UPDATE SET size = NULL, fired_position = NULL)"
        )
        return {
            ChordApplied.type: applied,
            ChordPartReturned.type: part_returned,
            ChordFired.type: fired,
            **lifecycle,
        } | {
            event_type: FusedSql(
                f"{catalogue[event_type]}, projection AS ({sql})" if event_type in catalogue
                else f"projection AS ({sql})",
                binds=_catalogue_binds if event_type == TaskState.type else None,
            )
            for event_type, sql in self._fused_updates(tm, g).items()
        }

    def _catalogue_sql(self) -> dict[str, str]:
        """The catalogue's CTEs, by event type: :meth:`_catalogue_state`,
        :meth:`_lifecycle` and the tombstone flags of :meth:`_task_gone`, against ``ev``."""
        c = self.t.catalogue.name
        ready = ", ".join(f"'{s}'" for s in sorted(READY_STATES))
        ended = f"({c}.forgotten OR {c}.expired)"
        state = "CAST(:task_state AS varchar)"
        sql_type = {"retries": "integer", "args": "bytea", "kwargs": "bytea"}
        binds = ", ".join(f"CAST(:{k} AS {sql_type.get(k, 'varchar')})" for k in PAYLOAD_FIELDS)
        upsert = (
            f"catalogue AS (INSERT INTO {c} (task_id, state, position, first_seen, started_at,"
            f" finished_at, {', '.join(PAYLOAD_FIELDS)}, forgotten, expired)"  # lifecycle times NULL
            f" SELECT CAST(:key AS varchar), {state}, ev.position, ev.recorded_at,"
            f" CASE WHEN {state} = '{STARTED}' THEN ev.recorded_at END,"
            f" CASE WHEN {state} IN ({ready}) THEN ev.recorded_at END, {binds}, false, false"
            " FROM ev ON CONFLICT (task_id) DO UPDATE SET state = excluded.state,"
            " position = excluded.position, finished_at = excluded.finished_at,"
            " forgotten = false, expired = false, "
            + ", ".join(f"{k} = excluded.{k}" for k in PAYLOAD_FIELDS)
            + f", first_seen = CASE WHEN {ended} THEN excluded.first_seen ELSE {c}.first_seen END,"
            " started_at = CASE WHEN excluded.started_at IS NOT NULL THEN excluded.started_at"
            f" WHEN {ended} THEN NULL ELSE {c}.started_at END, "
            + ", ".join(f"{k} = CASE WHEN {ended} THEN NULL ELSE {c}.{k} END" for k in LIFECYCLE_TIMES)
            + f" WHERE {c}.state <> '{STICKY_STATE}' OR {ended})"
        )

        def lifecycle(event_type: str) -> str:
            incoming = STATE_OF[event_type]
            sent = event_type == TaskSent.type
            below = ", ".join(f"'{s}'" for s, r in RANK.items() if r <= RANK[incoming])
            takes = f"({ended} OR {c}.state IN ({below}))"
            # the attempt's SENT gives the columns a RECEIVED does not carry, under either state
            lifecycle_states = ", ".join(f"'{s}'" for s in RANK)
            carried = f"({ended} OR {c}.state IN ({lifecycle_states}))" if sent else ended

            def pick(cond: str, k: str) -> str:
                return f"{k} = CASE WHEN {cond} THEN excluded.{k} ELSE {c}.{k} END"

            return (
                f"catalogue AS (INSERT INTO {c} (task_id, state, position, first_seen, started_at,"
                f" finished_at, sent_at, ready_at, received_at, {', '.join(PAYLOAD_FIELDS)},"
                f" forgotten, expired) SELECT CAST(:key AS varchar), {state}, ev.position,"
                " ev.recorded_at, NULL, NULL, CAST(:sent_at AS timestamptz),"
                f" CAST(:ready_at AS timestamptz), {'NULL' if sent else 'ev.recorded_at'}, {binds},"
                " false, false FROM ev ON CONFLICT (task_id) DO UPDATE SET "
                + ", ".join(pick(takes, k) for k in ("state", "position", *RECEIVED_FIELDS)) + ", "
                + ", ".join(pick(carried, k) for k in SENT_FIELDS) + ", "
                + ", ".join(pick(ended, k) for k in ("first_seen", "finished_at", "forgotten", "expired"))
                + ", "
                # a SENT begins an attempt (sets its times, clears the rest); RECEIVED
                # sets its own; a new life has none but the event's
                + ", ".join(f"{k} = excluded.{k}" if sent else pick(ended, k)
                            for k in ("sent_at", "ready_at", "started_at"))
                + ", received_at = excluded.received_at"
                f" WHERE {c}.state <> '{STICKY_STATE}' OR {ended})"
            )

        def flag(column: str) -> str:
            return (
                f"catalogue AS (UPDATE {c} SET {column} = true"
                " WHERE task_id = CAST(:key AS varchar) AND EXISTS (SELECT 1 FROM ev))"
            )

        return {
            TaskState.type: upsert,
            TaskSent.type: lifecycle(TaskSent.type),
            TaskReceived.type: lifecycle(TaskReceived.type),
            TaskForgotten.type: flag("forgotten"),
            ResultExpired.type: flag("expired"),
        }

    @staticmethod
    def _fused_updates(tm: str, g: str) -> dict[str, str]:
        ready = ", ".join(f"'{s}'" for s in sorted(READY_STATES))
        task_gone = (
            f"DELETE FROM {tm} WHERE task_id = CAST(:key AS varchar) AND EXISTS (SELECT 1 FROM ev)"
        )
        group_gone = (
            f"DELETE FROM {g} WHERE group_id = CAST(:key AS varchar) AND EXISTS (SELECT 1 FROM ev)"
        )
        return {
            TaskState.type: (
                f"INSERT INTO {tm} (task_id, status, position, done_at, payload)"
                " SELECT CAST(:key AS varchar), CAST(:task_state AS varchar), ev.position,"
                f" CASE WHEN CAST(:task_state AS varchar) IN ({ready}) THEN ev.recorded_at END,"
                " :payload FROM ev"
                " ON CONFLICT (task_id) DO UPDATE SET status = excluded.status,"
                " position = excluded.position, done_at = excluded.done_at,"
                f" payload = excluded.payload WHERE {tm}.status <> '{STICKY_STATE}'"
            ),
            TaskForgotten.type: task_gone,
            ResultExpired.type: task_gone,
            GroupSaved.type: (
                f"INSERT INTO {g} (group_id, position, saved_at, payload)"
                " SELECT CAST(:key AS varchar), ev.position, ev.recorded_at, :payload FROM ev"
                " ON CONFLICT (group_id) DO UPDATE SET position = excluded.position,"
                " saved_at = excluded.saved_at, payload = excluded.payload"
            ),
            GroupForgotten.type: group_gone,
            GroupExpired.type: group_gone,
        }


    def claim_guard(self) -> str:
        """When a ``chord.fired`` (the claim: whoever appends it sends the body) is
        appended (``AND ...`` of its insert, whose snapshot also gives the version
        it takes): the chord ``:key`` is complete -- as many distinct parts returned
        in its life as its size (the sum of its ``ledger_chord_counts`` rows) --
        and not claimed (projections.chord).

        Claims serialize on the chord stream's version, as every append to a stream
        does: two transactions that both find the chord claimable take the same
        version, and the second to insert fails on the unique (stream, version)
        and is retried, to find the claim. Any other append to the chord's stream
        since the snapshot (a new life, a part added) does the same. Parts, in
        their own streams, never conflict with a claim: one only makes the chord
        more complete.

        And the claim's transaction, if its first write (the part's) took an id
        already, must be newer than every event of the chord's stream (per-stream
        follow order, module docstring); else a claim in a transaction of its own
        follows (:meth:`PostgresLog.return_chord_part`). The id is read without
        taking one: that claim's transaction has none before its insert.
        """
        return (
            f" AND {claimable_sql(self.t)}"
            " AND COALESCE(MAX(tx_id), 0) < COALESCE("
            "pg_current_xact_id_if_assigned()::text::bigint, 9223372036854775807)"
        )


def _catalogue_binds(data: EventData) -> dict:
    return fields_of(data.__dict__)


def _lifecycle_binds(data: EventData) -> dict:
    columns = lifecycle_columns(data)
    del columns["state"]  # :task_state
    return columns


# -- the log -------------------------------------------------------------------------------



#: The oldest transaction id still running that may write this database's log
#: (module docstring), or the next one if none: every row below it is settled.
#: xip holds the server's running top-level xids; pg_stat_activity shows 32-bit
#: xids, so those compare modulo 2^32 (a live xid cannot be 2^31 from another).
VISIBLE_HORIZON = """(
    SELECT coalesce(
        (SELECT min(x::text::bigint) FROM pg_snapshot_xip(s.snap) AS x
         WHERE mod(x::text::bigint, 4294967296) NOT IN (
             SELECT backend_xid::text::bigint FROM pg_stat_activity
             WHERE backend_xid IS NOT NULL AND datname IS DISTINCT FROM current_database())),
        pg_snapshot_xmax(s.snap)::text::bigint)
    FROM (SELECT pg_current_snapshot() AS snap) AS s
)"""


class PostgresLog(FollowableLog):
    """No writer waits for another; visibility by transaction id (module docstring)."""

    _insert_core = """
        INSERT INTO ledger_events (tx_id, event_id, stream_id, stream_version, type,
            schema_version, recorded_at, task_state, ref_id, chord_size, payload)
        SELECT pg_current_xact_id()::text::bigint, :event_id, CAST(:stream_id AS varchar),
            COALESCE(MAX(stream_version), 0) + 1, CAST(:type AS varchar),
            CAST(:schema_version AS smallint), now(), CAST(:task_state AS varchar),
            CAST(:ref_id AS varchar), CAST(:chord_size AS integer), :payload
        FROM ledger_events WHERE stream_id = CAST(:stream_id AS varchar)
        HAVING (CAST(:expected AS integer) IS NULL
            OR COALESCE(MAX(stream_version), 0) = CAST(:expected AS integer)){guard}
        ON CONFLICT (event_id) DO NOTHING
    """
    _binds = tuple(sa.bindparam(k, type_=v) for k, v in BIND_TYPES.items() if k != "recorded_at")

    _insert_sql = sa.text(
        _insert_core.format(guard="")
        + """
        RETURNING position, tx_id, stream_version, recorded_at,
            (SELECT p.tx_id FROM ledger_events p
             WHERE p.stream_id = CAST(:stream_id AS varchar)
             ORDER BY p.stream_version DESC LIMIT 1) AS prior_tx,
            """ + _NOTIFY
    ).bindparams(*_binds)

    # Advisory lock per chord stream (its own events: applied, started, part added,
    # the claim; returned parts are in streams of their own): writers of a chord
    # stream wait for each other instead of failing on its next version and
    # retrying. (A claim needs no lock: FusedUpdates.claim_guard.) Taken in its own
    # statement before the insert so that the insert's snapshot sees the lock
    # holder's rows.
    _lock_stream_sql = sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:stream_id, 0))")

    def __init__(self, notify: str = "ready") -> None:
        if notify not in NOTIFY_MODES:
            raise ValueError(f"notify must be one of {', '.join(NOTIFY_MODES)}, not {notify!r}")
        self.notify_all = notify == "all"
        self._fused: dict[tuple[FusedSql, str, bool], str] = {}

    def _notifies(self, item: EncodedEvent) -> bool:
        """Whether this append wakes waiters and followers (module docstring)."""
        if self.notify_all:
            return True
        if item.new.data.type in LIFECYCLE_TYPES:
            return False  # SENT/RECEIVED: no get() waits for them, as for STARTED
        if item.new.data.type == TaskState.type:
            return item.columns.get("task_state") in READY_STATES
        return item.new.data.type not in _CHORD_RETURNS

    def _insert(self, conn: Connection, item: EncodedEvent) -> RecordedEvent | None:
        params = item.params()
        params["expected"] = item.new.expected_version
        params["notify"] = self._notifies(item)
        if stream_kind(params["stream_id"]) == CHORD:
            conn.execute(self._lock_stream_sql, {"stream_id": params["stream_id"]})
        row = self._run_insert(conn, self._insert_sql, params, item)
        if row is None:
            return None
        if row.prior_tx is not None and row.prior_tx > row.tx_id:
            raise RetryableConflict(
                f"stream {params['stream_id']!r} has a newer transaction's event; retrying"
            )
        return item.recorded(row.position, row.stream_version, row.recorded_at, row.tx_id)

    def append_fused(
        self, conn: Connection, items: Sequence[EncodedEvent], projections: Sequence[FusedSql]
    ) -> tuple[list[RecordedEvent], list[EncodedEvent]]:
        """Append events, each with its projection update in the same statement.

        ``projections[i]`` (from :meth:`FusedUpdates.get`)
        reads the appended row from the CTE ``ev``; a duplicate event inserts no
        row, so its projection is not touched either. The events go out as one
        pipeline in the caller's transaction (a lone store takes
        :meth:`append_fused_autocommit`: one round trip and one WAL flush).

        A chord stream's event is preceded in the pipeline by its stream's advisory
        lock (see ``_lock_stream_sql``): the lock is held for that statement and
        the COMMIT only, not for several client round trips.

        Returns the recorded events and the items that inserted no row
        (duplicates, or a failed ``expected_version``: see
        :meth:`_explain_no_row`). ``prior_tx`` guards per-stream follow
        order as in :meth:`_insert`: a batch's later inserts may follow another
        transaction's commit.
        """
        return self._append_fused(lambda st: driver_fetch(conn, st), items, projections)

    def append_fused_autocommit(
        self,
        engine: Engine,
        items: Sequence[EncodedEvent],
        projections: Sequence[FusedSql],
    ) -> tuple[list[RecordedEvent], list[EncodedEvent]]:
        """Events as one transaction in one round trip, on a pooled driver connection.

        See :func:`pooled_fetch`. A lone event is one
        autocommitted statement: the store's hot path. No ``prior_tx`` conflict
        can come back from it: the statement's transaction id is assigned after
        its snapshot was taken, so every event it sees has a lower one.

        Several events go out as one
        pipeline, which PostgreSQL runs as one implicit transaction committed
        at the pipeline's Sync: an error rolls all of them back. A chord
        event's stream lock is then held for the statements and the commit's
        WAL flush only, never across a client round trip.

        A lone SENT or RECEIVED commits without waiting for its WAL flush
        (``synchronous_commit`` off for this transaction only): SENT is on the
        publisher's ``.delay()`` path, RECEIVED on the worker's consumer, and
        neither is a result. The commit is visible at once, in the same order;
        the WAL writer flushes it within ~0.2 s, and any later durable commit
        (the task's STARTED, anyone's) flushes it too. A PostgreSQL crash in that
        window loses it -- never a publisher's or a worker's crash. Measured on
        a loaded 2-core VM (python -m bench.delay, README): with it, tracking
        costs ``.delay()`` one round trip instead of one WAL flush.

        A store notifies in its own statement (module docstring, "Which appends NOTIFY").
        """
        return self._append_fused(
            lambda st: pooled_fetch(engine, st), items, projections, relaxed=commits_relaxed(items),
            checked=len(items) > 1,
        )

    #: NOTIFY as a transaction of its own, after the events' commit (module docstring).
    _notify_sql = driver_sql(
        f"SELECT {_pg_notify('s')} FROM unnest(CAST(:streams AS text[])) s"
    )

    def _wake_after_commit(self, items: Sequence[EncodedEvent]) -> tuple[str, dict] | None:
        """The NOTIFY statement for ``items`` that wake waiters, or None if none does."""
        streams = sorted({item.new.data.stream_id for item in items if self._notifies(item)})
        return (self._notify_sql, {"streams": streams}) if streams else None

    def _fused_params(
        self, item: EncodedEvent, projection: FusedSql, *, relaxed: bool = False, notify: bool = True
    ) -> dict:
        params = item.params()
        params["expected"] = item.new.expected_version
        params["key"] = item.new.data.stream_key
        params["notify"] = notify and self._notifies(item)
        if projection.binds is not None:
            params.update(projection.binds(item.new.data))
        params["relaxed"] = relaxed
        return params

    def _append_fused(
        self,
        fetch: Callable[[list[tuple[str, dict]]], list[tuple | None]],
        items: Sequence[EncodedEvent],
        projections: Sequence[FusedSql],
        *,
        relaxed: bool = False,
        checked: bool = True,
        notify: bool = True,
    ) -> tuple[list[RecordedEvent], list[EncodedEvent]]:
        statements, slots = [], []
        for item, projection in zip(items, projections, strict=True):
            params = self._fused_params(item, projection, relaxed=relaxed, notify=notify)
            if stream_kind(params["stream_id"]) == CHORD:
                statements.append((self._lock_stream_driver_sql, {"stream_id": params["stream_id"]}))
            slots.append(len(statements))
            statements.append((self._fused_statement(projection, checked=checked), params))
        rows = self._guarded(lambda: fetch(statements), statements[slots[0]][1], items[0])
        recorded, missing = [], []
        for item, slot in zip(items, slots, strict=True):
            params, row = statements[slot][1], rows[slot]
            if row is None:
                missing.append(item)
                continue
            position, tx_id, version, recorded_at, prior_tx, _, _ = row
            if prior_tx is not None and prior_tx > tx_id:
                raise RetryableConflict(
                    f"stream {params['stream_id']!r} has a newer transaction's event; retrying"
                )
            recorded.append(item.recorded(position, version, recorded_at.astimezone(timezone.utc), tx_id))
        return recorded, missing

    _lock_stream_driver_sql = driver_sql(str(_lock_stream_sql))

    def return_chord_part(
        self,
        engine: Engine,
        part: tuple[EncodedEvent, FusedSql],
        claim: tuple[EncodedEvent, FusedSql, str],
        read: tuple[str, dict],
        before: tuple[EncodedEvent, FusedSql] | None = None,
    ) -> tuple[bool, bool, list[tuple]]:
        """A returned chord part and, if the chord is then complete, the body's claim;
        then ``read`` (the claimed chord's inputs). One round trip; two when the
        part completed the chord at the same time as another part.

        The part is in a stream of its own (:class:`ledger.events.ChordPartReturned`)
        and takes no lock: the parts of a chord returned at once commit side by
        side, each waiting for its own WAL flush only. One pipeline:

        1. A transaction: ``before`` (the part's own task state), the part, and
           the claim (``chord.fired``, inserted only if the chord is complete
           and unclaimed as this transaction sees it: ``guard``).
        2. The NOTIFY of ``before``'s ready state, in a transaction of its own.
        3. ``read``: rows only if the claim is in the log, else a last row whose
           status is :data:`CLAIMABLE` if the chord is complete and unclaimed.

        1 cannot see a part whose transaction runs beside it, but 3 runs after
        1's commit, and a part that commits last sees every part: when two parts
        complete the chord at once, neither claims in 1, each finds the chord
        claimable in 3, and each claims again, in a transaction of its own, in a
        second round trip; one claim gets in (``guard``). A part whose
        transaction failed never claims: the error is raised before that.

        Returns whether the part was recorded (False: its event id was already in
        the log), whether this call claimed the body, and ``read``'s rows.
        """
        (item, projection), (claim_item, claim_projection, guard) = part, claim
        # No prior_tx check for the part: its stream is its own, and appending the
        # same part twice at once inserts one event (the event id is derived).
        units = [(item, projection, ""), (claim_item, claim_projection, guard)]
        if before is not None:
            units.insert(0, (*before, ""))
        statements = [
            (self._fused_statement(fused, condition, checked=False), self._fused_params(new, fused, notify=False))
            for new, fused, condition in units
        ]
        wake = self._wake_after_commit([unit[0] for unit in units])
        reads = [read] if wake is None else [wake, read]
        rows, after = self._guarded(
            lambda: pooled_pipeline(engine, statements, reads), statements[-2][1], item
        )
        recorded, claimed, read_rows = rows[-2] is not None, rows[-1] is not None, after[-1]
        if not claimed and read_rows and read_rows[-1][:2] == (None, CLAIMABLE):
            rows, after = self._guarded(
                lambda: pooled_pipeline(engine, statements[-1:], [read]), statements[-1][1], claim_item
            )
            claimed, read_rows = rows[-1] is not None, after[-1]
        # ``before`` inserting no row is a duplicate (it has no expected version): a
        # retry after a lost reply, whose event id was kept; the rest is idempotent too.
        return recorded, claimed, read_rows

    def _fused_statement(self, projection: FusedSql, guard: str = "", *, checked: bool = True) -> str:
        """The event's insert and its projection update as one statement; ``guard``
        (SQL, ``AND ...``) is a further condition for inserting the event at all.
        ``checked=False`` where no ``prior_tx`` conflict can come back (the statement
        then spares the lookup of the stream's previous event)."""
        key = (projection, guard, checked)
        sql = self._fused.get(key)
        if sql is None:
            prior = (
                "(SELECT p.tx_id FROM ledger_events p"
                " WHERE p.stream_id = CAST(:stream_id AS varchar)"
                " ORDER BY p.stream_version DESC LIMIT 1)" if checked else "NULL"
            )
            sql = driver_sql(
                f"WITH ev AS ({self._insert_core.format(guard=guard)}"
                " RETURNING position, tx_id, stream_version, recorded_at),"
                f" {projection.ctes}"
                " SELECT position, tx_id, stream_version, recorded_at,"
                f" {prior} AS prior_tx,"
                f" {_NOTIFY},"
                # is_local: this transaction only (append_fused_autocommit says when)
                " CASE WHEN CAST(:relaxed AS boolean)"
                " THEN set_config('synchronous_commit', 'off', true) END AS relaxed"
                " FROM ev"
            )
            self._fused[key] = sql
        return sql

    def _run_insert(self, conn: Connection, stmt: sa.TextClause, params: dict, item: EncodedEvent):
        return self._guarded(lambda: conn.execute(stmt, params).first(), params, item)

    @staticmethod
    def _guarded(insert, params: dict, item: EncodedEvent):
        """Run an insert; a taken stream version is a conflict (retried unless expected)."""
        try:
            return insert()
        except sa.exc.IntegrityError as exc:
            if "stream_version" not in str(exc.orig):
                raise
            if item.new.expected_version is None:
                raise RetryableConflict(f"stream {params['stream_id']!r} moved on") from exc
            raise VersionConflict(params["stream_id"], item.new.expected_version, None) from exc

    _read_from_sql = sa.text(
        f"""
        SELECT {EVENT_COLUMNS} FROM ledger_events
        WHERE (tx_id, position) > (:tx_id, :position)
          AND tx_id < {VISIBLE_HORIZON}
        ORDER BY tx_id, position
        LIMIT :limit
        """
    ).columns(recorded_at=events_table.c.recorded_at.type, event_id=sa.Uuid())

    # Followers page through the whole log (the relay at >10k events/s): the
    # driver-level statement and plain tuples cost ~35% less per row than the
    # Core result's Row objects and type processors (measured, 5000-row pages).
    _read_from_driver_sql = driver_sql(str(_read_from_sql))

    def read_from(self, conn: Connection, after: Checkpoint, limit: int) -> list[RecordedEvent]:
        rows = conn.exec_driver_sql(
            self._read_from_driver_sql,
            {"tx_id": after.tx_id, "position": after.position, "limit": limit},
        )
        utc = timezone.utc
        return [
            RecordedEvent(position, event_id, stream_id, version, type_, schema, at.astimezone(utc),
                          payload, tx_id)
            for position, tx_id, event_id, stream_id, version, type_, schema, at, payload in rows
        ]

    def visible_horizon(self, conn: Connection) -> int:
        """Transaction ids below this are settled; rows at or above wait (follower lag)."""
        return conn.execute(sa.text(f"SELECT {VISIBLE_HORIZON}")).scalar_one()


# -- wake-ups and locks on their own connections -------------------------------------------


def _conninfo(engine: Engine) -> str:
    """libpq's form of the engine's URL, for a dedicated psycopg connection."""
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


class PgListener(Listener):
    """LISTEN on one dedicated autocommit connection; returns the stream ids it was told about."""

    wakes: ClassVar[bool] = True

    def __init__(self, engine: Engine) -> None:
        self._conninfo = _conninfo(engine)
        self._conn: Any = None

    def __enter__(self) -> Listener:
        # LISTEN before the caller's first read: a commit between that read and a
        # lazy LISTEN would otherwise wait for the next poll.
        import psycopg

        try:
            self._conn = self._connect()
        except psycopg.Error as exc:
            log.warning("LISTEN failed (%s); will retry", type(exc).__name__)
        return self

    def _connect(self) -> Any:
        import psycopg

        conn = psycopg.connect(self._conninfo, autocommit=True)
        conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        return conn

    def wait(self, timeout: float) -> list[str]:
        """Stream ids notified within ``timeout`` (empty list on timeout)."""
        import psycopg

        try:
            if self._conn is None:
                # Nothing was heard before LISTEN: return at once so that the caller
                # re-reads the log now that commits will wake it.
                self._conn = self._connect()
                return []
            got = [n.payload for n in self._conn.notifies(timeout=timeout, stop_after=1)]
            if got:
                # Drain what else is queued without waiting.
                got += [n.payload for n in self._conn.notifies(timeout=0.0)]
            return got
        except psycopg.Error as exc:
            log.warning("LISTEN connection lost (%s); reconnecting", type(exc).__name__)
            self.close()
            time.sleep(min(timeout, 1.0))
            return []

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


class PgRelayLock(RelayLock):
    """A session-level advisory lock on a dedicated connection.

    Session-level, not transaction-level: it must outlive the relay's many short
    transactions. The server releases it when the connection closes, which is
    what makes a standby relay take over from a killed one.
    """

    def __init__(self, engine: Engine, name: str) -> None:
        self._conninfo = _conninfo(engine)
        self.name = name
        self._conn: Any = None

    def try_acquire(self) -> bool:
        import psycopg

        try:
            if self._conn is None:
                self._conn = psycopg.connect(self._conninfo, autocommit=True)
            got = self._conn.execute(
                "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (self.name,)
            ).fetchone()[0]
        except psycopg.Error as exc:
            log.warning("relay lock: database unreachable (%s)", type(exc).__name__)
            self.release()
            return False
        return bool(got)

    def held(self) -> bool:
        import psycopg

        try:
            self._conn.execute("SELECT 1")
            return True
        except (psycopg.Error, AttributeError):
            # The connection is gone, and with it the lock: another relay may be active.
            self.release()
            return False

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


# -- the store -------------------------------------------------------------------------------

#: Session advisory lock key: one rebuild at a time (they share the __rebuild tables).
REBUILD_LOCK = 0x6C65646765720001
#: Advisory lock key a rebuild holds for its whole run and a prune for its transaction:
#: a prune that committed after the rebuild's snapshot would be undone by its swap (the
#: swapped-in catalogue filled from before the prune), so each waits for the other.
MAINTENANCE_LOCK = 0x6C65646765720003
#: Transaction advisory lock key: one migration at a time per database.
_MIGRATE_LOCK = 0x6C65646765720002
#: Fill statements per worker connection, balanced by their measured cost on a
#: 1,000,000-event log (task_meta ~ chords > groups ~ chord_parts; the catalogue,
#: which decodes a payload per task in Python, costs most). chord_counts is filled
#: from the rebuilt chord_parts: after it, by the same worker.
_FILL_WORKERS = (("task_meta", "chord_parts", "chord_counts"), ("chords", "groups"), ("catalogue",))
#: Stop catching up without the lock once a pass applies fewer events than this.
SMALL_CATCH_UP = 500
MAX_CATCH_UP_PASSES = 20
#: How long the swap waits for its first lock before it rolls back and tries again.
SWAP_LOCK_TIMEOUT = "5s"
SWAP_ATTEMPTS = 300
_RETRY_SQLSTATES = {"40P01", "55P03"}  # deadlock detected, lock not available

_NOT_IN_SNAPSHOT = sa.text(
    # Events the snapshot did not see: their transaction was in flight (xip) or
    # began after it (>= xmax). Everything below xmin was visible, which lets the
    # (tx_id, position) index narrow the scan.
    f"""
    SELECT {EVENT_COLUMNS}
    FROM ledger_events
    WHERE tx_id >= pg_snapshot_xmin(CAST(:snap AS pg_snapshot))::text::bigint
      AND NOT pg_visible_in_snapshot(tx_id::text::xid8, CAST(:snap AS pg_snapshot))
    ORDER BY tx_id, position
    """
).columns(recorded_at=events_table.c.recorded_at.type, event_id=sa.Uuid())


class PostgresStore(MaintainableStore):
    """The ledger on PostgreSQL (psycopg 3)."""

    single_statement_options: ClassVar[dict[str, Any]] = {"isolation_level": "AUTOCOMMIT"}
    snapshot_options: ClassVar[dict[str, Any]] = {"isolation_level": "REPEATABLE READ"}
    #: "PostgreSQL text fields cannot contain NUL (0x00) bytes" (psycopg's DataError).
    holds_nul: ClassVar[bool] = False

    def __init__(self, engine: Engine, *, notify: str = "ready") -> None:
        self.log: PostgresLog = PostgresLog(notify)
        super().__init__(engine)
        self.fused = FusedUpdates(LIVE)
        self._task_read = PointRead("ledger_task_meta", self.target.task_point_sql().replace(":key", "$1"))
        self._chord_header_sql = driver_sql(str(self.target.chord_header_sql))
        registered = _WARM_UPS.get(engine)
        if registered is None or registered() is None:  # a short-lived store (migrate's) may be gone
            _WARM_UPS[engine] = weakref.WeakMethod(self._warm_up)
        # The chord's inputs, read after a returned part only if the claim is in the
        # log; else one row, CLAIMABLE, if the chord is complete and unclaimed: a
        # part that claimed nothing pays two index probes for it.
        claimed = "EXISTS (SELECT 1 FROM ledger_events WHERE event_id = :claim_id)"
        self._claimed_header_sql = driver_sql(
            f"SELECT * FROM ({self.target.chord_header_sql}) h WHERE {claimed}"
            f" UNION ALL SELECT NULL, '{CLAIMABLE}', NULL, NULL, NULL"
            f" WHERE NOT {claimed} AND {claimable_sql(self.target.t)}"
        )

    @staticmethod
    def insert(table: sa.Table) -> Any:
        return pg_insert(table)

    # -- writing ---------------------------------------------------------------------------

    def append(self, conn: Connection, items: Sequence[EncodedEvent]) -> Appended:
        """Event types with a fused projection update go out as one pipeline
        (:meth:`PostgresLog.append_fused`); others take the general path."""
        fused = [self.fused.get(item.new.data.type) for item in items]
        # A failed insert in a pipeline cannot be told apart per item, so a batch
        # with expected versions takes the general path, which checks each.
        expects = len(items) > 1 and any(i.new.expected_version is not None for i in items)
        if all(fused) and not expects:
            recorded, missing = self.log.append_fused(conn, items, fused)  # type: ignore[arg-type]
            for item in missing:
                self.log.explain_no_row(conn, item)  # raises VersionConflict unless a duplicate
            return recorded, [item.new.event_id for item in missing]
        return super().append(conn, items)

    def autocommit_append(self, items: Sequence[EncodedEvent]) -> Any:
        if len(items) != 1:
            return None
        fused = self.fused.get(items[0].new.data.type)
        # A lone event with a fused update is one autocommitted statement; not
        # a chord event, whose stream lock is scoped to a transaction.
        if fused is None or stream_kind(items[0].new.stream_id) == CHORD:
            return None

        return lambda: self.log.append_fused_autocommit(self.engine, items, [fused])

    def _warm_up(self, raw: Any, info: dict) -> None:
        """Prepare and plan the hot paths' statements on a new kept connection.

        A statement's first run on a connection parses and plans it (and loads the
        tables' catalog entries into the server process): ~2.5 ms for a store and
        ~1.7 ms for a chord part, measured in a fresh prefork child at load 3,
        against ~0.5 ms for the next runs. Here they run once when the connection is opened, in one round trip, with
        sample events that expect a stream version no stream has: each statement
        inserts and changes nothing. (The expectation goes as text, as a None
        does, so that the statement is prepared for the parameter types of the
        real runs, :func:`_pipelined`.)
        Best effort: on a database that cannot take them (no schema yet) the
        first real run prepares each instead.
        """
        import psycopg

        warm = f"ledger-warm-up-{uuid.uuid4()}"
        part = EncodedEvent.of(NewEvent(ChordPartReturned(chord_id=warm, task_id=warm, status="SUCCESS")))
        claim = EncodedEvent.of(NewEvent(ChordFired(chord_id=warm, body_task_id=warm)))
        # (event, guard, relaxed): as return_chord_part and a store run them
        writes = [
            (EncodedEvent.of(NewEvent(TaskState(task_id=warm, status="SUCCESS"))), "", False),
            (part, "", False),
            (claim, self.fused.claim_guard(), False),
            (EncodedEvent.of(NewEvent(TaskSent(task_id=warm, name=warm, sent_at=datetime.now(timezone.utc)))),
             "", True),
        ]
        statements = []
        for item, guard, relaxed in writes:
            fused = self.fused.get(item.new.data.type)
            params = self.log._fused_params(item, fused, relaxed=relaxed, notify=False)  # type: ignore[arg-type]
            params["expected"] = "-1"  # no stream is at version -1: nothing is inserted
            statements.append((self.log._fused_statement(fused, guard, checked=False), params))  # type: ignore[arg-type]
        reads = [(self._claimed_header_sql, {"key": warm, "claim_id": claim.new.event_id})]
        try:
            _pipelined(raw, info, statements, reads)
        except psycopg.Error as exc:
            log.debug("hot statements not prepared ahead: %s", exc)

    def chord_part_write(self, part: EncodedEvent, claim: EncodedEvent, before: EncodedEvent | None = None) -> Any:
        """``before``, the part, the claim if the chord is then complete, and the
        chord's inputs if claimed (:meth:`PostgresLog.return_chord_part`)."""
        chord_id = part.new.data.chord_id  # type: ignore[attr-defined]
        fused = self.fused.get
        first = None
        if before is not None:
            first = (before, fused(before.new.data.type))
            if first[1] is None or before.new.expected_version is not None:
                return None

        def write() -> tuple[bool, bool, Any]:
            recorded, claimed, rows = self.log.return_chord_part(
                self.engine,
                (part, fused(ChordPartReturned.type)),  # type: ignore[arg-type]
                (claim, fused(ChordFired.type), self.fused.claim_guard()),  # type: ignore[arg-type]
                (self._claimed_header_sql, {"key": chord_id, "claim_id": claim.new.event_id}),
                first,  # type: ignore[arg-type]
            )
            return recorded, claimed, self._chord_inputs(chord_id, rows) if claimed else None

        return write

    # -- reading ---------------------------------------------------------------------------

    def task_meta(self, task_id: str) -> TaskMeta | None:
        # get_task_meta's hot path: one prepared SELECT on a pooled driver connection.
        row = pooled_point_read(self.engine, self._task_read, task_id)
        if row is None:
            return None
        task, status, position, done_at, payload = row
        return TaskMeta(task, status, position, done_at and done_at.astimezone(timezone.utc), payload)

    def chord_header(self, conn: Connection, chord_id: str) -> Any:
        # On the completing part's path, before the body is sent: plain tuples from
        # the driver cost ~1 ms less than Core rows at 100 parts (measured).
        return self._chord_inputs(chord_id, driver_fetchall(conn, self._chord_header_sql, {"key": chord_id}))

    def _chord_inputs(self, chord_id: str, rows: list[tuple]) -> Any:
        utc = timezone.utc
        return self.target.chord_header_of(
            chord_id, ((t, s, p, at and at.astimezone(utc), b) for t, s, p, at, b in rows)
        )

    # -- followers -------------------------------------------------------------------------

    def listener(self) -> Listener:
        return PgListener(self.engine)

    def relay_lock(self, name: str) -> RelayLock:
        return PgRelayLock(self.engine, name)

    def follower_lag(self, conn: Connection) -> dict:
        info = super().follower_lag(conn)
        horizon = self.log.visible_horizon(conn)
        t = self.log.table
        info["visible_below_tx_id"] = horizon
        info["held_back"] = conn.execute(sa.select(sa.func.count()).where(t.c.tx_id >= horizon)).scalar_one()
        return info

    # -- rebuild ---------------------------------------------------------------------------

    def rebuild(self, plan: RebuildPlan) -> None:
        """Blue/green with concurrent writers (the reasoning: :mod:`ledger.rebuild`).

        One at a time, and never beside a prune: it waits for a running prune to
        commit before its snapshot, and a prune waits for it (:data:`MAINTENANCE_LOCK`).
        A failed rebuild leaves no ``__rebuild`` table behind.
        """
        with self.engine.connect() as guard:
            guard = guard.execution_options(isolation_level="AUTOCOMMIT")
            if not guard.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": REBUILD_LOCK}).scalar():
                raise RebuildError("another rebuild is running on this database")
            try:
                guard.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": MAINTENANCE_LOCK})
                try:
                    self._rebuild_locked(plan)
                except BaseException:
                    self._drop_new_tables(plan)
                    raise
            finally:
                # Both session locks go with the connection if it was lost.
                with contextlib.suppress(sa.exc.DBAPIError):
                    guard.execute(sa.text("SELECT pg_advisory_unlock_all()"))

    def _drop_new_tables(self, plan: RebuildPlan) -> None:
        """Drop what a failed rebuild filled (best effort: the failure is what to report)."""
        try:
            with self.engine.begin() as conn:
                for slot in plan.slots:
                    conn.execute(sa.text(f'DROP TABLE IF EXISTS "{getattr(plan.new, slot).name}"'))
        except sa.exc.DBAPIError as exc:
            log.warning("rebuild failed; its new tables could not be dropped: %s", exc.orig)

    def _rebuild_locked(self, plan: RebuildPlan) -> None:
        new, slots, report, progress = plan.new, plan.slots, plan.report, plan.progress
        with self.engine.connect() as conn, conn.begin():
            for slot in slots:
                fresh, live = getattr(new, slot), getattr(LIVE, slot)
                conn.execute(sa.text(f'DROP TABLE IF EXISTS "{fresh.name}"'))
                # Columns only: the primary key and indexes are built after the fill,
                # which is faster than maintaining them row by row.
                conn.execute(sa.text(f'CREATE TABLE "{fresh.name}" (LIKE "{live.name}" INCLUDING DEFAULTS)'))

        fill_started = time.perf_counter()
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                # First statement: it fixes the snapshot S that every fill worker imports.
                snapshot, exported = conn.execute(
                    sa.text("SELECT pg_current_snapshot()::text, pg_export_snapshot()")
                ).one()
                report.events = plan.count_events(conn)
                if progress is not None:
                    progress.total = report.events
                share = report.events // len(slots)  # progress per filled table (approximate)
                groups = [[s for s in group if s in slots] for group in _FILL_WORKERS]
                with ThreadPoolExecutor(max_workers=len(groups)) as pool:
                    futures = [
                        pool.submit(self._fill_worker, plan, exported, group, share)
                        for group in groups if group
                    ]
                    problems = [p for future in futures for p in future.result()]
        report.fill_seconds = time.perf_counter() - fill_started
        if problems:
            raise plan.corruption(problems)  # rebuild() drops the new tables

        # Catch-up writes the rebuilt tables only: an event also updates tables that
        # are not rebuilt (a task state's task row, when the catalogue is), and those
        # are live, written by the writers themselves (and REPEATABLE READ would fail
        # on a row a writer changed since the pass's snapshot).
        target = self.target_for(plan.mixed(), slots)
        for _ in range(MAX_CATCH_UP_PASSES):
            with self.engine.connect() as conn:
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
                with conn.begin():
                    next_snapshot = conn.execute(sa.text("SELECT pg_current_snapshot()::text")).scalar_one()
                    applied = _catch_up(conn, target, snapshot, plan.prefixes)
            snapshot = next_snapshot
            report.caught_up += applied
            if applied < SMALL_CATCH_UP:
                break

        swap_started = time.perf_counter()
        self._swap(plan, target, snapshot)
        report.swap_seconds = time.perf_counter() - swap_started
        with self.engine.connect() as conn:
            for slot in slots:
                table = getattr(LIVE, slot)
                report.rows[table.name] = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()

    def _fill_worker(self, plan: RebuildPlan, exported: str, slots: Sequence[str], share: int) -> list[str]:
        """Fill ``slots`` in the exported snapshot, check the payloads they serve
        (``plan.payload_problems``), then build their keys and indexes; returns the
        problems found.

        The check runs here, beside the other workers' fills, not after them all:
        it validates one payload per task in Python (~9 µs each; ~15 before
        2026-12-07), which on a 1,000,000-task log took 13.8 of a 48.7 s rebuild
        when it ran last (measured).
        The rows a catch-up adds later come from events the live path decoded.
        """
        problems: list[str] = []
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                conn.execute(sa.text(f"SET TRANSACTION SNAPSHOT '{exported}'"))
                # Window sorts of a large log spill to disk with the default 4MB.
                conn.execute(sa.text("SET LOCAL work_mem = '256MB'"))
                conn.execute(sa.text("SET LOCAL maintenance_work_mem = '256MB'"))
                for slot, stmt in plan.statements(conn, plan.new, slots):
                    plan.run_fill(conn, stmt)
                    problems += plan.payload_problems(conn, [slot])
                    _add_keys(conn, getattr(plan.new, slot))
                    if plan.progress is not None:
                        plan.progress.advance(share)
        return problems

    def _swap(self, plan: RebuildPlan, target: Any, snapshot: str) -> None:
        live_names = [getattr(LIVE, s).name for s in plan.slots]
        for attempt in range(SWAP_ATTEMPTS):
            try:
                with self.engine.connect() as conn, conn.begin():
                    # Deadlock-free locking: we wait only while holding nothing (the
                    # first table), and take the others NOWAIT, rolling back and trying
                    # again if a writer is in the middle of a transaction on one of
                    # them. Writers touch the tables in data-dependent orders (a chord
                    # part writes chord_parts then chords), so no fixed order of ours
                    # could avoid a cycle. ACCESS EXCLUSIVE from the start, because the
                    # DROP needs it anyway and upgrading later would wait while holding.
                    # Readers therefore pause for the last catch-up and the renames.
                    conn.execute(sa.text(f"SET LOCAL lock_timeout = '{SWAP_LOCK_TIMEOUT}'"))
                    conn.execute(sa.text(f"LOCK TABLE {live_names[0]} IN ACCESS EXCLUSIVE MODE"))
                    if len(live_names) > 1:
                        conn.execute(sa.text(
                            f"LOCK TABLE {', '.join(live_names[1:])} IN ACCESS EXCLUSIVE MODE NOWAIT"
                        ))
                    caught_up = _catch_up(conn, target, snapshot, plan.prefixes)
                    for slot in plan.slots:
                        _rename(conn, getattr(plan.new, slot), getattr(LIVE, slot))
                plan.report.caught_up += caught_up
                plan.report.swap_attempts = attempt + 1
                return
            except sa.exc.OperationalError as exc:
                state = getattr(exc.orig, "sqlstate", None)
                if state not in _RETRY_SQLSTATES or attempt == SWAP_ATTEMPTS - 1:
                    raise RebuildError(f"swap failed, live tables unchanged: {exc.orig}") from exc
                time.sleep(min(0.005 * (attempt + 1), 0.1))

    @staticmethod
    def rebuild_source() -> sa.FromClause:
        """The log with ids compared bytewise (``COLLATE "C"``).

        Window partitions only need equality, for which every deterministic
        collation agrees with bytes; but sorting under a libc locale (the default
        ``C.UTF-8``/``en_US``) goes through strcoll without abbreviated keys, which
        measured 1.6x slower for the whole rebuild of a 1,000,000-event log.
        """
        e = events_table
        cols = [sa.collate(c, "C").label(c.name) if c.name in ("stream_id", "ref_id") else c for c in e.c]
        return sa.select(*cols).subquery("ledger_events")

    # -- verify, prune, bulk fills -----------------------------------------------------------

    def create_scratch_table(self, conn: Connection, live: sa.Table, scratch: sa.Table) -> None:
        conn.execute(sa.text(f'CREATE TEMPORARY TABLE "{scratch.name}" (LIKE "{live.name}") ON COMMIT DROP'))

    def lock_for_prune(self, conn: Connection) -> None:
        # First nothing but the advisory lock, held to the commit: a rebuild running
        # now would swap in tables filled before this prune (MAINTENANCE_LOCK).
        if not conn.execute(sa.text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": MAINTENANCE_LOCK}).scalar():
            log.warning("prune waits for the rebuild (or prune) running on this database")
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MAINTENANCE_LOCK})
        # SHARE conflicts with the writers' ROW EXCLUSIVE; readers continue. LOCK TABLE
        # takes the tables one after the other in the order listed, which must be the
        # writers' own (WRITE_ORDER). Taken task_meta first, a store holding the
        # catalogue waited for task_meta while the prune held task_meta and waited for
        # the catalogue, and PostgreSQL ended the store as a deadlock (2 writers against
        # 15 prunes: 10 runs of 10). A batch whose events come in another order can
        # still deadlock with it; the loser is rolled back whole and retried
        # (Ledger._retrying).
        names = ", ".join(getattr(LIVE, slot).name for slot in WRITE_ORDER)
        conn.execute(sa.text(f"LOCK TABLE {names} IN SHARE MODE"))

    def allow_prune(self, conn: Connection) -> None:
        # The log's trigger refuses deletes (migration 0002) unless the
        # transaction says it is a prune; the setting ends with it.
        conn.execute(sa.text(f"SET LOCAL {PRUNE_SETTING} = 'on'"))

    @staticmethod
    def fill_catalogue(conn: Connection, fill: CatalogueFill) -> int:
        # A server-side cursor is planned for the first 10% of rows (nested
        # loops over the log) unless told that we read them all.
        conn.execute(sa.text("SET LOCAL cursor_tuple_fraction = 1.0"))
        if fill.whole_log:
            # On a log never ANALYZEd (autovacuum off, or just back-filled) the
            # planner expects one row per subquery and re-runs the tombstone
            # aggregate for every task: verify of 4,000 events ran > 5 min.
            # Hash and merge joins read each input once, whatever the estimates.
            conn.execute(sa.text("SET LOCAL enable_nestloop = off"))
        compiled, columns = fill.compiled(conn.dialect)
        raw = conn.connection.driver_connection
        filled = 0
        with raw.cursor(name="ledger_catalogue_fill") as rows:
            rows.execute(str(compiled), compiled.params)
            if fill.whole_log:
                # The plan is made; what else runs in this transaction plans as usual.
                conn.execute(sa.text("SET LOCAL enable_nestloop = on"))
            types = _column_types(raw, fill.table.name, columns)
            copy_in = f"COPY {fill.table.name} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"
            while chunk := rows.fetchmany(fill.BATCH):
                # COPY: ~4x the rate of multi-row INSERTs here (measured, 40,000
                # rows); its binary format is 2.9x the text one's (1.3 against
                # 3.7 µs a row of the catalogue, measured).
                with raw.cursor() as cur, cur.copy(copy_in) as copy:
                    copy.set_types(types)
                    for row in fill.with_payload_values(chunk):
                        copy.write_row(row)
                filled += len(chunk)
        return filled

    @contextlib.contextmanager
    def migrating(self) -> Iterator[Connection]:
        # A transaction-level advisory lock taken in the migration's own transaction:
        # DDL is transactional here, so it is held until the commit.
        with self.engine.begin() as conn:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATE_LOCK})
            yield conn

    def read_only_sessions(self) -> None:
        @sa.event.listens_for(self.engine, "connect")
        def _connect(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("SET default_transaction_read_only = on")
            dbapi_conn.commit()
            cur.close()

        # Connections opened before (none in the server process) would not be covered.
        self.engine.dispose()

    # -- the catalogue's SQL functions ---------------------------------------------------

    @staticmethod
    def contains(column: sa.ColumnElement, needle: bytes) -> sa.ColumnElement:
        return sa.func.position(sa.literal(needle, sa.LargeBinary).op("IN")(column)) > 0

    @staticmethod
    def seconds_between(start: sa.ColumnElement, end: sa.ColumnElement) -> sa.ColumnElement:
        return sa.cast(sa.extract("epoch", end - start), sa.Float)

    @staticmethod
    def percentiles(
        key: sa.ColumnElement, seconds: sa.ColumnElement, where: list, labelled: dict[str, float]
    ) -> sa.Select:
        return sa.select(
            key,
            *(sa.func.percentile_cont(p).within_group(seconds).label(label) for label, p in labelled.items()),
            sa.func.max(seconds).label("max"),
            sa.func.count().label("count"),
        ).where(*where).group_by(key)


def _catch_up(conn: Connection, target: Any, snapshot: str, prefixes: Sequence[str]) -> int:
    """Apply the events the snapshot did not see to ``target``; how many there were."""
    events: list[RecordedEvent] = [
        row_to_event(r)
        for r in conn.execute(_NOT_IN_SNAPSHOT, {"snap": snapshot})
        if stream_kind(r.stream_id) in prefixes
    ]
    target.apply(conn, events)
    return len(events)


def _add_keys(conn: Connection, table: sa.Table) -> None:
    """The primary key and indexes of the model, under this table's convention names."""
    pk = table.primary_key
    conn.execute(sa.text(
        f'ALTER TABLE "{table.name}" ADD CONSTRAINT "{pk.name}" PRIMARY KEY '
        f"({', '.join(c.name for c in pk.columns)})"
    ))
    for ix in table.indexes:
        conn.execute(sa.text(
            f'CREATE INDEX "{ix.name}" ON "{table.name}" ({", ".join(c.name for c in ix.columns)})'
        ))


def _rename(conn: Connection, new: sa.Table, live: sa.Table) -> None:
    conn.execute(sa.text(f'DROP TABLE "{live.name}"'))
    conn.execute(sa.text(f'ALTER TABLE "{new.name}" RENAME TO "{live.name}"'))
    # The primary key's and indexes' names follow the naming convention of the
    # table name; give them the live names so `celery-ledger db check` stays clean.
    old_names = [new.primary_key.name] + [ix.name for ix in new.indexes]
    for name in old_names:
        conn.execute(sa.text(
            f'ALTER INDEX "{name}" RENAME TO "{name.replace(new.name, live.name, 1)}"'
        ))



def _column_types(raw, table: str, columns: list[str]) -> list[str]:
    """The PostgreSQL type of each of ``table``'s ``columns`` (a binary COPY needs them)."""
    with raw.cursor() as cur:
        cur.execute(
            "SELECT attname, format_type(atttypid, NULL) FROM pg_attribute"
            " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (table,),
        )
        types = dict(cur.fetchall())
    return [types[c] for c in columns]


#: The store class of this database (:func:`ledger.store.store_type`).
STORE = PostgresStore
