"""``celery-ledger db``: the schema's Alembic migrations."""

from __future__ import annotations

import click

from ledger.cli.context import Env, db_option, echo, format_option, pass_env, print_json
from ledger.cli.root import LedgerGroup


@click.group(cls=LedgerGroup)
def db() -> None:
    """Manage the schema (Alembic migrations)."""


@db.command()
@click.argument("revision", default="head")
@db_option
@pass_env
def upgrade(env: Env, revision: str) -> None:
    """Migrate the schema up (default: to head)."""
    from ledger import migrate

    ledger = env.ledger(create=True, schema_warning=False)
    migrate.upgrade(ledger.engine, revision)
    echo(f"{ledger.url}: schema at revision {migrate.current(ledger.engine)}")


@db.command()
@click.argument("revision")
@click.option("--yes", is_flag=True, help="also when that drops ledger_events holding events")
@db_option
@pass_env
def downgrade(env: Env, revision: str, yes: bool) -> None:
    """Migrate the schema down to REVISION."""
    from ledger import migrate

    ledger = env.ledger(schema_warning=False)
    migrate.downgrade(ledger.engine, revision, drop_events=yes)
    echo(f"{ledger.url}: schema at revision {migrate.current(ledger.engine)}")


@db.command()
@format_option("text", "json")
@db_option
@pass_env
@click.pass_context
def current(ctx: click.Context, env: Env, fmt: str) -> None:
    """Print the schema revision; exit 1 if not at head."""
    from ledger import migrate

    ledger = env.ledger(schema_warning=False)
    cur, head = migrate.current(ledger.engine), migrate.head()
    if fmt == "json":
        print_json({"db": ledger.url, "revision": cur, "head": head, "at_head": cur == head})
    else:
        echo(f"{ledger.url}: revision {cur} (head {head})")
    if cur != head:
        ctx.exit(1)


@db.command()
@db_option
@pass_env
def check(env: Env) -> None:
    """Fail if the schema differs from the table definitions."""
    from ledger import migrate

    migrate.check(env.ledger(schema_warning=False).engine)
    echo("schema matches the table definitions")
