"""The root group: global options, did-you-mean, and the one place errors become exit codes."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence

import click
from click_didyoumean import DYMGroup

from ledger import __version__
from ledger.cli.context import DB_ENV, DEFAULT_DB, Env, Failure
from ledger.output import LONE_SURROGATE

#: What a shell reports for a process killed by SIGPIPE.
SIGPIPE_STATUS = 128 + signal.SIGPIPE


class LedgerGroup(DYMGroup):
    """A group whose commands' errors end as one line and an exit status, never a traceback.

    Used by ``celery-ledger`` and by the ``celery ledger`` plugin alike.
    """

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, cmd, rest = super().resolve_command(ctx, args)
        if cmd is not None and not isinstance(cmd, click.Group):
            problem = _undecodable(cmd, rest)
            if problem is not None:
                raise Failure(f"{problem} (see: {ctx.command_path} {name} --help)", exit_code=2)
        return name, cmd, rest

    def invoke(self, ctx: click.Context):
        from sqlalchemy.exc import SQLAlchemyError

        from ledger.errors import BadDatabaseURL, LedgerError, SettingError
        from ledger.store.engine import safe_url

        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            # Click's usage block is several lines; the mistake and where to look is one.
            message = " ".join(line.strip() for line in exc.format_message().splitlines() if line.strip())
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            raise Failure(f"{message} (see: {where} --help)", exit_code=exc.exit_code) from None
        except (BadDatabaseURL, SettingError) as exc:  # the user's input, like a usage error
            raise Failure(str(exc), exit_code=2) from None
        except LedgerError as exc:  # anything else it refuses or cannot do (DowngradeRefused, ...)
            raise Failure(str(exc)) from None
        except SQLAlchemyError as exc:
            env = ctx.find_object(Env)
            where = f" [db {safe_url(env.db)}]" if env is not None and env.db else ""
            msg = f"database error ({type(exc.orig or exc).__name__}): {_first_line(exc)}"
            raise Failure(msg + where) from None
        except KeyboardInterrupt:
            raise click.exceptions.Exit(130) from None
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, as Unix tools do. Python
            # would otherwise report the failed flush of stdout at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise click.exceptions.Exit(SIGPIPE_STATUS) from None
        except OSError as exc:  # a file the user named: a directory, missing, disk full
            where = f"{exc.filename}: " if exc.filename else ""
            raise Failure(f"{where}{exc.strerror or exc}") from None


#: Options whose value is a file's path or a database URL: a file name on Linux may be
#: any bytes, which Python hands over as lone surrogates (PEP 383).
_PATH_METAVARS = frozenset({"FILE", "URL"})


def _undecodable(cmd: click.Command, args: list[str]) -> str | None:
    """The usage error for an argument that is not UTF-8 (a raw byte from the shell,
    ``$'\\xff'``): ids, names and filters are text, and no database of the ledger
    stores anything else. It was a traceback from the database driver."""
    paths = {
        flag for p in cmd.params if isinstance(p, click.Option) and p.metavar in _PATH_METAVARS
        for flag in p.opts
    }
    value_of_path = False
    for arg in args:
        if value_of_path:
            value_of_path = False
            continue
        flag, eq, _ = arg.partition("=")
        if flag in paths:
            value_of_path = not eq
            continue
        if arg[:2] in paths:  # -oFILE: the short form, glued
            continue
        if LONE_SURROGATE.search(arg):
            try:
                raw = arg.encode("utf-8", "surrogateescape")  # the bytes the shell gave
            except UnicodeEncodeError:  # a surrogate no byte maps to ("\ud800", in-process)
                raw = arg.encode("utf-8", "backslashreplace")
            return f"{repr(raw)[1:]} is not UTF-8 text: ids, names and filters must be"  # b'...' as '...'
    return None


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@click.group(cls=LedgerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db", envvar=DB_ENV, default=DEFAULT_DB, show_default=True, metavar="URL",
    help=f"ledger database: sqlite:///file.db or postgresql://user@host/db (env {DB_ENV})",
)
@click.version_option(__version__, prog_name="celery-ledger")
@click.pass_context
def cli(ctx: click.Context, db: str) -> None:
    """Event-sourced result store for Celery: history, replay, streaming."""
    ctx.obj = Env(db=db)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``celery-ledger`` with ``argv`` (default: the process's); return the exit status."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="celery-ledger")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0
