"""``celery-ledger timeline ID``: the whole workflow a task, group or chord belongs to.

How the workflow is found, from the log alone:

1. ``ID`` is looked up as a task, a group, then a chord stream; the workflow's
   root is the ``root_id`` Celery stamped on the task's (or a member's) states.
2. Every ``task.state`` event of the workflow carries that ``root_id``, which the
   task catalogue keeps indexed: the workflow's tasks are one indexed lookup
   (``Ledger.tasks(root=...)``), whatever the size of the log. Tasks without
   ``root_id`` (events from other writers) are reached through ``children`` and
   ``parent_id`` as well.
3. Groups come from the members' ``group_id``; a group with a ``chord:`` stream
   is shown as a chord, with the task its completing part applied as the body.

The tree is drawn by ``parent_id`` (the task that applied another), siblings of
one group gathered under the group. Each task shows start (its first STARTED,
else when its RECEIVED says it began -- ``task_track_started`` off -- else its
first event), queue wait (from its SENT, or its ETA if later, to that start:
:mod:`projections.lifecycle`), end (its first ready state), duration, retries
(RETRY events) and final state (the projection's rule: SUCCESS is sticky; a
tombstone shows as FORGOTTEN/EXPIRED; SENT/RECEIVED only while no Celery state
was stored).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from ledger.errors import UnknownId
from ledger.events import (
    GROUP,
    ChordFired,
    ChordPartReturned,
    ChordStarted,
    CorruptEvent,
    GroupSaved,
    RecordedEvent,
    ResultExpired,
    TaskForgotten,
    TaskReceived,
    TaskSent,
    TaskState,
    result_node,
    stream_id,
    stream_key,
)
from projections import task_meta
from projections.lifecycle import STATE_OF, next_state, ready_at, run_start
from projections.task_meta import READY_STATES

#: Upper bound on tasks gathered for one timeline (a guard against runaway workflows).
MAX_TASKS = 5000


@dataclass
class TaskRun:
    task_id: str
    name: str | None = None
    parent_id: str | None = None
    group_id: str | None = None
    root_id: str | None = None
    first_at: datetime | None = None
    started_at: datetime | None = None
    #: the last STARTED: when the attempt that ended the task began (after retries)
    last_started_at: datetime | None = None
    ended_at: datetime | None = None
    state: str = "PENDING"
    retries: int = 0
    retried_at: datetime | None = None
    workers: list[str] = field(default_factory=list)
    children: set[str] = field(default_factory=set)
    exc_type: str | None = None
    #: when the first attempt could have run (its SENT: sent, or its ETA if later)
    ready_at: datetime | None = None
    #: when the first attempt began as far as its RECEIVED tells (received, or due)
    received_start: datetime | None = None

    @property
    def began(self) -> datetime | None:
        """When the run began, if known: its STARTED, else (``task_track_started``
        off) when the worker received it or it became due."""
        return self.started_at or self.received_start

    @property
    def start(self) -> datetime | None:
        return self.began or self.first_at

    @property
    def queue_wait(self) -> float | None:
        """Seconds from when the task could have run to when it began (lifecycle rule)."""
        if self.ready_at is None or self.began is None:
            return None
        return max(0.0, (self.began - self.ready_at).total_seconds())

    @property
    def duration(self) -> float | None:
        # Without STARTED or RECEIVED the first event is the end itself: the run
        # time is unknown, not zero.
        if self.began is None or self.ended_at is None:
            return None
        return (self.ended_at - self.began).total_seconds()

    def record(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "name": self.name,
            "state": self.state,
            "ready": _iso(self.ready_at),
            "queue_wait_s": self.queue_wait,
            "start": _iso(self.start),
            "end": _iso(self.ended_at),
            "duration_s": self.duration,
            "retries": self.retries,
            "workers": self.workers,
            "parent_id": self.parent_id,
            "group_id": self.group_id,
            "exc_type": self.exc_type,
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def fold_run(task_id: str, events: list[RecordedEvent]) -> TaskRun:
    """A task's run summarized from its stream (in order)."""
    run = TaskRun(task_id)
    # The state shown is the task-meta projection's (its fold: SUCCESS sticks, a
    # tombstone ends the life), which the equivalence test proves for every target.
    meta: task_meta.TaskMeta | None = None
    lifecycle: str | None = None
    sent: TaskSent | None = None
    received: RecordedEvent | None = None
    for event in events:
        try:
            data = event.data
        except CorruptEvent:
            continue
        if isinstance(data, TaskSent | TaskReceived):
            # The first attempt's (lowest ``retries``) SENT and RECEIVED, in
            # whatever order they committed relative to the worker's states.
            if isinstance(data, TaskSent) and (sent is None or data.retries < sent.retries):
                sent = data
            if isinstance(data, TaskReceived) and (
                received is None or data.retries < received.data.retries  # type: ignore[attr-defined]
            ):
                received = event
            lifecycle = next_state(lifecycle, STATE_OF[event.type])
            run.name = run.name or data.name
            continue
        run.first_at = run.first_at or event.recorded_at
        meta = task_meta.fold(meta, event)
        if isinstance(data, TaskForgotten | ResultExpired):
            run.state = "FORGOTTEN" if isinstance(data, TaskForgotten) else "EXPIRED"
            continue
        if not isinstance(data, TaskState):
            continue
        run.name = run.name or data.name
        if data.parent_id != task_id:  # a retry's parent_id is the task itself
            run.parent_id = run.parent_id or data.parent_id
        run.group_id = run.group_id or data.group_id
        run.root_id = run.root_id or data.root_id
        if data.worker and data.worker not in run.workers:
            run.workers.append(data.worker)
        for child in _child_ids(data.children):
            run.children.add(child)
        if data.status == "STARTED":
            run.started_at = run.started_at or event.recorded_at
            run.last_started_at = event.recorded_at
        if data.status == "RETRY":
            run.retries += 1
            run.retried_at = event.recorded_at
        if data.status in READY_STATES and run.ended_at is None:
            run.ended_at = event.recorded_at
        if meta is not None and meta.position == event.position:  # this state took effect
            run.state = data.status
            run.exc_type = data.exc_type
    if sent is not None:
        run.ready_at = ready_at(sent.sent_at, sent.eta)
        if sent.parent_id != task_id:  # a retry's parent_id is the task itself
            run.parent_id = run.parent_id or sent.parent_id
        run.group_id = run.group_id or sent.group_id
        run.root_id = run.root_id or sent.root_id
    if received is not None:
        run.received_start = run_start(received)
        worker = received.data.hostname  # type: ignore[attr-defined]
        if worker and worker not in run.workers:
            run.workers.insert(0, worker)
    if run.state == "PENDING" and lifecycle is not None:
        run.state = lifecycle  # a lifecycle state never replaces a Celery state
    return run


