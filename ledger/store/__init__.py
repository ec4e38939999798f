"""The ledger's storage: one module per database, behind the classes of :mod:`ledger.store.base`.

* :mod:`ledger.store.base` -- what a database must do, layered by capability
* :mod:`ledger.store.postgres` -- PostgreSQL: every statement, lock and wake-up of it
* :mod:`ledger.store.sqlite` -- SQLite: every statement, pragma and lock of it
* :mod:`ledger.store.schema` -- the tables (one model, which Alembic migrates)
* :mod:`ledger.store.target` -- the projections' folds as dialect-neutral SQL
* :mod:`ledger.store.engine` -- engines per URL, URL checks and masking

Only this package chooses a database's module, by the backend name of a URL
or an engine; everything above it talks to the store it is given.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from sqlalchemy.engine import Connection, Engine

if TYPE_CHECKING:
    from ledger.store.base import MaintainableStore

#: Backend name (SQLAlchemy's) -> the module implementing it (its ``create_engine``, ``STORE``).
_MODULES = {"postgresql": "ledger.store.postgres", "sqlite": "ledger.store.sqlite"}


def module_for(backend: str) -> ModuleType:
    """The module of a backend name (``postgresql``, ``sqlite``)."""
    try:
        return importlib.import_module(_MODULES[backend])
    except KeyError:
        raise ValueError(f"unsupported database {backend!r}; choose from {', '.join(_MODULES)}") from None


def store_type(bind: Engine | Connection) -> type[MaintainableStore]:
    """The store class for the database ``bind`` talks to (its SQL forms, no connection)."""
    return module_for(bind.dialect.name).STORE


def store_for(engine: Engine, *, notify: str = "ready") -> MaintainableStore:
    """The store on ``engine``; ``notify`` is PostgreSQL's NOTIFY policy (:mod:`ledger.store.postgres`)."""
    return store_type(engine)(engine, notify=notify)
