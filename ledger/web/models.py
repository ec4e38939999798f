"""The console's data: pydantic models of the JSON API, built from the ledger's reads.

Pages and the JSON API show the same models, so a page never shows what the API
would not. Stored values (results, args, kwargs) go through
:func:`ledger.audit.decode_value`: JSON and msgpack are decoded, anything else
(pickle above all) is shown as ``<pickle N bytes>`` and never deserialized.
Redacted arguments were replaced before they were stored; they stay
``"[redacted]"`` here because nothing else was ever written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar, Literal
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ledger.audit import decode_value, describe, prunes_of, show_record, task_history
from ledger.errors import UnknownTask
from ledger.events import TASK, CorruptEvent, Encoded, RecordedEvent, TaskState, stream_id
from ledger.output import terminal_safe
from ledger.timeline import Workflow, to_json
from ledger.times import parse_time


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


def shown(value: Encoded | None) -> str | None:
    """A stored value as display text (JSON of the decoded value, or the opaque summary)."""
    if value is None:
        return None
    decoded, out = decode_value(value)
    if not decoded:
        return out
    return json.dumps(out, default=str, ensure_ascii=False)


class EventOut(_Model):
    """One event of a task's stream, with everything it stored."""

    position: int | None  # None for versions missing from the log (pruned or deleted)
    version: int | str
    time: datetime | None
    type: str | None
    state: str | None = None
    name: str | None = None
    worker: str | None = None
    queue: str | None = None
    retries: int | None = None
    exc_type: str | None = None
    exc_message: str | None = None
    traceback: str | None = None
    result: str | None = None
    args: str | None = None
    kwargs: str | None = None
    parent_id: str | None = None
    group_id: str | None = None
    root_id: str | None = None

    @classmethod
    def gap(cls, row: dict[str, Any]) -> EventOut:
        """Stream versions missing from the log, as :func:`ledger.audit.task_history` reports them."""
        return cls(position=None, version=row["version"], time=None, type=None,
                   state=row["state"], result=row["result"])

    @classmethod
    def of(cls, event: RecordedEvent) -> EventOut:
        row = describe(event)
        fields: dict[str, Any] = {
            k: row[k] for k in ("state", "name", "worker", "retries", "exc_type", "exc_message")
        }
        try:
            data = event.data
        except CorruptEvent:
            data = None
        if isinstance(data, TaskState):
            fields.update(
                traceback=data.traceback,
                result=None if row["exc_type"] else shown(data.result),
                args=shown(data.args),
                kwargs=shown(data.kwargs),
                queue=data.queue,
                parent_id=data.parent_id,
                group_id=data.group_id,
                root_id=data.root_id,
            )
        else:
            fields["result"] = row["result"]
        return cls(
            position=event.position,
            version=event.stream_version,
            time=event.recorded_at.astimezone(timezone.utc),
            type=event.type,
            **fields,
        )


class PruneNote(_Model):
    pruned_at: str
    before: str


class TaskDetail(_Model):
    """A task's state (now, or as of an event or time) and its whole history."""

    task_id: str
    name: str | None
    state: str
    as_of: int | datetime | None
    as_of_position: int | None
    note: str | None = None
    events: list[EventOut]
    pruned: list[PruneNote]
    root_id: str | None

    @classmethod
    def of(cls, ledger, task_id: str, as_of: int | datetime | None = None) -> TaskDetail | None:
        """None when the log holds no event of ``task_id`` and none was pruned."""
        pruned = [PruneNote(**p) for p in prunes_of(ledger, stream_id(TASK, task_id))]
        try:
            # history's rows, with the versions it finds missing (PRUNED/MISSING) in place
            described = task_history(ledger, task_id)
        except UnknownTask:
            if not pruned:
                return None
            described = []
        by_position = {e.position: e for e in ledger.history(task_id)}
        rows = [EventOut.of(by_position[r["position"]]) if r["position"] is not None
                else EventOut.gap(r) for r in described]
        record = show_record(ledger, task_id, as_of)
        return cls(
            task_id=task_id,
            name=next((r.name for r in rows if r.name), None),
            state=record["state"],
            as_of=as_of,
            as_of_position=record["position"],
            note=record.get("note"),
            events=rows,
            pruned=pruned,
            root_id=next((r.root_id for r in rows if r.root_id), None),
        )

    def shown_at(self, event: EventOut) -> bool:
        """Whether ``event`` is within the as-of view."""
        if self.as_of is None or event.position is None or event.time is None:
            return True
        if isinstance(self.as_of, int):
            return event.position <= self.as_of
        return event.time <= self.as_of


