"""``rebuild``, ``verify``, ``prune``: operating on projections (ledger/rebuild.py does the work)."""

from __future__ import annotations

import dataclasses
from datetime import datetime

import click

from ledger.cli.context import Env, Failure, db_option, echo, format_option, pass_env, print_json
from ledger.cli.params import TIME, TIME_HELP
from projections import NAMES


def projection_option(f):
    return click.option(
        "--projection", "projections", type=click.Choice(NAMES), multiple=True,
        help=f"only this projection ({', '.join(NAMES)}); repeatable; default all",
    )(f)


@click.command()
@projection_option
@format_option("text", "json")
@db_option
@pass_env
def rebuild(env: Env, projections: tuple[str, ...], fmt: str) -> None:
    """Recompute projections from the log into new tables and swap them in."""
    from ledger.progress import Progress
    from ledger.rebuild import RebuildError
    from ledger.rebuild import rebuild as run_rebuild

    ledger = env.ledger()
    try:
        with Progress("rebuild", None) as progress:
            report = run_rebuild(ledger, list(projections) or None, progress)
    except RebuildError as exc:
        raise Failure(f"rebuild failed: {exc}") from None
    if fmt == "json":
        print_json({**dataclasses.asdict(report), "rate": report.rate})
        return
    rows = ", ".join(f"{name} {n:,}" for name, n in report.rows.items())
    echo(
        f"rebuilt {', '.join(report.projections)} from {report.events:,} events in "
        f"{report.seconds:.2f}s ({report.rate:,.0f} events/s; fill {report.fill_seconds:.2f}s, "
        f"swap {report.swap_seconds:.3f}s, {report.caught_up} events caught up): {rows}"
    )


@click.command()
@projection_option
@format_option("text", "json")
@click.option("--limit", type=click.IntRange(min=0), default=100, show_default=True,
              help="describe at most this many differences of each kind (all are counted)")
@db_option
@pass_env
@click.pass_context
def verify(ctx: click.Context, env: Env, projections: tuple[str, ...], fmt: str, limit: int) -> None:
    """Compare the live projections with a rebuild; exit 1 on any difference."""
    from ledger.rebuild import verify_report

    report = verify_report(env.ledger(), list(projections) or None, limit=limit)
    if fmt == "json":
        print_json(report.to_json())
    else:
        for line in report.differences:
            echo(line)
        if report.total > len(report.differences):
            echo(f"... and {report.total - len(report.differences):,} more")
    if report.total:
        if fmt == "text":
            counts = ", ".join(f"{kind} {n:,}" for kind, n in report.counts.items() if n)
            echo(f"{report.total} difference(s) between the live projections and the log "
                 f"({counts}); {report.hint}", err=True)
        ctx.exit(1)
    if fmt == "text":
        echo("projections match the log")


@click.command()
@click.option("--before", type=TIME, required=True, metavar="DATE",
              help=TIME_HELP)
@click.option("--dry-run", is_flag=True, help="say what would be deleted; delete nothing")
@format_option("text", "json")
@db_option
@pass_env
def prune(env: Env, before: datetime, dry_run: bool, fmt: str) -> None:
    """Delete events recorded before DATE (kept: what live projections and followers need)."""
    from ledger.rebuild import prune as run_prune

    report = run_prune(env.ledger(), before, dry_run=dry_run)
    if fmt == "json":
        print_json(dataclasses.asdict(report))
        return
    for line in report.summary():
        echo(line)
