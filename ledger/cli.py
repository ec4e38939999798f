"""The ``celery-ledger`` command. Thin: parsing and printing; the work is elsewhere.

Every subcommand takes ``--db URL`` (default: ``$LEDGER_DATABASE_URL`` or
``sqlite:///celery-ledger.db`` in the current directory). URLs are printed with
the password hidden.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from ledger.database import BadDatabaseURL, safe_url
from ledger.settings import DATABASE_URL_ENV, DEFAULT_DATABASE_URL, database_url_from_env

Handler = Callable[[argparse.Namespace], int]


def _db_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        default=database_url_from_env(),
        metavar="URL",
        help="ledger database: sqlite:///file.db or postgresql+psycopg://user@host/db "
        f"(default: ${DATABASE_URL_ENV} or {DEFAULT_DATABASE_URL})",
    )


def _open(args: argparse.Namespace, *, upgrade: bool = False):
    from ledger.api import Ledger

    return Ledger.open(args.db, upgrade=upgrade)


def command(
    sub: argparse._SubParsersAction, name: str, handler: Handler, help: str
) -> argparse.ArgumentParser:
    """Add a subcommand that takes --db; the handler returns the exit status."""
    parser = sub.add_parser(name, help=help, description=help)
    _db_option(parser)
    parser.set_defaults(handler=handler)
    return parser


# -- core: db, history, demo -----------------------------------------------------------


def _db_upgrade(args: argparse.Namespace) -> int:
    from ledger import migrate

    ledger = _open(args)
    migrate.upgrade(ledger.engine, args.revision)
    print(f"{ledger.url}: schema at revision {migrate.current(ledger.engine)}")
    return 0


def _db_downgrade(args: argparse.Namespace) -> int:
    from ledger import migrate

    ledger = _open(args)
    migrate.downgrade(ledger.engine, args.revision)
    print(f"{ledger.url}: schema at revision {migrate.current(ledger.engine)}")
    return 0


def _db_current(args: argparse.Namespace) -> int:
    from ledger import migrate

    ledger = _open(args)
    cur, head = migrate.current(ledger.engine), migrate.head()
    print(f"{ledger.url}: revision {cur} (head {head})")
    return 0 if cur == head else 1


def _db_check(args: argparse.Namespace) -> int:
    from ledger import migrate

    migrate.check(_open(args).engine)
    print("schema matches the table definitions")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ledger.demo import run

    return run(args.db)


def add_core_commands(sub: argparse._SubParsersAction) -> None:
    db = sub.add_parser("db", help="manage the schema (Alembic migrations)")
    dbsub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    p = command(dbsub, "upgrade", _db_upgrade, "migrate the schema up (default: to head)")
    p.add_argument("revision", nargs="?", default="head")
    p = command(dbsub, "downgrade", _db_downgrade, "migrate the schema down to REVISION")
    p.add_argument("revision")
    command(dbsub, "current", _db_current, "print the schema revision; exit 1 if not at head")
    command(dbsub, "check", _db_check, "fail if the schema differs from the table definitions")

    p = command(sub, "demo", _demo, "run an in-process Celery app on the ledger and print the history")


# -- audit and replay: history, timeline, show, rebuild, verify, export, prune -------
# (ledger/audit.py registers these)

# -- streaming: relay, tail ------------------------------------------------------------
# (ledger/stream.py registers these)


COMMAND_MODULES: Sequence[str] = ("ledger.audit", "ledger.stream")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="celery-ledger",
        description="Event-sourced result store for Celery: history, replay, streaming.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_core_commands(sub)
    import importlib

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # not written yet / optional
                continue
            raise
        module.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except BadDatabaseURL as exc:
        print(f"celery-ledger: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line for people; never the URL's password
        from sqlalchemy.exc import SQLAlchemyError

        if isinstance(exc, SQLAlchemyError):
            msg = f"database error ({type(exc.orig or exc).__name__}): {_first_line(exc)}"
            print(f"celery-ledger: {msg} [db {safe_url(args.db)}]", file=sys.stderr)
            return 1
        raise


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def print_json(obj: object) -> None:
    print(json.dumps(obj, default=str, indent=2))


if __name__ == "__main__":
    sys.exit(main())
