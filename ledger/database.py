"""Engines: one per URL per process, set up for the ledger's transaction rules.

* Celery creates a backend per thread and per worker child; they all share the
  process's engine (and its pool) from :func:`engine_for`. After ``fork`` the
  child builds its own: pooled connections must not cross processes.
* SQLite write transactions start with ``BEGIN IMMEDIATE`` so that writers
  serialize at BEGIN (the only way SQLite orders commits), and the file runs in
  WAL mode so readers never block writers.
* URLs shown to people go through :func:`safe_url`: passwords never appear in
  logs, errors or CLI output.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url

from ledger.errors import BadDatabaseURL
from ledger.settings import pool_size_from_env

T = TypeVar("T")

_lock = threading.Lock()
_engines: dict[str, Engine] = {}


def _forget_engines_in_child() -> None:
    # The parent's pooled sockets are not ours: drop references without closing
    # them (closing would send a Terminate on the parent's connection).
    for engine in _engines.values():
        engine.dispose(close=False)
    _engines.clear()


os.register_at_fork(after_in_child=_forget_engines_in_child)


def normalize_url(url: str | URL) -> URL:
    """Accept ``sqlite:///f.db``, ``postgresql://`` (or ``postgres://``), ``postgresql+psycopg://``,
    ``ledger+...``; refuse in-memory SQLite, which each pooled connection would see empty."""
    text = url if isinstance(url, str) else url.render_as_string(hide_password=False)
    if text.startswith("ledger+"):
        text = text[len("ledger+") :]
    try:
        u = make_url(text)
    except Exception as exc:  # ArgumentError and friends
        raise BadDatabaseURL(f"not a database URL: {safe_url(text)!r} ({exc.__class__.__name__})") from None
    if u.drivername == "postgres" or u.drivername.startswith("postgres+"):
        # Heroku's spelling; SQLAlchemy 2 knows only "postgresql".
        u = u.set(drivername="postgresql" + u.drivername[len("postgres"):])
    backend = u.get_backend_name()
    if backend == "sqlite" and u.database in (None, "", ":memory:"):
        raise BadDatabaseURL(
            f"{safe_url(text)!r} is an in-memory SQLite database, empty for every connection "
            "and gone at exit: use a file, sqlite:///path/ledger.db"
        )
    if backend == "postgresql":
        if u.get_driver_name() not in ("psycopg", "psycopg2") or "+" not in u.drivername:
            u = u.set(drivername="postgresql+psycopg")
        elif u.get_driver_name() != "psycopg":
            raise BadDatabaseURL("the ledger needs psycopg 3: use postgresql+psycopg://")
    elif backend != "sqlite":
        raise BadDatabaseURL(
            f"unsupported database {backend!r} in {safe_url(u)!r}: use postgresql+psycopg:// or sqlite:///"
        )
    return u


#: Query keys whose values are secrets: libpq's ``password`` and ``sslpassword``, and any
#: other key naming a password, secret or token (a driver option or a typo of one).
_SECRET_KEY = re.compile(r"pass|secret|token", re.IGNORECASE)
_SECRET_IN_QUERY = re.compile(r"([?&][^=&#]*(?:pass|secret|token)[^=&#]*=)[^&#]*", re.IGNORECASE)


def safe_url(url: str | URL) -> str:
    """The URL as people may see it: its password and secret query values replaced by ``***``.

    The one place URLs are masked: CLI errors, ``Ledger.url`` and the backend's
    ``as_uri()`` (printed by a worker at start-up) all go through it.
    """
    prefix = ""
    if isinstance(url, str):
        if url.startswith("ledger+"):
            prefix, url = "ledger+", url[len("ledger+") :]
        try:
            url = make_url(url)
        except Exception:
            # Not parseable: hide what sits between '://' and '@', and secret query values.
            head, sep, tail = url.partition("://")
            if sep and "@" in tail:
                tail = "***@" + tail.split("@", 1)[1]
            return prefix + _SECRET_IN_QUERY.sub(r"\1***", head + sep + tail)
    hidden = {k: "***" for k in url.query if _SECRET_KEY.search(k)}
    text = url.update_query_dict(hidden).render_as_string(hide_password=True)
    return prefix + text.replace("=%2A%2A%2A", "=***")  # the mask, not its URL quoting


def engine_for(url: str | URL) -> Engine:
    """The process-wide engine for ``url`` (created on first use)."""
    u = normalize_url(url)
    key = u.render_as_string(hide_password=False)
    engine = _engines.get(key)
    if engine is None:
        with _lock:
            engine = _engines.get(key)
            if engine is None:
                engine = _create(u)
                _engines[key] = engine
    return engine


def sqlite_file(url: str | URL) -> str | None:
    """The file of a SQLite URL (None for PostgreSQL)."""
    u = normalize_url(url)
    return u.database if u.get_backend_name() == "sqlite" else None


def _create_private(path: str) -> None:
    # SQLite would create the file with the umask's mode (0644: anyone on the host
    # could read task results and arguments); its -wal and -shm files take the
    # database file's mode, so creating it 0600 first covers all three.
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


def _create(u: URL) -> Engine:
    if u.get_backend_name() == "sqlite":
        _create_private(u.database)
        engine = sa.create_engine(
            u,
            connect_args={"timeout": 60, "check_same_thread": False},
            pool_size=8,
            max_overflow=8,
        )
        _setup_sqlite(engine)
        return engine
    return sa.create_engine(
        u,
        pool_size=pool_size_from_env(),
        max_overflow=16,
        pool_recycle=1800,
        # Disconnects are handled by retrying the whole unit of work
        # (ledger.api.Ledger._write), so no pre-ping round trip per checkout.
        pool_pre_ping=False,
    )


def _setup_sqlite(engine: Engine) -> None:
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
        # Writers take the write lock at BEGIN: two deferred transactions that both
        # read and then write would otherwise deadlock-fail with SQLITE_BUSY.
        if conn.get_execution_options().get("ledger_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


def is_disconnect(exc: BaseException) -> bool:
    """True for errors after which a fresh connection may succeed."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, sa.exc.OperationalError):
        text = str(exc.orig).lower() if exc.orig is not None else str(exc).lower()
        return any(
            marker in text
            for marker in (
                "connection",
                "server closed",
                "terminating",
                "shutting down",
                "the database system is starting up",
                "database is locked",
                "could not receive",
                "ssl syscall",
                "eof detected",
            )
        )
    return isinstance(exc, sa.exc.InterfaceError | sa.exc.TimeoutError)


