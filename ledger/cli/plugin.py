"""``celery -A proj ledger ...``: the same commands, on the app's own result backend.

Installed through the ``celery.commands`` entry point. The database is the app's
``result_backend`` without its ``ledger+`` prefix, so users never repeat the URL;
``--db`` after the command still overrides it.
"""

from __future__ import annotations

import click

from ledger import lifecycle
from ledger.cli.context import Env
from ledger.cli.root import LedgerGroup

# Every `celery` run imports this plugin: the one hook before a worker starts.
lifecycle.watch_workers()


@click.group(name="ledger", cls=LedgerGroup)
@click.pass_context
def ledger(ctx: click.Context) -> None:
    """celery-ledger commands on this app's result backend (ledger+...)."""
    backend = ctx.obj.app.conf.result_backend
    text = backend if isinstance(backend, str) else ""
    if text.startswith("ledger+"):
        ctx.obj = Env(db=text[len("ledger+"):])
    else:
        # A command given --db still works; any other says what is missing when it opens.
        ctx.obj = Env(db=None, missing="the app's result_backend is not the ledger "
                      "(ledger+postgresql://... or ledger+sqlite:///...); pass --db URL")
