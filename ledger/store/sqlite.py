"""SQLite: every statement, pragma and lock the ledger runs on a SQLite file.

* Write transactions start with ``BEGIN IMMEDIATE`` so that writers serialize
  at BEGIN (the only way SQLite orders commits), and the file runs in WAL mode
  so readers never block writers. Positions are therefore assigned in commit
  order and ``position`` alone is the follow order (:class:`SQLiteLog`).
* Every commit waits for the WAL's fsync (``synchronous = FULL``) but a lone SENT's
  or RECEIVED's, which commits unsynced as on PostgreSQL (:func:`_synchronous`).
* Nothing can wake a follower: they poll (:class:`ledger.store.base.Listener`).
* Cross-process locks (one relay per name, one migration at a time) are
  ``flock`` on files beside the database: the processes share a host.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, Connection, Engine

from ledger.events import RecordedEvent
from ledger.store.base import (
    BIND_TYPES,
    SELECT_EVENTS,
    Checkpoint,
    EncodedEvent,
    FollowableLog,
    MaintainableStore,
    RebuildPlan,
    RelayLock,
    row_to_event,
)
from ledger.store.schema import LIVE
from ledger.store.target import CatalogueFill


def create_engine(u: URL) -> Engine:
    """The engine for a SQLite file: WAL, a long busy timeout, writers serialized at BEGIN."""
    _create_private(u.database)
    engine = sa.create_engine(
        u,
        connect_args={"timeout": 60, "check_same_thread": False},
        pool_size=8,
        max_overflow=8,
    )

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        # Let SQLAlchemy's begin event (below) issue BEGIN itself.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        options = conn.get_execution_options()
        write = options.get("ledger_write", False)
        _synchronous(conn, "NORMAL" if write and options.get("ledger_relaxed") else "FULL")
        # Writers take the write lock at BEGIN: two deferred transactions that both
        # read and then write would otherwise deadlock-fail with SQLITE_BUSY.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


#: In a pooled connection's record ``info``: the ``synchronous`` level it was last set to.
_SYNCHRONOUS = "ledger_synchronous"


def _synchronous(conn: Connection, level: str) -> None:
    """Set the connection's ``synchronous`` level for the transaction about to begin
    (SQLite refuses to change it inside one), when it is not that already.

    ``FULL`` -- every commit waits for the WAL's fsync -- for every transaction but a
    lone SENT's or RECEIVED's (:func:`ledger.store.base.commits_relaxed`), which
    commits at ``NORMAL``: written to the WAL, not synced, as PostgreSQL commits
    it with ``synchronous_commit`` off. A process's crash loses nothing; an OS
    crash or power cut can lose it until the next ``FULL`` commit (anyone's: the
    WAL is synced in order) has synced the WAL. Measured here: 0.48 ms a SENT at
    ``FULL``, 0.28 ms at ``NORMAL`` (one process, medians of 1,300 appends).
    Set per transaction, and back to ``FULL`` before any other, also one that is
    not the ledger's write (a migration, a rebuild): a pooled connection never
    keeps ``NORMAL`` into the next transaction."""
    info = conn.connection.info
    if info.get(_SYNCHRONOUS) != level:
        conn.exec_driver_sql(f"PRAGMA synchronous = {level}")
        info[_SYNCHRONOUS] = level


def _create_private(path: str) -> None:
    # SQLite would create the file with the umask's mode (0644: anyone on the host
    # could read task results and arguments); its -wal and -shm files take the
    # database file's mode, so creating it 0600 first covers all three.
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


class SQLiteLog(FollowableLog):
    """Writers are serialized by BEGIN IMMEDIATE; position order is commit order."""

    _insert_sql = sa.text(
        # WHERE is required by SQLite to parse INSERT ... SELECT ... ON CONFLICT.
        """
        INSERT INTO ledger_events (tx_id, event_id, stream_id, stream_version, type,
            schema_version, recorded_at, task_state, ref_id, chord_size, payload)
        SELECT 0, :event_id, :stream_id, COALESCE(MAX(stream_version), 0) + 1, :type,
            :schema_version, :recorded_at, :task_state, :ref_id, :chord_size, :payload
        FROM ledger_events WHERE stream_id = :stream_id
        HAVING :expected IS NULL OR COALESCE(MAX(stream_version), 0) = :expected
        ON CONFLICT (event_id) DO NOTHING
        RETURNING position, tx_id, stream_version, recorded_at
        """
    ).bindparams(*(sa.bindparam(k, type_=v) for k, v in BIND_TYPES.items()))

    def _insert(self, conn: Connection, item: EncodedEvent) -> RecordedEvent | None:
        # SQLite has no server clock worth the name: the writer holds the database
        # lock, so its own UTC clock gives non-decreasing times in commit order.
        params = item.params()
        params["recorded_at"] = datetime.now(timezone.utc)
        params["expected"] = item.new.expected_version
        row = conn.execute(self._insert_sql, params).first()
        if row is None:
            return None
        return item.recorded(row.position, row.stream_version, params["recorded_at"], 0)

    def read_from(self, conn: Connection, after: Checkpoint, limit: int) -> list[RecordedEvent]:
        t = self.table
        q = SELECT_EVENTS.where(t.c.position > after.position).order_by(t.c.position).limit(limit)
        return [row_to_event(r) for r in conn.execute(q)]


class FileRelayLock(RelayLock):
    """``flock`` on ``<database file>.<name>.lock`` (relays on SQLite share the host)."""

    def __init__(self, engine: Engine, name: str) -> None:
        db = engine.url.database or "memory"
        self.path = f"{db}.{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.lock"
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


class SQLiteStore(MaintainableStore):
    """The ledger on a SQLite file."""

    writes_serially: ClassVar[bool] = True  # BEGIN IMMEDIATE (create_engine)

    def __init__(self, engine: Engine, *, notify: str = "ready") -> None:
        # ``notify`` is PostgreSQL's NOTIFY policy: nothing here can be woken.
        self.log = SQLiteLog()
        super().__init__(engine)

    @staticmethod
    def insert(table: sa.Table) -> Any:
        return sqlite_insert(table)

    def relay_lock(self, name: str) -> RelayLock:
        return FileRelayLock(self.engine, name)

    # -- maintenance ----------------------------------------------------------------------

    def rebuild(self, plan: RebuildPlan) -> None:
        """One writer at a time: the whole rebuild is one ``BEGIN IMMEDIATE`` transaction
        (writers wait for it; readers continue in WAL mode), and the new tables are
        created from the live tables' own DDL."""
        report = plan.report

        def work(conn: Connection) -> None:
            fill_started = time.perf_counter()
            ddl: dict[str, tuple[str, list[str]]] = {}
            for slot in plan.slots:
                live, fresh = getattr(LIVE, slot), getattr(plan.new, slot)
                table_sql, index_sqls = _ddl(conn, live.name)
                ddl[slot] = (table_sql, index_sqls)
                conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{fresh.name}"')
                # Same DDL as the live table (same constraint names), another name.
                conn.exec_driver_sql(table_sql.replace(live.name, fresh.name, 1))
            plan.fill(conn)
            report.fill_seconds = time.perf_counter() - fill_started
            problems = plan.payload_problems(conn, plan.slots)
            if problems:  # raising rolls it all back: the live tables stay
                raise plan.corruption(problems)
            swap_started = time.perf_counter()
            for slot in plan.slots:
                live, fresh = getattr(LIVE, slot), getattr(plan.new, slot)
                conn.exec_driver_sql(f'DROP TABLE "{live.name}"')
                conn.exec_driver_sql(f'ALTER TABLE "{fresh.name}" RENAME TO "{live.name}"')
                for index_sql in ddl[slot][1]:
                    conn.exec_driver_sql(index_sql)
                report.rows[live.name] = conn.execute(
                    sa.select(sa.func.count()).select_from(live)
                ).scalar_one()
            report.swap_seconds = time.perf_counter() - swap_started

        plan.write(work)

    def create_scratch_table(self, conn: Connection, live: sa.Table, scratch: sa.Table) -> None:
        table_sql, _ = _ddl(conn, live.name)
        conn.exec_driver_sql(
            table_sql.replace("CREATE TABLE", "CREATE TEMPORARY TABLE", 1).replace(live.name, scratch.name, 1)
        )

    def drop_scratch_table(self, conn: Connection, scratch: sa.Table) -> None:
        # SQLite's temporary tables outlive a rolled-back transaction.
        conn.exec_driver_sql(f'DROP TABLE temp."{scratch.name}"')

    @staticmethod
    def fill_catalogue(conn: Connection, fill: CatalogueFill) -> int:
        compiled, columns = fill.compiled(conn.dialect)
        raw = conn.connection.driver_connection
        params = [compiled.params[k] for k in compiled.positiontup or ()]
        insert = f"INSERT INTO {fill.table.name} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        filled = 0
        rows = raw.cursor()
        try:
            rows.execute(str(compiled), params)
            while chunk := rows.fetchmany(fill.BATCH):
                raw.executemany(insert, fill.with_payload_values(chunk, _time))
                filled += len(chunk)
        finally:
            rows.close()
        return filled

    @contextlib.contextmanager
    def migrating(self) -> Iterator[Connection]:
        # flock on <database file>.migrate.lock: blocks until the migrating process is done.
        fd = os.open(f"{self.engine.url.database}.migrate.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with self.engine.begin() as conn:
                yield conn
        finally:
            os.close(fd)  # closing drops the flock

    def read_only_sessions(self) -> None:
        @sa.event.listens_for(self.engine, "connect")
        def _connect(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA query_only = ON")
            cur.close()

        # Connections opened before (none in the server process) would not be covered.
        self.engine.dispose()

    # -- the catalogue's SQL functions ---------------------------------------------------

    @staticmethod
    def contains(column: sa.ColumnElement, needle: bytes) -> sa.ColumnElement:
        return sa.func.instr(column, sa.literal(needle, sa.LargeBinary)) > 0

    @staticmethod
    def seconds_between(start: sa.ColumnElement, end: sa.ColumnElement) -> sa.ColumnElement:
        # SQLite keeps the times as text, 'YYYY-MM-DD HH:MM:SS.ffffff'; its date functions
        # resolve milliseconds only, so: whole seconds by julianday(), microseconds as text.
        def whole(x: sa.ColumnElement) -> sa.ColumnElement:
            return sa.func.julianday(sa.func.substr(x, 1, 19))

        def fraction(x: sa.ColumnElement) -> sa.ColumnElement:
            return sa.func.coalesce(sa.cast(sa.func.substr(x, 20), sa.Float), 0.0)

        return sa.func.round((whole(end) - whole(start)) * 86400.0) + fraction(end) - fraction(start)

    @staticmethod
    def percentiles(
        key: sa.ColumnElement, seconds: sa.ColumnElement, where: list, labelled: dict[str, float]
    ) -> sa.Select:
        # SQLite has no percentile_cont: rank the values per group with a window, then
        # per percentile pick the two ranks around p * (n - 1) and interpolate.
        ranked = sa.select(
            key,
            seconds.label("s"),
            (sa.func.row_number().over(partition_by=key, order_by=seconds) - 1).label("i"),
            sa.func.count().over(partition_by=key).label("n"),
        ).where(*where).subquery("ranked")
        r = ranked
        cols = []
        for label, p in labelled.items():
            at = p * (r.c.n - 1)
            below = sa.cast(at, sa.Integer)  # floor: at is never negative
            lo = sa.func.max(sa.case((r.c.i == below, r.c.s)))
            hi = sa.func.max(sa.case((r.c.i == below + 1, r.c.s)))
            frac = sa.func.max(at - below)
            cols.append((lo + sa.func.coalesce(hi - lo, 0) * frac).label(label))
        return sa.select(
            r.c.key, *cols, sa.func.max(r.c.s).label("max"), sa.func.count().label("count")
        ).group_by(r.c.key)


def _time(value: datetime) -> str:
    # As UTCDateTime stores it on SQLite: naive UTC text, always with microseconds.
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")


def _ddl(conn: Connection, table: str) -> tuple[str, list[str]]:
    """The table's own CREATE TABLE and its CREATE INDEX statements."""
    rows = conn.exec_driver_sql(
        "SELECT type, sql FROM sqlite_master WHERE tbl_name = ? AND sql IS NOT NULL",
        (table,),
    ).all()
    table_sql = next(sql for kind, sql in rows if kind == "table")
    return table_sql, [sql for kind, sql in rows if kind == "index"]


#: The store class of this database (:func:`ledger.store.store_type`).
STORE = SQLiteStore
