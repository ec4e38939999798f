"""The task catalogue: one row per task id, folded from ``task:<id>`` streams, to find
tasks without their id (by name, state, worker, queue, time, workflow, args).

Rules:
* the row describes the task's current life, or its last one if a tombstone ended
  it: ``task.forgotten`` sets ``forgotten``, ``results.expired`` sets ``expired``,
  and the row stays (the history does too). A ``task.state`` after a tombstone
  starts a new life: the row starts over;
* state and the fields from the payload (name, worker, queue, retries, ids,
  exception type, args/kwargs as stored) follow task meta's effective event: the
  latest ``task.state`` of the life, except that SUCCESS is sticky (Celery's rule),
  so ``state`` is what Celery reports for a task that has a result;
* ``first_seen`` is the time of the life's first event, ``started_at`` the time of
  the latest STARTED (the attempt that produced the state: a retried task's
  runtime is its last run's), ``finished_at`` the time of a ready state.

Times are the log's ``recorded_at`` (database time), so a catalogue rebuilt from
the log is equal to the live one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from ledger.events import RecordedEvent, ResultExpired, TaskForgotten, TaskState
from projections.task_meta import READY_STATES, STICKY_STATE

#: Celery's state of a task that a worker began to execute (``task_track_started``).
STARTED = "STARTED"

#: Columns copied from the effective ``task.state`` payload (``fields_of``).
PAYLOAD_FIELDS = (
    "name", "worker", "queue", "retries", "parent_id", "root_id", "group_id",
    "exc_type", "content_type", "args", "kwargs",
)


@dataclass(frozen=True)
class TaskEntry:
    """A task as the catalogue lists it."""

    task_id: str
    state: str
    #: log position of the effective event (the one the payload fields come from)
    position: int
    first_seen: datetime
    started_at: datetime | None
    finished_at: datetime | None
    name: str | None
    worker: str | None
    queue: str | None
    retries: int | None
    parent_id: str | None
    root_id: str | None
    group_id: str | None
    exc_type: str | None
    #: the app's serializer for ``args``/``kwargs`` (stored bytes, redaction applied)
    content_type: str | None
    args: bytes | None
    kwargs: bytes | None
    forgotten: bool = False
    expired: bool = False

    @property
    def ended(self) -> bool:
        """A tombstone ended this life: the next ``task.state`` starts a new one."""
        return self.forgotten or self.expired

    @property
    def runtime(self) -> float | None:
        """Seconds from the last STARTED to the ready state, if both were recorded."""
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


def fields_of(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The payload columns of a ``task.state`` event, from its model's fields
    (``TaskState.__dict__``) or from its decoded msgpack map (the rebuild)."""
    return dict(zip(PAYLOAD_FIELDS, payload_values(payload), strict=True))


def payload_values(payload: Mapping[str, Any]) -> tuple:
    """:func:`fields_of`'s values in :data:`PAYLOAD_FIELDS` order: the rebuild calls
    this once per task, so it builds no dict."""
    get = payload.get
    args, kwargs = get("args"), get("kwargs")
    encoded = args if args is not None else kwargs
    return (
        get("name"), get("worker"), get("queue"), get("retries"), get("parent_id"),
        get("root_id"), get("group_id"), get("exc_type"),
        _part(encoded, "content_type"), _part(args, "data"), _part(kwargs, "data"),
    )


def _part(encoded: Any, key: str) -> Any:
    # An Encoded model on the live path, its msgpack map when rebuilt from the log.
    if encoded is None:
        return None
    return encoded[key] if type(encoded) is dict else getattr(encoded, key)


def fold(state: TaskEntry | None, event: RecordedEvent) -> TaskEntry | None:
    if event.type in (TaskForgotten.type, ResultExpired.type):
        if state is None:
            return None
        if event.type == TaskForgotten.type:
            return replace(state, forgotten=True)
        return replace(state, expired=True)
    if event.type != TaskState.type:
        return state
    fresh = state is None or state.ended
    if not fresh and state.state == STICKY_STATE:  # type: ignore[union-attr]
        return state
    data = event.data
    status = data.status  # type: ignore[attr-defined]
    # the latest STARTED of the life; a new life has none until it starts
    previous = None if fresh else state.started_at  # type: ignore[union-attr]
    return TaskEntry(
        task_id=event.stream_key,
        state=status,
        position=event.position,
        first_seen=event.recorded_at if fresh else state.first_seen,  # type: ignore[union-attr]
        started_at=event.recorded_at if status == STARTED else previous,
        finished_at=event.recorded_at if status in READY_STATES else None,
        **fields_of(data.__dict__),
    )