def _child_ids(children: Any) -> list[str]:
    """Task ids in Celery's serialized ``children`` (nested result tuples)."""
    out: list[str] = []

    def walk(node: Any) -> None:
        parsed = result_node(node)
        if parsed is not None:
            task_or_group, members = parsed
            if members is None:
                out.append(task_or_group)
            else:
                walk(members)
        elif isinstance(node, list | tuple):
            for item in node:
                walk(item)

    walk(children or [])
    return out


@dataclass
class Workflow:
    query: str
    kind: str
    root: str
    tasks: dict[str, TaskRun]
    groups: dict[str, list[str]]
    chords: dict[str, dict[str, Any]]
    #: Set when the workflow had more than :data:`MAX_TASKS` tasks and was cut: how
    #: many it has, counted in the catalogue (tasks stamped with its root, and the root).
    cut_from: int | None = None

    @property
    def notes(self) -> list[str]:
        """What the reader must know: that the workflow was cut, how to read the times."""
        notes = []
        if self.cut_from is not None:
            notes.append(
                f"the workflow was cut at {MAX_TASKS:,} tasks: it has {self.cut_from:,} "
                f"({self.cut_from - len(self.tasks):,} not shown); its root and the most "
                f"recent ones are shown. `celery-ledger tasks --root {self.root}` lists them all."
            )
        unbegun = [r for r in self.tasks.values() if r.ended_at and r.began is None]
        # Sent, then ended with no STARTED or RECEIVED: the worker recorded neither.
        untracked = sum(1 for r in unbegun if r.ready_at is not None)
        if untracked:
            notes.append(
                f"{untracked} of {len(self.tasks)} tasks were sent and ended with no STARTED state "
                "(Celery's default task_track_started=False) and no RECEIVED "
                "(ledger_track_received=False): their duration is unknown ('-'); START shows when "
                "they were first recorded, their end. Set task_track_started = True or "
                "ledger_track_received = True to measure it."
            )
        # No SENT either: most often never run -- a chord body failed by its header, a
        # task revoked before it was published -- or tracked by none of its processes.
        if unsent := len(unbegun) - untracked:
            notes.append(
                f"{unsent} of {len(self.tasks)} tasks ended with no SENT, RECEIVED or STARTED: "
                "they did not run (a chord body failed by its header's failure, a task revoked "
                "before it was sent), or ran where nothing was tracked (ledger_track_sent, "
                "ledger_track_received and task_track_started all off). Their duration is "
                "unknown ('-')."
            )
        return notes


