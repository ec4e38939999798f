"""Task meta: what Celery's ``get_task_meta`` returns, folded from ``task:<id>`` streams.

Rules (Celery's own):
* the latest state wins, except that SUCCESS is sticky: a later event for a
  succeeded task stays in the log but does not change the projection;
* ``task.forgotten`` / ``results.expired`` end the task's life (no row); a later
  ``task.state`` starts a new one;
* an unknown id has no row; readers report it as PENDING;
* ``task.sent`` / ``task.received`` change nothing: Celery reports PENDING until
  the worker stores STARTED or a ready state, whenever they commit
  (:mod:`projections.lifecycle`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ledger.events import TOMBSTONE_TYPES, CorruptEvent, RecordedEvent, TaskState, decode

#: Celery's READY_STATES: the states that set ``date_done``.
READY_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
STICKY_STATE = "SUCCESS"


@dataclass(frozen=True)
class TaskMeta:
    """The effective ``task.state`` event of a task's current life."""

    task_id: str
    status: str
    position: int
    done_at: datetime | None
    payload: bytes

    @property
    def data(self) -> TaskState:
        """The event; :class:`CorruptEvent` naming the log position if it is not a valid one."""
        try:
            return decode(TaskState.type, TaskState.schema_version, self.payload)  # type: ignore[return-value]
        except CorruptEvent as exc:
            raise CorruptEvent(
                f"corrupt event at log position {self.position} (task:{self.task_id}): {exc}"
            ) from None


def fold(state: TaskMeta | None, event: RecordedEvent) -> TaskMeta | None:
    if event.type in TOMBSTONE_TYPES:
        return None
    if event.type != TaskState.type:
        return state
    if state is not None and state.status == STICKY_STATE:
        return state
    status = event.data.status  # type: ignore[attr-defined]
    return TaskMeta(
        task_id=event.stream_key,
        status=status,
        position=event.position,
        done_at=event.recorded_at if status in READY_STATES else None,
        payload=event.payload,
    )