class RunOut(_Model):
    task_id: str
    name: str | None
    state: str
    start: datetime | None
    end: datetime | None
    duration_s: float | None
    retries: int
    workers: list[str]
    parent_id: str | None
    group_id: str | None
    exc_type: str | None


class NodeOut(_Model):
    label: str
    task: RunOut | None = None
    children: list[NodeOut] = []


class ChordOut(_Model):
    size: int | None
    returned: int
    fired_at: datetime | None
    header: list[str]
    body: list[str]


class WorkflowOut(_Model):
    """The workflow a task, group or chord belongs to (:mod:`ledger.timeline`'s model)."""

    query: str
    kind: str
    root_id: str
    tasks: list[RunOut]
    groups: dict[str, list[str]]
    chords: dict[str, ChordOut]
    tree: list[NodeOut]
    #: what the reader must know (:attr:`ledger.timeline.Workflow.notes`): a cut, unknown durations
    notes: list[str] = []

    @classmethod
    def of(cls, wf: Workflow) -> WorkflowOut:
        return cls.model_validate(to_json(wf))


class LiveEvent(_Model):
    """One appended event as ``/api/events`` sends it (one ``data:`` line of JSON)."""

    position: int
    time: datetime
    type: str
    stream_id: str
    task_id: str | None
    state: str | None
    name: str | None
    worker: str | None
    #: the text fields above as the pages show them (control characters and bidi
    #: overrides escaped as the CLI does, :func:`ledger.output.terminal_safe`): the Live
    #: page's script displays these, its links use the stored ``task_id``
    shown: dict[str, str | None]

    @classmethod
    def of(cls, event: RecordedEvent) -> LiveEvent:
        kind, _, key = event.stream_id.partition(":")
        name = worker = None
        try:
            data = event.data
        except CorruptEvent:
            data = None
        if isinstance(data, TaskState):
            name, worker = data.name, data.worker
        text = {
            "type": event.type,
            "stream_id": event.stream_id,
            "task_id": key if kind == "task" else None,
            "state": describe(event)["state"] if kind == "task" else None,
            "name": name,
            "worker": worker,
        }
        return cls(
            position=event.position,
            time=event.recorded_at.astimezone(timezone.utc),
            **text,
            shown={k: None if v is None else terminal_safe(v) for k, v in text.items()},
        )


# -- the catalogue: Tasks and Stats ------------------------------------------------------


class TaskQuery(_Model):
    """The Tasks page's filters (query parameters of ``/`` and ``/api/tasks``)."""

    name: str | None = None  # exact, or a glob with * ? [ ]
    state: str | None = None
    worker: str | None = None
    queue: str | None = None
    exception: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    root: str | None = None
    args: str | None = None  # a substring of the stored args/kwargs
    #: keyset paging: a listed task's :func:`page_key`; the page older than it, or
    #: the page newer than it (none: the newest page, the one that follows the log)
    before: str | None = Field(None, max_length=600)
    after: str | None = Field(None, max_length=600)
    limit: int = Field(50, ge=1, le=500)

    #: the fields that are not filters of ``Ledger.tasks``
    PAGING: ClassVar[frozenset[str]] = frozenset({"before", "after", "limit"})

    @property
    def newest(self) -> bool:
        """The first page: no key to page from."""
        return self.before is None and self.after is None

    def keys(self) -> dict[str, tuple[datetime, str]]:
        """``before``/``after`` as ``Ledger.tasks`` takes them; ValueError names a bad one."""
        return {k: _read_key(k, v) for k in ("before", "after") if (v := getattr(self, k)) is not None}

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> TaskQuery:
        """From query parameters; :class:`ValueError` names the first bad one."""
        return _from_params(cls, params)

    def filters(self) -> dict[str, Any]:
        """The set filters, for :meth:`ledger.api.Ledger.tasks` (every field but paging)."""
        fields = type(self).model_fields
        return {k: v for k in fields if k not in self.PAGING and (v := getattr(self, k)) is not None}

    def link(self, **change: Any) -> str:
        """The query string of this query with ``change`` applied (for pager links)."""
        values = {**self.filters(), "before": self.before, "after": self.after, "limit": self.limit,
                  **change}
        shown = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in values.items()
                 if v is not None and not (k == "limit" and v == 50)}
        return "?" + urlencode(shown) if shown else "?"