def _workflow_task_ids(ledger, root: str) -> list[str]:
    """The tasks stamped with ``root`` as their ``root_id``, and the root, newest first
    (one more than :data:`MAX_TASKS`, to tell a cut): an indexed lookup in the task
    catalogue (``ledger_tasks.root_id``), not a scan of payloads."""
    return [row.task_id for row in ledger.tasks(root=root, limit=MAX_TASKS + 1)]


def _workflow_size(ledger, root: str) -> int:
    """How many tasks the catalogue has stamped with ``root``, and the root: a count
    over the ``root_id`` index, as cheap as the lookup it follows."""
    t = ledger.target.t.catalogue
    q = sa.select(sa.func.count()).select_from(t).where(sa.or_(t.c.root_id == root, t.c.task_id == root))
    return ledger.read(lambda c: c.execute(q).scalar())


def find_workflow(ledger, some_id: str) -> Workflow:
    """The workflow ``some_id`` (a task, group or chord id) belongs to; raises :class:`UnknownId`."""
    if not ledger.could_hold(some_id):  # a NUL on PostgreSQL: no stream can have that id
        raise UnknownId(some_id)
    runs: dict[str, TaskRun] = {}
    cut = False

    def load(task_id: str) -> TaskRun | None:
        nonlocal cut
        if task_id not in runs:
            if len(runs) >= MAX_TASKS:  # a guard against runaway workflows, said in a note
                cut = True
                return None
            events = ledger.history(task_id)
            if not events:
                return None
            runs[task_id] = fold_run(task_id, events)
        return runs[task_id]

    group_members = _group_members(ledger, some_id)
    chord_stream = ledger.chord_events(some_id)
    if load(some_id) is not None:
        kind, seed = "task", runs[some_id]
    elif group_members or chord_stream:
        kind = "chord" if chord_stream else "group"
        members = group_members or [
            e.data.task_id for e in chord_stream if e.type == ChordPartReturned.type
        ]
        seed = next((r for r in map(load, members) if r is not None), None)
        if seed is None:  # saved, but none of its tasks has run yet: they are PENDING
            pending_runs = {m: TaskRun(m, group_id=some_id) for m in members}
            return Workflow(some_id, kind, some_id, pending_runs, {some_id: members}, {})
    else:
        raise UnknownId(some_id)

    if seed.parent_id is None and seed.root_id is None and seed.group_id is None:
        # A chord body that never ran has no links: its chord's claim names it.
        chord_id = _chord_fired_for(ledger, seed.task_id)
        members = _group_members(ledger, chord_id) if chord_id else []
        seed = next((r for r in map(load, members) if r is not None), seed)

    # Walk up parent links (for tasks stored without root_id), then take the root.
    # Celery gives a retry the task's own id as parent_id, and bad data may hold
    # longer cycles: a task already walked through ends the walk.
    top, walked = seed, {seed.task_id}
    while (
        top.parent_id not in walked and top.parent_id and load(top.parent_id) is not None
    ):
        top = runs[top.parent_id]
        walked.add(top.task_id)
    root = seed.root_id or top.task_id
    load(root)
    for task_id in _workflow_task_ids(ledger, root):
        load(task_id)

    # Downward: children lists and group members, until nothing new.
    groups: dict[str, list[str]] = {}
    pending = list(runs)
    while pending and not cut:
        run = runs[pending.pop()]
        more = set(run.children)
        if run.group_id and run.group_id not in groups:
            groups[run.group_id] = _group_members(ledger, run.group_id)
            more.update(groups[run.group_id])
            # Also the tasks stamped with the group id that are no members: the
            # body of a chord carries its header's group id.
            more.update(_group_stamped(ledger, run.group_id))
        for task_id in more:
            if task_id not in runs and load(task_id) is not None:
                pending.append(task_id)
    for run in list(runs.values()):
        if run.group_id and run.group_id not in groups:
            groups[run.group_id] = _group_members(ledger, run.group_id)
    # A saved group's members that have not run yet (no event) are PENDING, drawn
    # beside the members that ran (same parent, same root).
    for group_id, members in groups.items():
        ran = next((runs[m] for m in members if m in runs), None)
        for member in members:
            if member in runs or ran is None:
                continue
            if len(runs) >= MAX_TASKS:
                cut = True
                break
            runs[member] = TaskRun(member, parent_id=ran.parent_id, group_id=group_id, root_id=ran.root_id)

    chords: dict[str, dict[str, Any]] = {}
    for group_id, members in groups.items():
        stream = chord_stream if group_id == some_id else ledger.chord_events(group_id)
        if not stream:
            continue
        header = set(members) | {e.data.task_id for e in stream if e.type == ChordPartReturned.type}
        # The body is applied by the header part that completed the chord (its
        # parent) and carries the header's group id, but is not a header member.
        body = [r.task_id for r in runs.values() if r.parent_id in header and r.task_id not in header]
        fired = next((e.data for e in stream if e.type == ChordFired.type), None)
        # A body that failed before it ran (a header part failed) has no links of
        # its own; the claim names it.
        named = fired.body_task_id if fired is not None else None
        if named and named not in body and load(named) is not None:
            body.append(named)
        chords[group_id] = {
            "size": next((e.data.size for e in stream if e.type == ChordStarted.type), None),
            "returned": len({e.data.task_id for e in stream if e.type == ChordPartReturned.type}),
            "fired_at": _iso(next((e.recorded_at for e in stream if e.type == ChordFired.type), None)),
            "header": sorted(header & runs.keys()),
            "body": body,
        }
    size = max(_workflow_size(ledger, root), len(runs) + 1) if cut else None
    return Workflow(some_id, kind, root, runs, groups, chords, cut_from=size)


