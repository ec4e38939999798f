"""``celery -A proj ledger ...``: the CLI as a Celery command plugin, run as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ledger.api import Ledger
from ledger.events import TaskState

CELERY = str(Path(sys.executable).parent / "celery")


def celery(tmp_path: Path, backend: str, *argv: str) -> subprocess.CompletedProcess:
    """Run ``celery -A proj <argv>`` where proj's app has ``backend`` as result_backend."""
    (tmp_path / "proj.py").write_text(
        "from celery import Celery\n"
        f"app = Celery('proj', broker='memory://', backend={backend!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("LEDGER_DATABASE_URL", None)
    return subprocess.run([CELERY, "-A", "proj", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_celery_ledger_history_reads_the_apps_result_backend(any_url, tmp_path):
    Ledger.open(any_url).append([TaskState(task_id="t1", status="SUCCESS", name="proj.add")])
    run = celery(tmp_path, f"ledger+{any_url}", "ledger", "history", "t1", "--format", "json")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert [e["state"] for e in doc["events"]] == ["SUCCESS"]
    assert doc["events"][0]["name"] == "proj.add"


def test_celery_ledger_on_an_app_without_the_ledger_says_so_in_one_line(tmp_path):
    run = celery(tmp_path, "redis://127.0.0.1:6379/0", "ledger", "history", "t1")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "celery-ledger: the app's result_backend is not the ledger "
        "(ledger+postgresql://... or ledger+sqlite:///...); pass --db URL"
    ]