def page_key(first_seen: datetime, task_id: str) -> str:
    """A listed task's place in the newest-first order, as a ``before``/``after`` value."""
    return f"{first_seen.isoformat()}|{task_id}"


def _read_key(field: str, key: str) -> tuple[datetime, str]:
    seen, sep, task_id = key.partition("|")
    try:
        at = datetime.fromisoformat(seen)
    except ValueError:
        at = None
    if not sep or at is None or at.tzinfo is None:
        raise ValueError(f"{field}: not a page key (first-seen time with its zone, '|', task id): {key!r}")
    return at, task_id


class TaskRow(_Model):
    """A task as the Tasks page lists it."""

    task_id: str
    state: str
    name: str | None = None
    worker: str | None = None
    queue: str | None = None
    retries: int | None = None
    root_id: str | None = None
    parent_id: str | None = None
    group_id: str | None = None
    exc_type: str | None = None
    args: str | None = None
    kwargs: str | None = None
    seen_at: datetime | None = None  # the first event of its (current) life
    started_at: datetime | None = None
    finished_at: datetime | None = None
    runtime_s: float | None = None
    #: the attempt's SENT (publisher's clock), when it could run, its RECEIVED
    sent_at: datetime | None = None
    ready_at: datetime | None = None
    received_at: datetime | None = None
    queue_wait_s: float | None = None
    forgotten: bool = False
    expired: bool = False


class TaskPage(_Model):
    query: TaskQuery
    tasks: list[TaskRow]
    #: ``before`` for the next older page / ``after`` for the next newer one (None: no such page)
    older: str | None
    newer: str | None


class StatsQuery(_Model):
    since: datetime | None = None
    until: datetime | None = None
    hours: float = Field(24, gt=0, le=24 * 366)  # the period when ``since`` is not given
    by: Literal["name", "worker", "queue"] = "name"

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> StatsQuery:
        return _from_params(cls, params)

    def period(self, now: datetime) -> tuple[datetime, datetime]:
        until = self.until or now
        if self.since is not None:
            return self.since, until
        try:
            return until - timedelta(hours=self.hours), until
        except OverflowError:  # ``until`` within ``hours`` of the year 1: from the start
            return datetime.min.replace(tzinfo=timezone.utc), until


class StatsRow(_Model):
    """One group (a task name, worker or queue): counts, rates, percentiles (seconds)."""

    name: str
    total: int
    states: dict[str, int]
    failure_rate: float
    retry_rate: float
    runtime_p50: float | None = None
    runtime_p95: float | None = None
    runtime_p99: float | None = None
    runtime_max: float | None = None
    queue_wait_p50: float | None = None
    queue_wait_p95: float | None = None
    queue_wait_p99: float | None = None
    queue_wait_max: float | None = None


class StatsOut(_Model):
    since: datetime
    until: datetime
    by: str
    rows: list[StatsRow]


def _from_params(model: type[BaseModel], params: Mapping[str, str]) -> Any:
    values = {k: v for k, v in params.items() if v != ""}
    unknown = sorted(values.keys() - model.model_fields.keys())
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r}")
    for key, value in values.items():
        if model.model_fields[key].annotation in (datetime | None,):
            try:
                values[key] = parse_time(value)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
    try:
        return model(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ValueError(f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