def _group_members(ledger, group_id: str) -> list[str]:
    """The group's members: as saved (GroupResult.save, chord headers), else as stamped.

    ``group().apply_async()`` saves nothing, but each member's states carry its
    group id, indexed in ``ref_id`` (migration 0002).
    """
    saved = [e for e in ledger.read_stream(stream_id(GROUP, group_id)) if e.type == GroupSaved.type]
    if not saved:
        return _group_stamped(ledger, group_id)
    try:
        return _child_ids(saved[-1].data.result)
    except CorruptEvent:
        return []


def _chord_fired_for(ledger, body_task_id: str) -> str | None:
    """The chord whose claim (``chord.fired``) names ``body_task_id`` as its body."""
    e = ledger.log.table
    q = sa.select(e.c.stream_id).where(e.c.ref_id == body_task_id, e.c.type == ChordFired.type)
    stream = ledger.read(lambda c: c.execute(q.limit(1)).scalar())
    return stream_key(stream) if stream else None


def _group_stamped(ledger, group_id: str) -> list[str]:
    """Tasks whose states carry ``group_id`` (index on ``ref_id``), in the order they appeared."""
    e = ledger.log.table
    q = (
        sa.select(e.c.stream_id)
        .where(e.c.ref_id == group_id, e.c.type == TaskState.type)
        .group_by(e.c.stream_id)
        .order_by(sa.func.min(e.c.position))
        .limit(MAX_TASKS)
    )
    return [stream_key(s) for s in ledger.read(lambda c: c.execute(q).scalars().all())]


