"""The result backends under test, and the fresh databases they run on.

Every run gets its own PostgreSQL database ``ledger_bench_<pid>`` (dropped at the
end), its own SQLite files in a temporary directory and its own Redis database
keys (unique ids, deleted at the end). All PostgreSQL contenders share that one
server and database, so their figures are comparable with the raw limits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg
from celery import Celery

PG_SERVER = os.environ.get("LEDGER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
#: The one Redis database the bench touches, number included: results of the redis
#: contender and the broker that carries chord bodies (so that "the body was sent"
#: is seen by a real broker). Keys and queues carry the run id, so one database
#: serves both; other databases on the server (other runs' workers) are never touched.
REDIS = os.environ.get("LEDGER_BENCH_REDIS", "redis://127.0.0.1:6379/14")


@dataclass(frozen=True)
class Contender:
    """A result backend: a name for the table and a Celery ``result_backend`` URL."""

    name: str
    url: str
    #: Celery's database backend has no native chords: it polls celery.chord_unlock.
    native_chords: bool = True
    family: str = ""


@dataclass
class Environment:
    """Fresh databases for one bench run; ``close()`` removes them."""

    run_id: str = field(default_factory=lambda: f"{os.getpid()}_{uuid.uuid4().hex[:6]}")
    tmpdir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="ledger_bench_"))
    created: bool = False

    @property
    def pg_db(self) -> str:
        return f"ledger_bench_{os.getpid()}"

    @property
    def pg_url(self) -> str:
        """libpq URL of the bench database (``postgresql://``)."""
        return f"{PG_SERVER}/{self.pg_db}"

    @property
    def broker_url(self) -> str:
        return REDIS

    def open(self) -> Environment:
        _admin(f'DROP DATABASE IF EXISTS "{self.pg_db}" WITH (FORCE)')
        _admin(f'CREATE DATABASE "{self.pg_db}"')
        self.created = True
        return self

    def close(self) -> None:
        if self.created:
            _admin(f'DROP DATABASE IF EXISTS "{self.pg_db}" WITH (FORCE)')
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        redis_cleanup(self.run_id)

    def contenders(self) -> list[Contender]:
        sa_pg = self.pg_url.replace("postgresql://", "postgresql+psycopg://", 1)
        return [
            Contender("ledger+postgresql", f"ledger+{sa_pg}", family="ledger"),
            Contender("ledger+sqlite", f"ledger+sqlite:///{self.tmpdir}/ledger.db", family="ledger"),
            Contender("db+postgresql", f"db+{sa_pg}", native_chords=False, family="db"),
            Contender("db+sqlite", f"db+sqlite:///{self.tmpdir}/celery.db", native_chords=False, family="db"),
            Contender("redis", REDIS, family="redis"),
        ]

    def prepare(self, contender: Contender) -> None:
        """Create the contender's schema before anything is timed."""
        if contender.family == "ledger":
            from ledger.api import Ledger
            from ledger.store import engine as database

            ledger = Ledger.open(contender.url, upgrade=True)
            # Children build their own engine after fork; the parent keeps none open.
            ledger.engine.dispose()
            database._engines.clear()
        elif contender.family == "db":
            app = make_app(contender, self)
            app.backend.ResultSession().close()  # creates celery_taskmeta / celery_tasksetmeta


def ledger_available() -> str | None:
    """None when the ledger's Celery backend can be imported, else the reason."""
    try:
        from ledger.celery import LedgerBackend  # noqa: F401
    except Exception as exc:  # any import problem means: not measurable yet
        return f"ledger.celery not importable ({type(exc).__name__}: {exc})"
    return None


def make_app(contender: Contender, env: Environment) -> Celery:
    """A Celery app configured like a worker's: JSON results, Redis broker.

    The bench tasks (``bench.part``, ``bench.body``) are addressed by name only:
    no worker runs them, the bench plays the worker.
    """
    app = Celery(f"bench_{contender.name}", backend=contender.url, broker=env.broker_url, set_as_current=False)
    app.conf.update(
        result_serializer="json",
        task_serializer="json",
        accept_content=["json"],
        result_expires=3600,
        broker_connection_retry_on_startup=True,
    )
    return app


def _admin(sql: str) -> None:
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as conn:
        conn.execute(sql)


@contextlib.contextmanager
def scratch_database(name: str) -> Iterator[str]:
    """A new PostgreSQL database ``name`` on the bench's server for the block, dropped
    after it; yields its libpq URL (``postgresql://``)."""
    _admin(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def redis_cleanup(run_id: str, url: str = REDIS) -> None:
    """Delete the keys a run left in the bench's Redis database (their names hold ``run_id``)."""
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"*{run_id}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()
