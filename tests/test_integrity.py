"""Integrity on SQLite and PostgreSQL: the audit never hangs, never serves a bad event
as clean, and loses nothing (issue 13). Cases that need a real worker are in
tests/test_integrity_worker.py.
"""

from __future__ import annotations

import pytest

from ledger.api import Ledger
from ledger.events import TaskState
from ledger.timeline import find_workflow


@pytest.mark.timeout(60)
def test_timeline_walk_ends_on_a_parent_cycle(ledger: Ledger):
    # Bad data: a and b name each other as parent. The walk must end, not spin.
    ledger.append([TaskState(task_id="a", status="SUCCESS", parent_id="b")])
    ledger.append([TaskState(task_id="b", status="SUCCESS", parent_id="a")])
    wf = find_workflow(ledger, "a")
    assert set(wf.tasks) == {"a", "b"}
