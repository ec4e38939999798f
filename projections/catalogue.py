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
* SENT and RECEIVED (:mod:`projections.lifecycle`) give a task a row before any
  Celery state: its state is SENT or RECEIVED until a Celery state arrives, and a
  lifecycle event never replaces a Celery state, whatever the commit order. While
  the state is SENT/RECEIVED, the latest event of the highest lifecycle state is
  the effective one; a RECEIVED gives name, ``worker`` (the node that received
  it) and retries only, the other payload columns stay the attempt's SENT's
  (:data:`RECEIVED_FIELDS`).
* Every SENT of the life (a retry sends the task again) sets ``sent_at`` and
  ``ready_at`` (:func:`projections.lifecycle.ready_at`) and begins a new
  attempt: ``received_at`` and ``started_at`` are cleared, so the queue wait
  (``ready_at`` to ``started_at``, else ``received_at``) is always one
  attempt's. RECEIVED sets ``received_at``. After SUCCESS nothing changes.

Times are the log's ``recorded_at`` (database time), except ``sent_at`` and
``ready_at``: the publisher's clock and ETA, from the SENT's payload, as the
timeline reads them. Either way a catalogue rebuilt from the log is equal to the
live one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from ledger.events import (
    RECEIVED,
    RecordedEvent,
    ResultExpired,
    TaskForgotten,
    TaskReceived,
    TaskSent,
    TaskState,
)
from projections.lifecycle import RANK, STATE_OF, ready_at
from projections.task_meta import READY_STATES, STICKY_STATE

#: Celery's state of a task that a worker began to execute (``task_track_started``).
STARTED = "STARTED"

#: Columns copied from the effective event's payload (``fields_of``).
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
    #: the latest SENT of the life: when the publisher sent it, and when it could
    #: first run (sent, or its ETA if later)
    sent_at: datetime | None
    ready_at: datetime | None
    #: the latest RECEIVED of the attempt (since that SENT)
    received_at: datetime | None
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

    @property
    def queue_wait(self) -> float | None:
        """Seconds from ``ready_at`` to when the attempt began (its STARTED, else its
        RECEIVED), never negative; None until both are known."""
        began = self.started_at or self.received_at
        if self.ready_at is None or began is None:
            return None
        return max(0.0, (began - self.ready_at).total_seconds())


def fields_of(payload: Mapping[str, Any], event_type: str = TaskState.type) -> dict[str, Any]:
    """The payload columns of a ``task.state``, ``task.sent`` or ``task.received``
    event, from its model's fields (``TaskState.__dict__``) or from its decoded
    msgpack map (the rebuild). A RECEIVED's worker is its ``hostname``; a SENT's
    ``hostname`` is the publisher's, no worker."""
    return dict(zip(PAYLOAD_FIELDS, payload_values(payload, event_type), strict=True))


def payload_values(payload: Mapping[str, Any], event_type: str = TaskState.type) -> tuple:
    """:func:`fields_of`'s values in :data:`PAYLOAD_FIELDS` order: the rebuild calls
    this once per task, so it builds no dict."""
    get = payload.get
    args, kwargs = get("args"), get("kwargs")
    encoded = args if args is not None else kwargs
    return (
        get("name"), get("hostname") if event_type == TaskReceived.type else get("worker"),
        get("queue"), get("retries"), get("parent_id"), get("root_id"), get("group_id"),
        get("exc_type"), _part(encoded, "content_type"), _part(args, "data"), _part(kwargs, "data"),
    )


def _part(encoded: Any, key: str) -> Any:
    # An Encoded model on the live path, its msgpack map when rebuilt from the log.
    if encoded is None:
        return None
    return encoded[key] if type(encoded) is dict else getattr(encoded, key)


#: The payload columns a RECEIVED carries. While a task is only sent or received, the
#: others (queue, workflow ids, arguments) are its attempt's SENT's: a RECEIVED that
#: sets the state keeps them, a SENT after it (committed late) still gives them.
RECEIVED_FIELDS = ("name", "worker", "retries")
SENT_FIELDS = tuple(k for k in PAYLOAD_FIELDS if k not in RECEIVED_FIELDS)

#: The catalogue's columns set by SENT/RECEIVED only.
LIFECYCLE_TIMES = ("sent_at", "ready_at", "received_at")
_NO_TIMES: dict[str, Any] = dict.fromkeys(("first_seen", "started_at", *LIFECYCLE_TIMES))


def takes_over(current: str, incoming: str) -> bool:
    """A lifecycle event in a life whose state is ``current`` becomes the effective
    event: only over a lifecycle state of the same or a lower rank."""
    return RANK.get(current, RANK[incoming] + 1) <= RANK[incoming]


def fold(state: TaskEntry | None, event: RecordedEvent) -> TaskEntry | None:
    if event.type in (TaskForgotten.type, ResultExpired.type):
        if state is None:
            return None
        if event.type == TaskForgotten.type:
            return replace(state, forgotten=True)
        return replace(state, expired=True)
    if event.type != TaskState.type and event.type not in STATE_OF:
        return state
    fresh = state is None or state.ended
    if not fresh and state.state == STICKY_STATE:  # type: ignore[union-attr]
        return state
    data = event.data
    if event.type in STATE_OF:
        return _lifecycle(None if fresh else state, event)
    status = data.status  # type: ignore[attr-defined]
    # A new life starts with no times; else the life's first event, latest STARTED
    # and lifecycle times stay.
    kept = _NO_TIMES if fresh else {
        k: getattr(state, k) for k in ("first_seen", "started_at", *LIFECYCLE_TIMES)
    }
    return TaskEntry(
        task_id=event.stream_key,
        state=status,
        position=event.position,
        first_seen=kept["first_seen"] or event.recorded_at,
        started_at=event.recorded_at if status == STARTED else kept["started_at"],
        finished_at=event.recorded_at if status in READY_STATES else None,
        **{k: kept[k] for k in LIFECYCLE_TIMES},
        **fields_of(data.__dict__),
    )


def _lifecycle(state: TaskEntry | None, event: RecordedEvent) -> TaskEntry:
    """SENT or RECEIVED arriving in the life ``state`` (None: a new life)."""
    data = event.data
    incoming = STATE_OF[event.type]
    if state is None:
        state = TaskEntry(
            task_id=event.stream_key, state=incoming, position=event.position,
            first_seen=event.recorded_at, started_at=None, finished_at=None,
            sent_at=None, ready_at=None, received_at=None,
            **fields_of(data.__dict__, event.type),
        )
    else:
        fields = fields_of(data.__dict__, event.type)
        if takes_over(state.state, incoming):
            keep = SENT_FIELDS if incoming == RECEIVED else ()
            state = replace(state, state=incoming, position=event.position,
                            **{k: v for k, v in fields.items() if k not in keep})
        elif state.state in RANK:  # a SENT under a RECEIVED: the attempt's fields
            state = replace(state, **{k: fields[k] for k in SENT_FIELDS})
    if isinstance(data, TaskSent):
        # a new attempt: what was received and started belongs to the one before
        return replace(state, sent_at=data.sent_at, ready_at=ready_at(data.sent_at, data.eta),
                       received_at=None, started_at=None)
    return replace(state, received_at=event.recorded_at)
