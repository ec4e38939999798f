"""Wake-ups for followers and waiters: LISTEN/NOTIFY on PostgreSQL, a sleep on SQLite.

Appends on PostgreSQL send ``pg_notify('ledger_events', stream_id)`` in their
transaction, delivered at commit -- all but non-ready task states by default
(ledger/log.py, "Which appends NOTIFY"). A :class:`Listener` holds one
dedicated autocommit connection and returns the stream ids it was told about.
Notifications are a wake-up only: readers always re-read the log, so a missed
notification costs at most one ``timeout``.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy.engine import Engine

from ledger.log import NOTIFY_CHANNEL

log = logging.getLogger("ledger.listen")


class Listener:
    """Sleeps up to ``timeout`` seconds; the base class cannot be woken early (SQLite)."""

    @staticmethod
    def for_engine(engine: Engine) -> Listener:
        if engine.dialect.name == "postgresql":
            return PgListener(engine)
        return Listener()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait(self, timeout: float) -> list[str]:
        time.sleep(timeout)
        return []

    def close(self) -> None:
        pass


class PgListener(Listener):
    def __init__(self, engine: Engine) -> None:
        url = engine.url.set(drivername="postgresql")
        self._conninfo = url.render_as_string(hide_password=False)
        self._conn = None

    def __enter__(self) -> Listener:
        # LISTEN before the caller's first read: a commit between that read and a
        # lazy LISTEN would otherwise wait for the next poll.
        import psycopg

        try:
            self._conn = self._connect()
        except psycopg.Error as exc:
            log.warning("LISTEN failed (%s); will retry", type(exc).__name__)
        return self

    def _connect(self):
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
