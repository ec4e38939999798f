"""Integrity on SQLite and PostgreSQL: the audit never hangs, never serves a bad event
as clean, and loses nothing (issue 13). Cases that need a real worker are in
tests/test_integrity_worker.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from ledger import migrate
from ledger.api import Ledger
from ledger.errors import DowngradeRefused
from ledger.events import TaskState
from ledger.timeline import find_workflow

CLI = str(Path(sys.executable).parent / "celery-ledger")


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``celery-ledger ARGS`` in its own process, as a user runs it."""
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(60)
def test_timeline_walk_ends_on_a_parent_cycle(ledger: Ledger):
    # Bad data: a and b name each other as parent. The walk must end, not spin.
    ledger.append([TaskState(task_id="a", status="SUCCESS", parent_id="b")])
    ledger.append([TaskState(task_id="b", status="SUCCESS", parent_id="a")])
    wf = find_workflow(ledger, "a")
    assert set(wf.tasks) == {"a", "b"}


def test_downgrade_refuses_to_drop_a_log_holding_events_without_yes(any_url):
    ledger = Ledger.open(any_url)
    ledger.append([TaskState(task_id="kept", status="SUCCESS")])
    for revision in ("base", "-1" if migrate.head() == migrate.LOG_REVISION else "base"):
        done = cli("db", "downgrade", revision, "--db", any_url)
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1 and "holds 1 events; pass --yes" in done.stderr
        assert [e.data.status for e in ledger.history("kept")] == ["SUCCESS"]
    with pytest.raises(DowngradeRefused):
        migrate.downgrade(ledger.engine, "base")
    done = cli("db", "downgrade", "base", "--yes", "--db", any_url)
    assert done.returncode == 0, done.stderr
    assert "ledger_events" not in sa.inspect(ledger.engine).get_table_names()
    # An empty log is dropped without asking.
    migrate.upgrade(ledger.engine)
    assert cli("db", "downgrade", "base", "--db", any_url).returncode == 0
