"""Alembic environment.

Two ways in:
* ``alembic upgrade head`` from the repository root (alembic.ini); the URL comes
  from ``-x db=URL``, else ``$LEDGER_DATABASE_URL``, else ``sqlite:///celery-ledger.db``.
* ``ledger.migrate.upgrade(engine)`` (``celery-ledger db upgrade``), which passes
  its connection in ``config.attributes["connection"]``.
"""

from __future__ import annotations

import os

from alembic import context

from ledger.store.engine import normalize_url
from ledger.store.schema import metadata

config = context.config


def _url() -> str:
    x = context.get_x_argument(as_dictionary=True)
    url = x.get("db") or os.environ.get("LEDGER_DATABASE_URL") or config.get_main_option("sqlalchemy.url")
    return normalize_url(url or "sqlite:///celery-ledger.db").render_as_string(hide_password=False)


def _configure(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    import sqlalchemy as sa

    engine = sa.create_engine(_url(), poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        _configure(conn)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
