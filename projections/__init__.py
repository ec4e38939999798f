"""Projections of the ledger's event log: pure folds, no I/O.

Each projection is a pure fold ``fold(state, event) -> state``
(:mod:`projections.task_meta`, :mod:`projections.group`, :mod:`projections.chord`,
:mod:`projections.catalogue`). Targets materialize the folds:
:mod:`projections.memory` (tests, replay, remote consumers) and
:mod:`ledger.store.target` (tables beside the log, updated in the append's
transaction, and rebuilt set-based from the log).

:data:`REGISTRY` is the one vocabulary: a projection's name is the same in the
CLI (``rebuild --projection NAME``), in ``rebuild``/``verify``, as the
:class:`projections.memory.Snapshot` field holding its state, and as the
:class:`ledger.store.schema.ProjectionTables` field of its (first) table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ledger.events import RecordedEvent
from projections import catalogue, chord, group, task_meta


def _stream_key(event: RecordedEvent) -> str:
    return event.stream_key


@dataclass(frozen=True)
class Projection:
    """One projection: its name, the streams that feed it, its fold, its SQL tables."""

    name: str
    #: The stream prefixes (``task``, ``group``, ``chord``, ``part``) of the events it folds.
    stream_prefixes: tuple[str, ...]
    fold: Callable[[Any, Any], Any]
    #: :class:`ledger.store.schema.ProjectionTables` fields it owns, its own name first.
    tables: tuple[str, ...]
    #: The id of the state an event folds into (its stream's key, or a part's chord).
    key: Callable[[RecordedEvent], str] = _stream_key


#: Every projection by name, in the order they are rebuilt and reported.
REGISTRY: dict[str, Projection] = {
    p.name: p
    for p in (
        Projection("task_meta", ("task",), task_meta.fold, ("task_meta",)),
        Projection("groups", ("group",), group.fold, ("groups",)),
        Projection("chords", ("chord", "part"), chord.fold, ("chords", "chord_parts", "chord_counts"), chord.chord_key),
        Projection("catalogue", ("task",), catalogue.fold, ("catalogue",)),
    )
}
#: Projection names, as the CLI (``rebuild --projection NAME``) knows them.
NAMES = tuple(REGISTRY)

__all__ = ["NAMES", "REGISTRY", "Projection", "catalogue", "chord", "group", "task_meta"]
