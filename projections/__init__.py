"""Projections of the ledger's event log: pure folds, no I/O.

Each projection is a pure fold ``fold(state, event) -> state``
(:mod:`projections.task_meta`, :mod:`projections.group`, :mod:`projections.chord`,
:mod:`projections.catalogue`). Targets materialize the folds:
:mod:`projections.memory` (tests, replay, remote consumers) and
:mod:`ledger.store.target` (tables beside the log, updated in the append's
transaction, and rebuilt set-based from the log).
"""

from projections import catalogue, chord, group, task_meta

#: Projection names, as the CLI (`rebuild --projection NAME`) knows them.
NAMES = ("task_meta", "group", "chord", "catalogue")

__all__ = ["NAMES", "catalogue", "chord", "group", "task_meta"]