# -- the tree ------------------------------------------------------------------------------


@dataclass
class Node:
    label: str
    run: TaskRun | None = None
    children: list[Node] = field(default_factory=list)


def build_tree(wf: Workflow) -> list[Node]:
    """Top-level nodes: tasks without a known parent; siblings of one group gathered."""
    body_of = {b: g for g, c in wf.chords.items() for b in c["body"]}
    by_parent: dict[str | None, list[TaskRun]] = {}
    for run in sorted(wf.tasks.values(), key=lambda r: (r.start or datetime.max.astimezone(), r.task_id)):
        parent = run.parent_id if run.parent_id in wf.tasks else None
        by_parent.setdefault(parent, []).append(run)

    def task_node(run: TaskRun) -> Node:
        node = Node(_label(run), run)
        node.children = siblings(by_parent.get(run.task_id, []))
        return node

    drawn: set[str] = set()  # groups already drawn (a guard against cycles in bad data)

    def siblings(runs: list[TaskRun], bodies: bool = False) -> list[Node]:
        out: list[Node] = []
        grouped: dict[str, Node] = {}
        for run in runs:
            if run.task_id in body_of and not bodies:
                continue  # drawn under its chord
            gid = run.group_id
            # Only real members are gathered: Celery also stamps a chord's group
            # id on tasks of a nested body, which are not members of that group.
            if gid and run.task_id in wf.groups.get(gid, ()) and gid not in drawn:
                if gid not in grouped:
                    grouped[gid] = Node(_group_label(wf, gid))
                    out.append(grouped[gid])
                grouped[gid].children.append(task_node(run))
            else:
                out.append(task_node(run))
        drawn.update(grouped)
        for gid, node in grouped.items():
            # A chord's body may itself be a group or chord (nested canvas).
            body_runs = [wf.tasks[b] for b in wf.chords.get(gid, {}).get("body", [])]
            for body_node in siblings(body_runs, bodies=True):
                body_node.label = "body: " + body_node.label
                node.children.append(body_node)
        return out

    return siblings(by_parent.get(None, []))


def _label(run: TaskRun) -> str:
    return f"{run.name or 'task'} {run.task_id}"


def _group_label(wf: Workflow, gid: str) -> str:
    chord = wf.chords.get(gid)
    if chord is None:
        return f"group {gid} ({len(wf.groups[gid])} tasks)"
    fired = "body fired" if chord["fired_at"] else "body not fired"
    return f"chord {gid} ({chord['returned']}/{chord['size']} parts returned, {fired})"


def _flatten(nodes: list[Node], prefix: str = "") -> list[tuple[str, Node]]:
    out = []
    for i, node in enumerate(nodes):
        last = i == len(nodes) - 1
        out.append((prefix + ("└─ " if last else "├─ "), node))
        out.extend(_flatten(node.children, prefix + ("   " if last else "│  ")))
    return out


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.2f}s"
    return f"{seconds / 60:.1f}m"


