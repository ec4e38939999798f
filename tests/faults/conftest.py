"""Fixtures of the fault suite: a private PostgreSQL cluster, a TCP fault proxy, workers.

Every test under tests/faults/ carries the ``faults`` marker (``-m faults``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ledger.api import Ledger
from ledger.store import engine as database
from tests.faults.pgcluster import PrivateCluster
from tests.faults.proxy import FaultProxy
from tests.faults.workers import Workers

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.faults)


def forget_engine(url: str) -> None:
    """Drop this process's pooled engine for ``url`` (its server is about to go away)."""
    engine = database._engines.pop(database.normalize_url(url).render_as_string(hide_password=False), None)
    if engine is not None:
        engine.dispose()


@pytest.fixture(scope="session")
def private_pg() -> Iterator[PrivateCluster]:
    """A PostgreSQL cluster of this test session's own: restarting it harms nobody."""
    cluster = PrivateCluster()
    cluster.start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def private_url(private_pg) -> Iterator[str]:
    """A fresh, migrated database on the private cluster."""
    name = f"faults_{uuid.uuid4().hex[:10]}"
    private_pg.admin(f'CREATE DATABASE "{name}"')
    url = private_pg.url(name)
    Ledger.open(url, upgrade=True)
    forget_engine(url)
    yield url
    forget_engine(url)
    if not _up(private_pg):  # a test may have failed while the server was down
        private_pg.start()
    private_pg.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _up(cluster: PrivateCluster) -> bool:
    try:
        cluster.admin("SELECT 1")
        return True
    except Exception:
        return False


@pytest.fixture
def proxy_to() -> Iterator[Callable[[str], FaultProxy]]:
    """``proxy_to(url)``: a fault proxy in front of the server of ``url``."""
    proxies: list[FaultProxy] = []

    def make(url: str) -> FaultProxy:
        u = database.normalize_url(url)
        proxy = FaultProxy(u.host or "127.0.0.1", u.port or 5432)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


@pytest.fixture
def workers(tmp_path) -> Iterator[Callable[..., Workers]]:
    """``workers(backend_url, conf)``: real celery workers of this test, stopped at the end."""
    made: list[Workers] = []

    def make(backend: str, conf: dict | None = None) -> Workers:
        w = Workers(backend, conf or {}, tmp_path)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()

