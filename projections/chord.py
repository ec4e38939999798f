"""Chord counters, folded from the ``chord:<id>`` stream and the chord's returned
parts (each in its own ``part:<task id>`` stream; older logs hold them in the
chord's stream).

The chord is *complete* when the number of distinct header task ids that
returned reaches the chord's size; ``completed_position`` is then the position
of the part that made the count reach it, in log order. Ids are counted, never
blind increments, so a redelivered part cannot complete a chord early.
``chord.fired`` -- the claim -- records that the body was sent, and is the
truth about it: whoever appends it sends the body, once per life.

``chord.applied`` begins a new life: a frozen chord applied again reuses its id
and its header task ids, and counts, completes and fires afresh. Each life is
exactly-once on its own; nothing of an earlier life carries over.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ledger.events import (
    ChordApplied,
    ChordFired,
    ChordPartAdded,
    ChordPartReturned,
    ChordStarted,
    RecordedEvent,
)


@dataclass(frozen=True)
class ChordState:
    chord_id: str
    size: int | None
    #: distinct header task ids that returned: (task_id, status, position of first return)
    parts: frozenset[tuple[str, str, int]]
    fired_position: int | None = None

    @property
    def returned(self) -> int:
        return len(self.parts)

    @property
    def complete(self) -> bool:
        return self.size is not None and self.returned >= self.size

    @property
    def completed_position(self) -> int | None:
        """The position of the part that made the count reach the size, if it did."""
        if not self.complete or not self.size:
            return None
        return sorted(p[2] for p in self.parts)[self.size - 1]

    def has_part(self, task_id: str) -> bool:
        return any(p[0] == task_id for p in self.parts)


def fold(state: ChordState | None, event: RecordedEvent) -> ChordState | None:
    if event.type not in _CHORD_TYPES:
        return state
    if state is None or event.type == ChordApplied.type:
        # the chord's first life, or a new one: an applied chord starts empty
        state = ChordState(chord_id=event.data.chord_id, size=None, parts=frozenset())  # type: ignore[attr-defined]
    data = event.data
    if event.type == ChordStarted.type:
        state = replace(state, size=data.size)  # type: ignore[attr-defined]
    elif event.type == ChordPartAdded.type:
        state = replace(state, size=(state.size or 0) + 1)
    elif event.type == ChordPartReturned.type:
        if not state.has_part(data.task_id):  # type: ignore[attr-defined]
            part = (data.task_id, data.status, event.position)  # type: ignore[attr-defined]
            state = replace(state, parts=state.parts | {part})
    elif event.type == ChordFired.type and state.fired_position is None:
        state = replace(state, fired_position=event.position)
    return state


def chord_key(event: RecordedEvent) -> str:
    """The chord a chord event is about: its stream's key, or a part's chord id."""
    return event.data.chord_id  # type: ignore[attr-defined]


_CHORD_TYPES = frozenset(
    {
        ChordApplied.type,
        ChordStarted.type,
        ChordPartAdded.type,
        ChordPartReturned.type,
        ChordFired.type,
    }
)