def _span(wf: Workflow) -> tuple[datetime | None, datetime | None, float]:
    """The chart's first and last instant (queue waits included) and the seconds
    between (None, None when nothing ran yet)."""
    runs = [r for r in wf.tasks.values() if r.start]
    if not runs:
        return None, None, 1e-6
    t0 = min(min(r.start, r.ready_at or r.start) for r in runs)  # type: ignore[type-var]
    t1 = max(r.ended_at or r.start for r in runs)  # type: ignore[type-var]
    return t0, t1, max((t1 - t0).total_seconds(), 1e-6)


def render_text(wf: Workflow, width: int = 40) -> str:
    """The tree with times, and a Gantt chart of each task's queue wait and run
    (one column = span/width)."""
    rows = _flatten(build_tree(wf))
    t0, t1, span = _span(wf)
    when = f"{t0.isoformat()} .. {t1.isoformat()} ({_fmt_duration(span)})" if t0 and t1 else (
        "no task has run yet"
    )
    count = f"{len(wf.tasks)} tasks" + ("" if wf.cut_from is None else f" of {wf.cut_from} (cut)")
    lines = [f"workflow of {wf.kind} {wf.query}  root {wf.root}  {count}  {when}"]
    tree_w = max(len(p) + len(n.label) for p, n in rows)
    header = (f"{'':{tree_w}}  {'STATE':9} {'START':>9} {'WAIT':>8} {'DURATION':>8} {'RETRIES':>7}"
              f"  |{'':{width}}|")
    lines.append(header)
    for prefix, node in rows:
        cells = f"{prefix}{node.label}".ljust(tree_w)
        run = node.run
        if run is None:
            lines.append(cells)
            continue
        start = "-" if run.start is None else "+" + _fmt_duration((run.start - t0).total_seconds())
        lines.append(
            f"{cells}  {run.state:9} {start:>9} {_fmt_duration(run.queue_wait):>8} "
            f"{_fmt_duration(run.duration):>8} {run.retries:>7}  |{_bar(run, t0, span, width)}|"
        )
    lines.append(f"{'':{tree_w}}  {'':46}  {_axis(span, width)}")
    lines.append(f"{'':{tree_w}}  {'':46}  {QUEUE_CHAR} queue wait  ▒ retried attempts")
    lines.extend(f"note: {note}" for note in wf.notes)
    return "\n".join(lines)


#: Bar characters by final state; ``▒`` marks the time spent in attempts that were retried.
_BAR_CHAR = {"SUCCESS": "█", "FAILURE": "▓", "RETRY": "▒", "REVOKED": "x"}
#: The queue wait before the run: from when it could have run to its start.
QUEUE_CHAR = "·"


def _bar(run: TaskRun, t0: datetime, span: float, width: int) -> str:
    if run.start is None:
        return " " * width

    def col(when: datetime) -> int:
        return int((when - t0).total_seconds() / span * (width - 1))

    a = col(run.start)
    b = max(a, col(run.ended_at or run.start))
    char = _BAR_CHAR.get(run.state, "░")
    bar = [" "] * a + [char] * (b - a + 1)
    if run.queue_wait:  # the wait ends where the run's first column begins
        for i in range(col(run.ready_at), a):  # type: ignore[arg-type]
            bar[i] = QUEUE_CHAR
    if run.retried_at is not None:  # the attempts before the last retry
        r = col(run.retried_at)
        for i in range(a, min(r, b) + 1):
            bar[i] = _BAR_CHAR["RETRY"]
    return "".join(bar).ljust(width)[:width]


def _axis(span: float, width: int) -> str:
    left, right = "0", _fmt_duration(span)
    return " " + left + " " * max(1, width - len(left) - len(right)) + right


