"""In-memory projection target: the folds applied to dictionaries.

Used by the fast tests, by replay (``as_of``), by ``verify`` as the reference,
and by remote consumers that need no database.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ledger.events import RecordedEvent, stream_key, stream_kind
from projections import NAMES, REGISTRY, catalogue, chord, group
from projections.task_meta import TaskMeta


@dataclass
class Snapshot:
    """Every projection's state, comparable with ``==`` across targets; one field
    per :data:`projections.REGISTRY` name."""

    task_meta: dict[str, TaskMeta] = field(default_factory=dict)
    groups: dict[str, group.GroupState] = field(default_factory=dict)
    chords: dict[str, chord.ChordState] = field(default_factory=dict)
    catalogue: dict[str, catalogue.TaskEntry] = field(default_factory=dict)

    def differences(self, other: Snapshot) -> list[str]:
        """Human-readable differences, ``self`` being the expected side."""
        out: list[str] = []
        for name in NAMES:
            mine, theirs = getattr(self, name), getattr(other, name)
            for key in sorted(mine.keys() | theirs.keys()):
                a, b = mine.get(key), theirs.get(key)
                if a != b:
                    out.append(f"{name}[{key!r}]: expected {_short(a)}, found {_short(b)}")
        return out


def _short(value: object) -> str:
    if value is None:
        return "no row"
    text = repr(value)
    return text if len(text) <= 300 else text[:297] + "..."


#: Stream prefix -> the projections its events feed: (snapshot attribute, fold).
_FOLDS = {
    prefix: [(p.name, p.fold) for p in REGISTRY.values() if p.stream_prefix == prefix]
    for prefix in dict.fromkeys(p.stream_prefix for p in REGISTRY.values())
}


class MemoryTarget:
    """Applies events to a :class:`Snapshot` with the pure folds."""

    def __init__(self) -> None:
        self.state = Snapshot()
        #: Follow-order checkpoint of the last applied event (remote runners store this).
        self.checkpoint: tuple[int, int] = (0, 0)

    def apply(self, events: Iterable[RecordedEvent]) -> list[str]:
        """Fold events in; return the chord ids that these events completed."""
        completed: list[str] = []
        for event in events:
            prefix, key = stream_kind(event.stream_id), stream_key(event.stream_id)
            if prefix not in _FOLDS:  # maintenance streams feed no projection
                self.checkpoint = (event.tx_id, event.position)
                continue
            for name, fold in _FOLDS[prefix]:
                table = getattr(self.state, name)
                before = table.get(key)
                after = fold(before, event)
                if after is None:
                    table.pop(key, None)
                else:
                    table[key] = after
                if (
                    name == "chords"
                    and after is not None
                    and after.completed_position == event.position
                    and (before is None or before.completed_position is None)
                ):
                    completed.append(key)
            self.checkpoint = (event.tx_id, event.position)
        return completed
