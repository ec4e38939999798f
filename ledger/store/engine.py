"""Engines: one per URL per process, made by the module of the URL's database.

* Celery creates a backend per thread and per worker child; they all share the
  process's engine (and its pool) from :func:`engine_for`. After ``fork`` the
  child builds its own: pooled connections must not cross processes.
* How an engine is set up for the ledger's transaction rules is its database's
  business (:func:`ledger.store.postgres.create_engine`,
  :func:`ledger.store.sqlite.create_engine`).
* URLs shown to people go through :func:`safe_url`: passwords never appear in
  logs, errors or CLI output.
"""

from __future__ import annotations

import os
import re
import threading

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url

from ledger.errors import BadDatabaseURL
from ledger.output import LONE_SURROGATE

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
    if (raw := LONE_SURROGATE.search(text)) is not None:
        # A raw byte from the shell or the environment (PEP 383): neither SQLAlchemy's
        # URL nor the drivers encode it (a UnicodeEncodeError traceback). Not shown
        # whole: the URL may hold a password.
        code = ord(raw.group())
        what = f"the byte \\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"
        raise BadDatabaseURL(
            f"the database URL is not UTF-8 text (it holds {what}): SQLite's paths and PostgreSQL's names must be"
        )
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
    if backend == "sqlite" and str(u.query.get("uri", "")).lower() in ("true", "1", "yes", "on"):
        # The ledger finds its file by the URL's path (the existence check, the
        # migration lock, the relay's lock, output files that must not be it):
        # "file:/x.db?mode=ro" was "no ledger database at file:/x.db".
        raise BadDatabaseURL(
            f"{safe_url(text)!r} is a SQLite URI filename (uri=true), which the ledger does not "
            "take: use the file's path, sqlite:////path/ledger.db"
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


def _create(u: URL) -> Engine:
    from ledger.store import module_for

    return module_for(u.get_backend_name()).create_engine(u)


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


#: SQLSTATEs of a transaction the server rolled back whole because of a concurrent one:
#: deadlock_detected (two transactions waited for each other's locks) and
#: serialization_failure.
_LOST_TO_A_CONCURRENT_TRANSACTION = frozenset({"40P01", "40001"})


def is_concurrency_failure(exc: BaseException) -> bool:
    """True for a transaction the database rolled back entirely because it collided
    with another (a deadlock, a serialization failure): run again, it may succeed."""
    orig = getattr(exc, "orig", None)
    return isinstance(exc, sa.exc.DBAPIError) and getattr(orig, "sqlstate", None) in _LOST_TO_A_CONCURRENT_TRANSACTION
