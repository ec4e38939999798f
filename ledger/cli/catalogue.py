"""``tasks`` and ``stats``: the task catalogue, found without an id (ledger/catalogue.py
does the work)."""

from __future__ import annotations

import csv
import json
import sys
from datetime import datetime
from typing import Any

import click

from ledger.cli.context import Env, Failure, db_option, echo, format_option, pass_env, print_json
from ledger.cli.params import TIME, TIME_HELP
from ledger.errors import BadFilter
from ledger.output import csv_cell, terminal_safe


@click.command()
@click.option("--name", default=None, help="task name, exact or a glob (shop.*, *.charge)")
@click.option("--state", "states", multiple=True, metavar="STATE", help="repeatable: any of these")
@click.option("--worker", default=None, help="worker hostname, exact")
@click.option("--queue", default=None, help="queue (routing key), exact")
@click.option("--exception", default=None, metavar="TYPE", help="exception type, e.g. KeyError")
@click.option("--since", type=TIME, default=None, help=f"first event at or after: {TIME_HELP}")
@click.option("--until", type=TIME, default=None, help=f"first event before: {TIME_HELP}")
@click.option("--root", default=None, metavar="ID", help="the whole workflow under this root task id")
@click.option("--args", default=None, metavar="TEXT", help="substring of the stored args/kwargs")
@click.option("--slowest", type=click.IntRange(min=1), default=None, metavar="N",
              help="the N slowest by runtime instead of the newest")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@format_option("text", "json", "csv")
@db_option
@pass_env
def tasks(env: Env, states: tuple[str, ...], fmt: str, **filters: Any) -> None:
    """Tasks by name, state, worker, queue, exception, time, workflow or args; newest first."""
    try:
        rows = env.ledger().tasks(state=list(states) or None, **filters)
    except BadFilter as exc:
        raise Failure(str(exc), exit_code=2) from None
    records = [r.record() for r in rows]
    if fmt == "json":
        print_json(records)
    elif fmt == "csv":
        _write_csv(records, _TASK_COLUMNS)
    else:
        _print_tasks(records)


_TASK_COLUMNS = (
    "task_id", "name", "state", "first_seen", "sent_at", "ready_at", "received_at", "started_at",
    "finished_at", "queue_wait", "runtime", "worker", "queue", "retries", "exc_type", "parent_id", "root_id", "group_id", "chord_id",
    "forgotten", "expired", "args", "kwargs", "position",
)


def _print_tasks(records: list[dict]) -> None:
    if not records:
        echo("no tasks match")
        return
    header = ("first seen", "task id", "name", "state", "wait", "runtime", "worker", "retries", "exception")
    lines = [header] + [
        (
            r["first_seen"][:23].replace("T", " "), r["task_id"], r["name"] or "-",
            r["state"] + (" (forgotten)" if r["forgotten"] else " (expired)" if r["expired"] else ""),
            _seconds(r["queue_wait"]), _seconds(r["runtime"]), r["worker"] or "-", str(r["retries"] if r["retries"] is not None else "-"),
            r["exc_type"] or "",
        )
        for r in records
    ]
    _print_table(lines)


@click.command()
@click.option("--since", type=TIME, default=None, help=f"tasks first seen at or after: {TIME_HELP}")
@click.option("--until", type=TIME, default=None, help=f"tasks first seen before: {TIME_HELP}")
@click.option("--by", type=click.Choice(["name", "worker", "queue"]), default="name", show_default=True)
@format_option("text", "json", "csv")
@db_option
@pass_env
def stats(env: Env, since: datetime | None, until: datetime | None, by: str, fmt: str) -> None:
    """Per task name, worker or queue: counts by state, failure and retry rates, runtime
    and queue wait percentiles."""
    try:
        groups = env.ledger().stats(by=by, since=since, until=until)
    except BadFilter as exc:
        raise Failure(str(exc), exit_code=2) from None
    records = [g.record() for g in groups]
    if fmt == "json":
        print_json({"by": by, "since": since, "until": until, "groups": records})
        return
    flat = [_flatten(r) for r in records]
    if fmt == "csv":
        _write_csv(flat, tuple(flat[0]) if flat else ("key", "total"))
        return
    if not flat:
        echo("no tasks in this period")
        return
    figures = ("p50", "p95", "p99", "max")
    header = (by, "tasks", "states", "failed", "retried",
              *(f"run {p}" for p in figures), *(f"wait {p}" for p in figures))
    _print_table([header] + [
        (
            r["key"] or "-", str(r["total"]),
            " ".join(f"{s}:{n}" for s, n in g["states"].items()),
            f"{r['failure_rate']:.1%}", f"{r['retry_rate']:.1%}",
            *(_seconds(r[f"runtime_{p}"]) for p in figures),
            *(_seconds(r[f"queue_wait_{p}"]) for p in figures),
        )
        for r, g in zip(flat, records, strict=True)
    ])


def _flatten(record: dict) -> dict:
    """One level: ``states`` as JSON text, each duration's figures as ``<name>_<figure>``."""
    out = {k: v for k, v in record.items() if k not in ("states", "durations")}
    out["states"] = json.dumps(record["states"], sort_keys=True)
    for name, figures in record["durations"].items():
        out.update({f"{name}_{k}": v for k, v in figures.items()})
    return out


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f}ms" if value < 1 else f"{value:.2f}s"


def _print_table(lines: list[tuple[str, ...]]) -> None:
    # Widths of the text as printed: an escaped ESC (\x1b) takes four columns, not one.
    lines = [tuple(map(terminal_safe, line)) for line in lines]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def _write_csv(records: list[dict], columns: tuple[str, ...]) -> None:
    writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in records:
        writer.writerow({
            k: csv_cell(json.dumps(v, default=str) if isinstance(v, list | dict) else v)
            for k, v in r.items()
        })