def to_json(wf: Workflow) -> dict[str, Any]:
    def node(n: Node) -> dict[str, Any]:
        out: dict[str, Any] = {"label": n.label}
        if n.run is not None:
            out["task"] = n.run.record()
        if n.children:
            out["children"] = [node(c) for c in n.children]
        return out

    return {
        "query": wf.query,
        "kind": wf.kind,
        "root_id": wf.root,
        "tasks": [r.record() for r in sorted(wf.tasks.values(), key=lambda r: r.start or datetime.max.astimezone())],
        "groups": wf.groups,
        "chords": wf.chords,
        "tree": [node(n) for n in build_tree(wf)],
        "notes": wf.notes,
    }


_COLORS = {"SUCCESS": "#2e7d32", "FAILURE": "#c62828", "RETRY": "#ef6c00", "REVOKED": "#6d4c41",
           "STARTED": "#1565c0"}


def render_html(wf: Workflow) -> str:
    """A self-contained page (no scripts, no external files) with the tree and the chart."""
    rows = _flatten(build_tree(wf))
    t0, t1, span = _span(wf)

    def pct(seconds: float) -> float:
        return seconds / span * 100

    trs = []
    for prefix, node in rows:
        run = node.run
        label = html.escape(prefix + node.label)
        if run is None or run.start is None:
            trs.append(f"<tr><td class=t>{label}</td>{'<td></td>' * 6}</tr>")
            continue
        left = pct((run.start - t0).total_seconds())
        w = max(pct(((run.ended_at or run.start) - run.start).total_seconds()), 0.4)
        color = _COLORS.get(run.state, "#757575")
        tip = html.escape(f"{run.task_id} {run.state} start {_iso(run.start)} end {_iso(run.ended_at)}")
        wait = ""
        if run.queue_wait:
            wait_left = pct((run.ready_at - t0).total_seconds())  # type: ignore[operator]
            wait_tip = html.escape(f"queue wait {_fmt_duration(run.queue_wait)} from {_iso(run.ready_at)}")
            wait = (f"<div class=w title=\"{wait_tip}\" style=\"left:{wait_left:.3f}%;"
                    f"width:{pct(run.queue_wait):.3f}%\"></div>")
        trs.append(
            f"<tr><td class=t>{label}</td><td>{html.escape(run.state)}</td>"
            f"<td>{_fmt_duration(run.queue_wait)}</td>"
            f"<td>{_fmt_duration(run.duration)}</td><td>{run.retries}</td>"
            f"<td>{html.escape(', '.join(run.workers))}</td>"
            f"<td class=g>{wait}<div title=\"{tip}\" style=\"left:{left:.3f}%;width:{w:.3f}%;"
            f"background:{color}\"></div></td></tr>"
        )
    title = html.escape(f"workflow {wf.root}")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body{{font:13px system-ui,sans-serif;margin:1.5em}} table{{border-collapse:collapse;width:100%}}
td,th{{padding:2px 8px;text-align:left;white-space:nowrap}} tr:nth-child(even){{background:#f5f5f5}}
td.t{{font-family:monospace;white-space:pre}} td.g{{position:relative;width:45%;min-width:300px}}
td.g div{{position:absolute;top:4px;height:12px;border-radius:2px}}
td.g div.w{{background:repeating-linear-gradient(90deg,#bdbdbd 0 3px,transparent 3px 5px)}}
</style></head><body>
<h1>{title}</h1>
<p>{html.escape(f"{wf.kind} {wf.query}: {len(wf.tasks)} tasks, {_iso(t0)} .. {_iso(t1)} ({_fmt_duration(span)})")}</p>
{"".join(f"<p class=note>note: {html.escape(note)}</p>{chr(10)}" for note in wf.notes)}\
<table><tr><th>task</th><th>state</th><th>queue wait</th><th>duration</th><th>retries</th><th>worker</th>\
<th>timeline (0 .. {_fmt_duration(span)}; hatched: queue wait)</th></tr>
{chr(10).join(trs)}
</table></body></html>
"""
