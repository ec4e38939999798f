"""``web``: the read-only web console (ledger/web/), under uvicorn."""

from __future__ import annotations

import click

from ledger import settings
from ledger.cli.context import Env, Failure, db_option, pass_env


@click.command()
@db_option
@click.option("--host", default=settings.WEB_HOST, show_default=True,
              help="address to listen on; one that is not loopback needs --auth")
@click.option("--port", type=click.IntRange(1, 65535), default=settings.WEB_PORT, show_default=True)
@click.option("--auth", envvar=settings.WEB_AUTH_ENV, default=None, metavar="USER:PASSWORD|token:SECRET",
              help=f"require HTTP Basic credentials or a bearer token (env {settings.WEB_AUTH_ENV})")
@pass_env
def web(env: Env, host: str, port: int, auth: str | None) -> None:
    """The read-only web console: tasks, histories, workflows, live events, stats."""
    from ledger.errors import BadAuth, UnsafeBind

    try:
        from ledger.web.server import serve
    except ModuleNotFoundError as exc:
        raise Failure(f"web needs {exc.name}: pip install 'celery-ledger[web]'", exit_code=2) from None
    try:
        serve(env.ledger(), host, port, auth)
    except (BadAuth, UnsafeBind) as exc:
        raise Failure(str(exc), exit_code=2) from None
