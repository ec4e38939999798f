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

from ledger import codec
from ledger.events import TOMBSTONE_TYPES, CorruptEvent, RecordedEvent, TaskState, decode

#: Celery's READY_STATES: the states that set ``date_done``.
READY_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
STICKY_STATE = "SUCCESS"
_FIELDS = frozenset(TaskState.model_fields)
_ENCODED_FIELDS = ("result", "args", "kwargs")


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

    def fields(self) -> dict:
        """The event's fields as :attr:`data` would give them (``model_dump()``), decoded faster.

        ``get_task_meta``'s hot path: the event was validated when it was
        appended, so the stored map is only checked for the shape the reader
        relies on (known keys, a string status, encoded values with bytes,
        a datetime or nothing as ``date_done``): 3.5 µs against 8.6 µs for
        building the model again (best of 5 x 3,000, one process). A payload
        that is not that shape goes through :attr:`data`, which raises
        :class:`~ledger.events.CorruptEvent` naming the problem.
        """
        try:
            value = codec.loads(self.payload)
        except codec.CodecError:
            value = None
        if (
            type(value) is dict
            and value.keys() <= _FIELDS
            and type(value.get("status")) is str
            and isinstance(value.get("date_done"), datetime | None)
            and all(
                v is None or (type(v) is dict and type(v.get("data")) is bytes)
                for v in (value.get(k) for k in _ENCODED_FIELDS)
            )
        ):
            return value
        return self.data.model_dump()


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
