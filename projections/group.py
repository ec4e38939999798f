"""Group state: a saved GroupResult's membership, folded from ``group:<id>`` streams.

Saving again replaces the membership (idempotent for the same members);
``group.forgotten`` / ``group.expired`` remove it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ledger.events import TOMBSTONE_TYPES, GroupSaved, RecordedEvent, decode


@dataclass(frozen=True)
class GroupState:
    group_id: str
    position: int
    saved_at: datetime
    payload: bytes

    @property
    def result(self) -> Any:
        return decode(GroupSaved.type, GroupSaved.schema_version, self.payload).result  # type: ignore[attr-defined]


def fold(state: GroupState | None, event: RecordedEvent) -> GroupState | None:
    if event.type in TOMBSTONE_TYPES:
        return None
    if event.type != GroupSaved.type:
        return state
    return GroupState(
        group_id=event.stream_key,
        position=event.position,
        saved_at=event.recorded_at,
        payload=event.payload,
    )
