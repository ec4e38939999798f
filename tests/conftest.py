"""Shared fixtures: real PostgreSQL (started if down), fresh databases, SQLite files.

* ``LEDGER_TEST_PG`` — server URL to use (default ``postgresql+psycopg://postgres@127.0.0.1:5432``).
* ``LEDGER_TEST_REDIS`` — broker for worker tests (default ``redis://127.0.0.1:6379/11``).
* Each test run creates one template database migrated to head; every test that
  asks for PostgreSQL gets its own database cloned from it (unique name), dropped
  afterwards.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from ledger.api import Ledger

PG_SERVER = os.environ.get("LEDGER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
RUN_ID = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
#: the broker and Redis database of this test run; give every concurrent run its own
#: database number (a worker on a shared one steals another run's messages)
REDIS = os.environ.get("LEDGER_TEST_REDIS", "redis://127.0.0.1:6379/11")


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _pg_up() -> bool:
    try:
        with psycopg.connect(_libpq(PG_SERVER) + "/postgres", connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def ensure_postgres() -> None:
    """Start the local cluster if it is down (the machine's documented command)."""
    if _pg_up():
        return
    versions = os.listdir("/etc/postgresql") if os.path.isdir("/etc/postgresql") else []
    if versions:
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", versions[0], "main", "start"],
            check=False,
        )
    for _ in range(60):
        if _pg_up():
            return
        time.sleep(0.5)
    pytest.fail(f"PostgreSQL is not reachable at {PG_SERVER} and could not be started")


def admin(sql: str) -> None:
    with psycopg.connect(_libpq(PG_SERVER) + "/postgres", autocommit=True) as conn:
        conn.execute(sql)


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A database migrated to head, cloned for each test."""
    ensure_postgres()
    name = f"ledger_tmpl_{RUN_ID}"
    admin(f'DROP DATABASE IF EXISTS "{name}"')
    admin(f'CREATE DATABASE "{name}"')
    url = f"{PG_SERVER}/{name}"
    ledger = Ledger.open(url, upgrade=True)
    ledger.engine.dispose()
    from ledger.store import engine as database

    database._engines.pop(database.normalize_url(url).render_as_string(hide_password=False), None)
    yield name
    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _new_pg_db(template: str) -> str:
    name = f"ledger_t_{RUN_ID}_{uuid.uuid4().hex[:8]}"
    admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return name


@pytest.fixture
def pg_url(pg_template) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test."""
    name = _new_pg_db(pg_template)
    url = f"{PG_SERVER}/{name}"
    yield url
    from ledger.store import engine as database

    engine = database._engines.pop(database.normalize_url(url).render_as_string(hide_password=False), None)
    if engine is not None:
        engine.dispose()
    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """A fresh, migrated SQLite file for this test."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    Ledger.open(url, upgrade=True)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def any_url(request) -> str:
    """Runs the test once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def ledger(any_url) -> Ledger:
    return Ledger.open(any_url)
