"""Projections of the ledger's event log.

Each projection is a pure fold ``fold(state, event) -> state`` with no I/O
(:mod:`projections.task_meta`, :mod:`projections.group`, :mod:`projections.chord`,
:mod:`projections.catalogue`).
Targets materialize the folds: :mod:`projections.memory` (tests, replay, remote
consumers) and :mod:`projections.sql` (tables beside the log, updated in the
append's transaction, and rebuilt set-based from the log).
"""

from projections import catalogue, chord, group, task_meta

#: Projection names, as the CLI (`rebuild --projection NAME`) knows them.
NAMES = ("task_meta", "group", "chord", "catalogue")

__all__ = ["NAMES", "catalogue", "chord", "group", "task_meta"]
