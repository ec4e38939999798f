"""``history``, ``show``, ``export``: reading the log for people (ledger/audit.py does the work)."""

from __future__ import annotations

import contextlib
import json
import sys
from datetime import datetime

import click

from ledger.audit import EXPORT_FORMATS
from ledger.cli.context import Env, Failure, db_option, echo, format_option, pass_env, print_json
from ledger.cli.files import replaced_on_success
from ledger.cli.params import TIME, TIME_HELP, TIME_OR_POSITION
from ledger.events import TASK, stream_id


@click.command()
@click.argument("task_id")
@format_option("text", "json")
@db_option
@pass_env
def history(env: Env, task_id: str, fmt: str) -> None:
    """Every event of a task in order, even after forget."""
    from ledger.audit import UnknownTask, event_json, format_history, prunes_of, task_history

    ledger = env.ledger()
    pruned = prunes_of(ledger, stream_id(TASK, task_id))
    try:
        rows = task_history(ledger, task_id)
    except UnknownTask:
        why = f" (its events before {pruned[-1]['before']} were pruned)" if pruned else ""
        raise Failure(f"no events for task {task_id!r} in this ledger{why}") from None
    if fmt == "json":
        # Events in the one shape (ledger.audit.event_json); gaps are versions the log lacks.
        events = [event_json(e) for e in ledger.history(task_id)]
        gaps = [r for r in rows if r["position"] is None]
        print_json({"task_id": task_id, "events": events, "gaps": gaps, "pruned": pruned})
        return
    echo(format_history(task_id, rows))
    for p in pruned:
        echo(f"(earlier events recorded before {p['before']} were pruned at {p['pruned_at']})")


@click.command()
@click.argument("task_id")
@click.option("--as-of", type=TIME_OR_POSITION, default=None,
              help=f"a time ({TIME_HELP}) or @N, the log position N")
@format_option("text", "json")
@db_option
@pass_env
def show(env: Env, task_id: str, as_of: datetime | int | None, fmt: str) -> None:
    """A task's state now, or as it was at a time or log position."""
    from ledger.audit import event_json, show_record

    ledger = env.ledger()
    events = ledger.history(task_id)
    if not events:
        raise Failure(f"no events for task {task_id!r} in this ledger")
    record = show_record(ledger, task_id, as_of)
    if fmt == "json":
        # The event that set this state, in the shape history, tail and export use.
        at = record.get("position")
        shown = next((event_json(e) for e in events if e.position == at), None)
        print_json({**record, "event": shown})
        return
    when = "now" if as_of is None else (
        f"at position {as_of}" if isinstance(as_of, int) else f"at {as_of.isoformat()}"
    )
    echo(f"task {task_id} {when}")
    for key, value in record.items():
        if key in ("task_id", "as_of") or value is None:
            continue
        if key == "traceback":
            echo("traceback:\n  " + str(value).rstrip().replace("\n", "\n  "))
            continue
        if key == "result" and not isinstance(value, str):
            value = json.dumps(value, default=str)
        echo(f"{key}: {value}")


@click.command()
@click.option("--since", type=TIME, default=None, help=f"first recorded_at included: {TIME_HELP}")
@click.option("--until", type=TIME, default=None, help="recorded_at upper bound, excluded")
@click.option("--task", default=None, metavar="TASK_ID", help="only this task's events")
@format_option(*EXPORT_FORMATS, default="jsonl")
@click.option("--output", "-o", default=None, metavar="FILE", help="default: stdout")
@db_option
@pass_env
def export(env: Env, since: datetime | None, until: datetime | None, task: str | None, fmt: str,
           output: str | None) -> None:
    """Write events in a time range as JSON lines, a JSON array, CSV or text."""
    from ledger.audit import count_events
    from ledger.audit import export as write_events
    from ledger.progress import Progress

    if since is not None and until is not None and since >= until:
        raise Failure(f"--since {since.isoformat()} is not before --until {until.isoformat()}: "
                      "the window is empty", exit_code=2)
    ledger = env.ledger()
    filters = {"since": since, "until": until, "task_id": task}
    # A task id the database could not hold (a NUL on PostgreSQL) has no events.
    total = count_events(ledger, **filters) if ledger.could_hold(task or "") else 0
    if task is not None and total == 0:
        raise Failure(f"no events for task {task!r} in this ledger" + (" in that window" if since or until else ""))
    with (
        replaced_on_success(output, newline="", database=env.database_file) if output
        else contextlib.nullcontext(sys.stdout)
    ) as out, Progress("export", total) as progress:
        n = write_events(ledger, out, fmt=fmt, progress=progress, **filters)
    if output:
        echo(f"wrote {n} events to {output}", err=True)
