"""The ``celery-ledger`` command (click): the only place that parses arguments.

One module per command group; each command calls into the domain modules
(ledger/audit.py, ledger/rebuild.py, ...), which never import this package.
Add a command: write it in the module of its group (or a new module) and list
it in :data:`COMMANDS`: ``celery-ledger`` and ``celery ledger`` (ledger/cli/plugin.py)
both get it.
"""

from __future__ import annotations

from ledger.cli import audit, catalogue, db, demo, plugin, rebuild, stream, timeline, web
from ledger.cli.root import cli, main

COMMANDS = (
    db.db,
    audit.history, audit.show, audit.export,
    catalogue.tasks, catalogue.stats,
    timeline.timeline,
    rebuild.rebuild, rebuild.verify, rebuild.prune,
    stream.relay, stream.tail,
    demo.demo,
    web.web,
)
for _command in COMMANDS:
    cli.add_command(_command)
    plugin.ledger.add_command(_command)

__all__ = ["COMMANDS", "cli", "main"]
