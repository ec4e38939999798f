"""In-memory projection target: the folds applied to dictionaries.

Used by the fast tests, by replay (``as_of``), by ``verify`` as the reference,
and by remote consumers that need no database.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ledger.events import RecordedEvent, stream_kind
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


#: Stream prefix -> the projections its events feed: (snapshot attribute, fold, key).
_FOLDS = {
    prefix: [(p.name, p.fold, p.key) for p in REGISTRY.values() if prefix in p.stream_prefixes]
    for prefix in dict.fromkeys(x for p in REGISTRY.values() for x in p.stream_prefixes)
}


class MemoryTarget:
    """Applies events to a :class:`Snapshot` with the pure folds."""

    def __init__(self) -> None:
        self.state = Snapshot()
        #: Follow-order checkpoint of the last applied event (remote runners store this).
        self.checkpoint: tuple[int, int] = (0, 0)

    def apply(self, events: Iterable[RecordedEvent]) -> None:
        """Fold events in."""
        for event in events:
            # maintenance streams feed no projection
            for name, fold, key_of in _FOLDS.get(stream_kind(event.stream_id), ()):
                table, key = getattr(self.state, name), key_of(event)
                after = fold(table.get(key), event)
                if after is None:
                    table.pop(key, None)
                else:
                    table[key] = after
            self.checkpoint = (event.tx_id, event.position)
