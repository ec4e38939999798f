"""The workflow page's Gantt chart: geometry for an SVG, from :mod:`ledger.timeline`'s tree.

Pure layout (no I/O, no markup): the template draws what this computes, and
Jinja escapes every label. One row per tree node (task, group, chord, body); a
task's row has up to three segments: the queue wait (first event to STARTED),
the attempts that were retried (first to last STARTED) and the final run,
coloured by the final state. Failed tasks carry their exception as a marker.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime

from ledger.timeline import Node, TaskRun, Workflow, build_tree

WIDTH = 1100
LABEL_WIDTH = 380
ROW_HEIGHT = 24
INDENT = 16
TOP = 30  # room for the time axis above the rows
RIGHT_PAD = 20
MIN_BAR = 2.0  # px: a task that took no measurable time is still visible


@dataclass
class Segment:
    x: float
    width: float
    kind: str  # css class: queue, retried, success, failure, revoked, started, other


@dataclass
class Row:
    y: float
    indent: float
    label: str
    task_id: str | None = None
    state: str | None = None
    title: str = ""
    segments: list[Segment] = field(default_factory=list)
    marker: str | None = None
    marker_x: float = 0.0
    marker_anchor: str = "start"


@dataclass
class Tick:
    x: float
    label: str


@dataclass
class Chart:
    width: int
    height: int
    chart_x: float
    chart_width: float
    rows: list[Row]
    ticks: list[Tick]
    span_s: float


#: A UUID shortened to its first 8 digits in chart labels (the tooltip has the whole id).
_UUID = re.compile(r"\b([0-9a-f]{8})-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
LABEL_CHARS = 48


def short_label(label: str) -> str:
    text = _UUID.sub(r"\1…", label)
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


_KIND = {"SUCCESS": "success", "FAILURE": "failure", "REVOKED": "revoked", "STARTED": "started",
         "RETRY": "retried"}


def _walk(nodes: list[Node], depth: int = 0):
    for node in nodes:
        yield depth, node
        yield from _walk(node.children, depth + 1)


def tick_step(span_s: float, target: int = 8) -> float:
    """A round step (1, 2 or 5 times a power of ten seconds) giving about ``target`` ticks."""
    raw = max(span_s, 1e-6) / target
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def format_offset(seconds: float, step: float) -> str:
    if step < 1:
        decimals = max(0, -math.floor(math.log10(step)))
        return f"+{seconds * 1000:.{max(0, decimals - 3)}f}ms" if seconds < 1 else f"+{seconds:.{decimals}f}s"
    if seconds < 120:
        return f"+{seconds:.0f}s"
    return f"+{seconds / 60:.1f}m"


def layout(wf: Workflow, messages: dict[str, str] | None = None) -> Chart:
    """The chart of ``wf``; ``messages`` maps failed task ids to their exception text."""
    messages = messages or {}
    runs = [r for r in wf.tasks.values() if r.start is not None]
    t0 = min((r.first_at or r.start for r in runs), default=None)
    t1 = max((r.ended_at or r.start for r in runs), default=None)
    span = max((t1 - t0).total_seconds(), 1e-3) if t0 and t1 else 1.0
    chart_x = float(LABEL_WIDTH + 10)
    chart_w = WIDTH - chart_x - RIGHT_PAD

    def x_of(at: datetime) -> float:
        return chart_x + (at - t0).total_seconds() / span * chart_w

    rows: list[Row] = []
    for i, (depth, node) in enumerate(_walk(build_tree(wf))):
        row = Row(y=TOP + i * ROW_HEIGHT, indent=depth * INDENT, label=short_label(node.label))
        if node.run is not None and t0 is not None:
            # A marker right of a bar ending past 60% of the chart would not fit.
            fits_right = chart_x + 0.6 * chart_w
            _task_row(row, node.run, x_of, fits_right, messages.get(node.run.task_id))
        rows.append(row)

    step = tick_step(span)
    ticks = [Tick(chart_x + k * step / span * chart_w, format_offset(k * step, step))
             for k in range(int(span / step) + 1)]
    return Chart(WIDTH, int(TOP + len(rows) * ROW_HEIGHT + 10), chart_x, chart_w, rows, ticks, span)


def _task_row(row: Row, run: TaskRun, x_of, fits_right: float, message: str | None) -> None:
    row.task_id, row.state = run.task_id, run.state
    start = run.start
    end = run.ended_at or start
    row.title = f"{run.name or 'task'} {run.task_id}\n{run.state}, " + (
        f"{run.duration:.3f}s" if run.duration is not None else "not finished"
    ) + (f", {run.retries} retries" if run.retries else "")
    if run.first_at and run.started_at and run.first_at < run.started_at:
        row.segments.append(_segment(x_of(run.first_at), x_of(run.started_at), "queue"))
    # The last attempt began at the last STARTED: Celery sends the retry before it
    # stores RETRY, so the RETRY may even be recorded after the last attempt ended.
    run_from = start
    if run.retries and run.last_started_at is not None and start < run.last_started_at <= end:
        run_from = run.last_started_at
    elif run.retried_at is not None and start < run.retried_at < end:
        run_from = run.retried_at
    if run_from > start:
        row.segments.append(_segment(x_of(start), x_of(run_from), "retried"))
    row.segments.append(_segment(x_of(run_from), x_of(end), _KIND.get(run.state, "other")))
    if run.state == "FAILURE":
        row.marker = f"✗ {message or run.exc_type or 'failed'}"
        # Beside the bar, on whichever side has room.
        if x_of(end) > fits_right:
            row.marker_x, row.marker_anchor = x_of(run_from) - 6, "end"
        else:
            row.marker_x = x_of(end) + 6
        row.title += f" — {message or run.exc_type or ''}"


def _segment(a: float, b: float, kind: str) -> Segment:
    return Segment(a, max(b - a, MIN_BAR), kind)
