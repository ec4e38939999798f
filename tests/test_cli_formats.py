"""The same ``--format`` choices everywhere (issue 15): text|json on every command that
prints a result, plus jsonl/csv on export (and csv on the catalogue's tables)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from ledger.cli import cli

CLI = str(Path(sys.executable).parent / "celery-ledger")
#: Commands whose output is a side effect, a stream or a web server of their own.
NO_FORMAT = {"demo", "relay", "web", "db upgrade", "db downgrade", "db check"}


def _leaves(group: click.Group, prefix: str = ""):
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _leaves(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


@pytest.mark.parametrize(("name", "command"), list(_leaves(cli)), ids=lambda v: str(v))
def test_every_command_that_prints_a_result_offers_text_and_json(name, command):
    if name in NO_FORMAT:
        return
    formats = next((p.type.choices for p in command.params if p.name == "fmt"), None)
    assert formats is not None, f"{name} has no --format"
    assert {"text", "json"} <= set(formats), (name, formats)


@pytest.mark.parametrize("argv", [
    ("db", "current"), ("rebuild",), ("verify",), ("prune", "--before", "2000-01-01", "--dry-run"),
])
def test_the_json_of_the_operations_commands_parses(sqlite_url, argv):
    env = {k: v for k, v in os.environ.items() if k != "LEDGER_DATABASE_URL"}
    run = subprocess.run([CLI, *argv, "--format", "json", "--db", sqlite_url], capture_output=True,
                         text=True, timeout=120, env=env)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert isinstance(json.loads(run.stdout), dict)