def is_missing_table(exc: BaseException) -> bool:
    """True when a statement failed because a table does not exist (schema not migrated)."""
    if not isinstance(exc, sa.exc.DBAPIError):
        return False
    if getattr(exc.orig, "sqlstate", None) == "42P01":  # PostgreSQL undefined_table
        return True
    return "no such table" in str(exc.orig)  # SQLite


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
    return _on_driver(conn, *statements[0], lambda raw: _run_statements(raw, statements))


def driver_fetchall(conn: Connection, sql: str, params: dict) -> list[tuple]:
    """One statement's rows as plain tuples (see :func:`driver_fetch`)."""
    return _on_driver(conn, sql, params, lambda raw: raw.execute(sql, params).fetchall())


def pooled_fetch(engine: Engine, statements: list[tuple[str, dict]]) -> list[tuple | None]:
    """Autocommitted statements' first rows on a pooled psycopg connection.

    The hot paths outside a transaction (``get_task_meta``, a lone store) take
    no SQLAlchemy ``Connection``: checking one out, switching it to AUTOCOMMIT
    and back and its reset on return cost ~30 µs of the ~110 µs a point read
    took (measured; the SELECT itself is ~70 µs). Each statement is its own
    transaction. Errors and invalidation as in :func:`driver_fetch`.
    """
    import psycopg

    try:
        fairy = engine.raw_connection()
    except psycopg.Error as orig:  # as engine.connect() raises it
        raise sa.exc.DBAPIError.instance(None, None, orig, psycopg.Error, dialect=engine.dialect) from orig
    sql, params = statements[0]
    try:
        raw = fairy.driver_connection
        raw.autocommit = True
        # One cursor per pooled connection, kept in its record's ``info`` (cleared
        # when the connection is replaced): a point read through a new cursor
        # each time cost 34 µs of client CPU against 20 µs through a kept one
        # (psycopg 3.3, prepared, best of 7 x 3,000).
        cursor = fairy.info.get(_CURSOR)
        if cursor is None:
            cursor = fairy.info[_CURSOR] = raw.cursor()
        try:
            return _run_statements(raw, statements, cursor)
        finally:
            if not raw.broken:
                raw.autocommit = False
    except psycopg.Error as orig:
        raise _driver_error(engine, fairy, sql, params, orig) from orig
    finally:
        fairy.close()


def pooled_fetchone(engine: Engine, sql: str, params: dict) -> tuple | None:
    """One autocommitted statement's first row (see :func:`pooled_fetch`)."""
    return pooled_fetch(engine, [(sql, params)])[0]


_CURSOR = "ledger_cursor"


def _run_statements(raw: Any, statements: list[tuple[str, dict]], cursor: Any = None) -> list[tuple | None]:
    if len(statements) == 1:
        sql, params = statements[0]
        return [(cursor or raw).execute(sql, params, prepare=True).fetchone()]
    with raw.pipeline():
        cursors = [raw.execute(sql, params, prepare=True) for sql, params in statements]
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
