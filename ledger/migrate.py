"""Schema management through Alembic, from the repository or from an installed wheel."""

from __future__ import annotations

from importlib import resources

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from sqlalchemy.engine import Engine

from ledger.errors import DowngradeRefused, SchemaError
from ledger.store import store_for
from ledger.store.engine import safe_url
from ledger.store.schema import events


def config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("ledger.migrations")))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    _run(engine, command.upgrade, revision)


#: The revision whose downgrade drops the log (``ledger_events``).
LOG_REVISION = "0001"


def downgrade(engine: Engine, revision: str, *, drop_events: bool = False) -> None:
    """Migrate down to ``revision``.

    Raises :class:`DowngradeRefused` (and changes nothing) when that would drop
    ``ledger_events`` while it holds events, unless ``drop_events=True``: the log
    is the only copy of the history, and a downgrade is easy to mistype.
    """
    if not drop_events:
        try:
            events = _events_dropped(engine, revision)
        except (CommandError, RevisionError) as exc:  # an unknown revision, ours or the database's
            raise SchemaError(_explain(engine, exc)) from exc
        if events:
            raise DowngradeRefused(
                f"downgrading {safe_url(engine.url)} to {revision!r} drops ledger_events, which "
                f"holds {events:,} events; pass --yes to drop them"
            )
    _run(engine, command.downgrade, revision)


def _events_dropped(engine: Engine, revision: str) -> int:
    """How many events a downgrade to ``revision`` would drop (0 if it keeps the log)."""
    script = ScriptDirectory.from_config(config())
    cur = current(engine)
    if cur is None:
        return 0
    target = revision
    if target.startswith("-") and target[1:].isdigit():  # relative: "-1" is one step down
        target = cur
        for _ in range(int(revision[1:])):
            target = script.get_revision(target).down_revision or "base"
            if target == "base":
                break
    # The revisions a downgrade from cur to target runs (target itself excluded).
    steps = {s.revision for s in script.iterate_revisions(cur, target, implicit_base=True)}
    if LOG_REVISION not in steps:
        return 0
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(events)).scalar_one()


def _run(engine: Engine, fn, revision: str) -> None:
    """Run an Alembic command under a lock, so processes starting together migrate once.

    Without it, three workers with ``ledger_auto_upgrade`` on a fresh database
    each ran CREATE TABLE, and the losers failed (PostgreSQL: IntegrityError on
    pg_type_typname_nsp_index; SQLite: OperationalError). Under the lock the
    first migrates and the others then find the schema at head and do nothing.
    The lock is the database's own (:meth:`ledger.store.base.MaintainableStore.migrating`).
    """
    cfg = config()
    try:
        with store_for(engine).migrating() as conn:
            cfg.attributes["connection"] = conn
            fn(cfg, revision)
    except CommandError as exc:
        raise SchemaError(_explain(engine, exc)) from exc


def _explain(engine: Engine, exc: CommandError | RevisionError) -> str:
    unknown = unknown_revision(engine)
    if unknown is not None:
        return (f"the database's schema is at revision {unknown!r}, which this celery-ledger "
                "does not know (written by a newer version?)")
    return str(exc).strip().splitlines()[0]


def current(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head() -> str | None:
    return ScriptDirectory.from_config(config()).get_current_head()


def unknown_revision(engine: Engine) -> str | None:
    """The database's revision if no migration of this package has it (else None)."""
    revision = current(engine)
    if revision is None:
        return None
    revisions = {r.revision for r in ScriptDirectory.from_config(config()).walk_revisions()}
    return None if revision in revisions else revision


def check(engine: Engine) -> None:
    """Raise if the database schema differs from the table definitions (``alembic check``)."""
    at, top = current(engine), head()
    if at != top and unknown_revision(engine) is None:
        # Alembic says only "Target database is not up to date."
        url = safe_url(engine.url)
        state = "has no ledger schema" if at is None else f"is at schema revision {at}"
        raise SchemaError(f"{url} {state}, not {top}: run `celery-ledger db upgrade --db {url}`")
    cfg = config()
    try:
        with engine.connect() as conn:
            cfg.attributes["connection"] = conn
            command.check(cfg)
    except CommandError as exc:
        raise SchemaError(_explain(engine, exc)) from exc
