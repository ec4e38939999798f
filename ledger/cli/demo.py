"""``demo``: an in-process Celery worker on the ledger, then the history (ledger/demo.py)."""

from __future__ import annotations

import click

from ledger.cli.context import Env, db_option, pass_env


@click.command()
@db_option
@pass_env
@click.pass_context
def demo(ctx: click.Context, env: Env) -> None:
    """Run an in-process Celery app on the ledger and print the history."""
    from ledger.demo import run

    ctx.exit(run(env.url))
