"""A task's lifecycle before Celery's states: SENT and RECEIVED, and the queue wait.

The publisher appends ``task.sent`` and the worker's consumer ``task.received``;
the worker's pool stores STARTED and the ready state. Three processes, so the
events commit in any order: a worker can start, even finish, a task before its
publisher's SENT commits. The rules below make every fold's outcome independent
of that order:

* Celery's view (:mod:`projections.task_meta`) ignores them, so
  ``AsyncResult.state`` stays PENDING until STARTED or a ready state.
* Where a fold keeps a task's lifecycle state (timeline, catalogue), a lifecycle
  state replaces only no state or a lower lifecycle state (RECEIVED replaces
  SENT), never a Celery state: :func:`next_state`.

Queue wait is the time from when the task could have run -- when it was sent,
or its ETA if later (a ``countdown`` is asked-for delay, not waiting) -- to when
it started: its STARTED event, else (``task_track_started`` off) when the
worker received it or it became due, whichever is later.
"""

from __future__ import annotations

from datetime import datetime

from ledger.events import RECEIVED, SENT, RecordedEvent, TaskReceived, TaskSent

#: Lifecycle states by rank: a higher one replaces a lower one, nothing else.
RANK = {SENT: 1, RECEIVED: 2}
STATE_OF = {TaskSent.type: SENT, TaskReceived.type: RECEIVED}


def next_state(current: str | None, incoming: str) -> str | None:
    """The lifecycle state after ``incoming`` (SENT or RECEIVED) arrives in state ``current``."""
    if current is None or RANK.get(current, RANK[incoming]) < RANK[incoming]:
        return incoming
    return current


def ready_at(sent_at: datetime, eta: datetime | None) -> datetime:
    """When a task sent at ``sent_at`` could first run: then, or its ETA if that is later."""
    return sent_at if eta is None else max(sent_at, eta)


def run_start(received: RecordedEvent) -> datetime:
    """When a task began to run, known from its RECEIVED only (no STARTED recorded):
    received, or due if that is later."""
    due = received.data.due_at  # type: ignore[attr-defined]
    return received.recorded_at if due is None else max(received.recorded_at, due)

