"""What every command shares: the database it opens, its failures, its options."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ledger.output import terminal_safe
from ledger.settings import DATABASE_URL_ENV, DEFAULT_DATABASE_URL

if TYPE_CHECKING:
    from ledger.api import Ledger

# One home for the variable's name and the default: ledger.settings.
DB_ENV, DEFAULT_DB = DATABASE_URL_ENV, DEFAULT_DATABASE_URL

F = TypeVar("F", bound=Callable[..., Any])


class Failure(click.ClickException):
    """One line on stderr naming the problem, and the exit status."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        echo(f"celery-ledger: {self.format_message()}", err=True)


@dataclass
class Env:
    """The invocation's settings, set by the root group (or the Celery plugin)."""

    db: str | None
    #: Why there is no database, said when a command needs one.
    missing: str = "no database given: pass --db URL"

    @property
    def url(self) -> str:
        if self.db is None:
            raise Failure(self.missing, exit_code=2)
        return self.db

    @property
    def database_file(self) -> str | None:
        """The SQLite file of ``--db`` (None for PostgreSQL): output files must not be it."""
        from ledger.store import engine as database

        return database.sqlite_file(self.url)

    def ledger(self, *, create: bool = False, schema_warning: bool = True) -> Ledger:
        """The ledger at ``--db``; unless ``create``, a SQLite file must already exist.

        A schema revision this version does not know is warned about (the ``db``
        commands, which report it themselves, turn that off).
        """
        from ledger.api import Ledger

        path = self.database_file
        if not create and path is not None and not os.path.exists(path):
            # A mistyped path must not leave an empty database behind.
            raise Failure(f"no ledger database at {path} (create one: celery-ledger db upgrade)")
        ledger = Ledger.open(self.url)
        if schema_warning:
            self._warn_on_unknown_schema(ledger)
        return ledger

    @staticmethod
    def _warn_on_unknown_schema(ledger: Ledger) -> None:
        from ledger import migrate

        unknown = migrate.unknown_revision(ledger.engine)
        if unknown is not None:
            echo(f"celery-ledger: warning: the database's schema is at revision {unknown!r}, "
                 "unknown to this celery-ledger (written by a newer version?); results may be "
                 "wrong or missing", err=True)


pass_env = click.make_pass_decorator(Env)


def _set_db(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.ensure_object(Env).db = value


def db_option(f: F) -> F:
    """``--db`` after the command name too (``history ID --db URL``), as before the port."""
    return click.option(
        "--db", default=None, metavar="URL", expose_value=False, is_eager=True, callback=_set_db,
        help="ledger database (same as the global --db)",
    )(f)


def format_option(*choices: str, default: str = "text") -> Callable[[F], F]:
    return click.option(
        "--format", "fmt", type=click.Choice(choices), default=default, show_default=True,
        help="output format",
    )


def echo(text: str, *, err: bool = False) -> None:
    """Print a line of text output: stored strings are data, never terminal control."""
    click.echo(terminal_safe(text), err=err)


def print_json(obj: object) -> None:
    click.echo(json.dumps(obj, default=_json_default, indent=2))


def _json_default(value: Any) -> Any:
    # What JSON has no form for, as every event's JSON shows it (times ISO 8601,
    # bytes base64: ledger.audit.jsonable); anything else as text.
    from ledger.audit import jsonable

    shown = jsonable(value)
    return str(value) if shown is value else shown
