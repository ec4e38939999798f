"""``timeline``: the workflow a task, group or chord belongs to (ledger/timeline.py does the work)."""

from __future__ import annotations

import click

from ledger.cli.context import Env, Failure, db_option, echo, format_option, pass_env, print_json
from ledger.cli.files import replaced_on_success


@click.command()
@click.argument("id")
@format_option("text", "json")
@click.option("--html", metavar="FILE", default=None, help="also write a self-contained page")
@click.option("--width", type=click.IntRange(min=10, max=1000), default=40, show_default=True,
              help="Gantt chart columns")
@db_option
@pass_env
def timeline(env: Env, id: str, fmt: str, html: str | None, width: int) -> None:
    """The workflow a task, group or chord belongs to: tree, times and a Gantt chart."""
    from ledger.timeline import UnknownId, find_workflow, render_html, render_text, to_json

    ledger = env.ledger()
    try:
        wf = find_workflow(ledger, id)
    except UnknownId:
        raise Failure(f"no task, group or chord {id!r} in this ledger") from None
    if html:
        with replaced_on_success(html, database=env.database_file) as f:
            f.write(render_html(wf))
    if fmt == "json":
        print_json(to_json(wf))
    else:
        echo(render_text(wf, width=width))
