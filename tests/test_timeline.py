"""``timeline`` (CLI, JSON, HTML) and the web console's workflow page: what a workflow
shows when part of it is missing from the log or too large to draw whole."""

from __future__ import annotations

import json
import re

import pytest
from celery import Celery
from celery.app.task import Context
from starlette.testclient import TestClient

from ledger import timeline
from ledger.api import Ledger
from ledger.cli import main
from ledger.events import TaskState
from ledger.web.app import create_app


def test_a_saved_groups_members_that_have_not_run_are_pending(any_url, capsys, tmp_path):
    """Once one member had run, the others (no event yet) were dropped: "group grp-1
    (2 tasks)" over gm-1 alone, and "1 tasks" in the header."""
    app = Celery("timeline", backend=f"ledger+{any_url}", set_as_current=False)
    app.backend.save_group("grp-1", app.GroupResult("grp-1", [app.AsyncResult("gm-1"), app.AsyncResult("gm-2")]))
    app.backend.store_result("gm-1", 4, "SUCCESS", request=Context(
        id="gm-1", task="t.add", group="grp-1", root_id="gm-1", hostname="w1@host", retries=0))

    for some_id in ("grp-1", "gm-1"):
        assert main(["timeline", some_id, "--format", "json", "--db", any_url]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert {t["task_id"]: t["state"] for t in doc["tasks"]} == {"gm-1": "SUCCESS", "gm-2": "PENDING"}
        [group] = doc["tree"]
        assert group["label"] == "group grp-1 (2 tasks)"
        assert [c["task"]["task_id"] for c in group["children"]] == ["gm-1", "gm-2"]
    html = tmp_path / "wf.html"
    assert main(["timeline", "grp-1", "--html", str(html), "--db", any_url]) == 0
    text = capsys.readouterr().out
    assert "  2 tasks  " in text.splitlines()[0]
    assert re.findall(r"─ \S+ (gm-\d)\s+([A-Z]+)", text) == [("gm-1", "SUCCESS"), ("gm-2", "PENDING")]
    assert "gm-2" in html.read_text()


@pytest.fixture
def cut_at_50(monkeypatch):
    """MAX_TASKS at 50 instead of 5,000 (a workflow of 20,000 tasks, scaled down)."""
    monkeypatch.setattr(timeline, "MAX_TASKS", 50)


def test_a_workflow_cut_at_max_tasks_says_so_everywhere(any_url, capsys, tmp_path, cut_at_50):
    """A workflow past MAX_TASKS was drawn in part with no word of it: "51 tasks" for
    200, the JSON ``notes`` empty."""
    ledger = Ledger.open(any_url)
    ledger.append([TaskState(task_id=f"m-{i}", status="SUCCESS", root_id="m-0") for i in range(200)])
    note = ("the workflow was cut at 50 tasks: it has 200 (150 not shown); its root and the most "
            "recent ones are shown. `celery-ledger tasks --root m-0` lists them all.")

    assert main(["timeline", "m-0", "--format", "json", "--db", any_url]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["tasks"]) == 50 and doc["notes"][0] == note
    html = tmp_path / "wf.html"
    assert main(["timeline", "m-7", "--html", str(html), "--db", any_url]) == 0
    text = capsys.readouterr().out
    assert "  50 tasks of 200 (cut)  " in text.splitlines()[0]
    assert f"\nnote: {note}\n" in text
    assert note.replace("`", "&#x27;").split("&#x27;")[0] in html.read_text()
    with TestClient(create_app(ledger), base_url="http://127.0.0.1") as client:
        assert client.get("/api/workflows/m-0").json()["notes"][0] == note
        assert "the workflow was cut at 50 tasks: it has 200 (150 not shown)" in client.get("/workflows/m-0").text

    # One task short of the bound: whole, and no note.
    ledger = Ledger.open(any_url)
    ledger.append([TaskState(task_id=f"w-{i}", status="SUCCESS", root_id="w-0") for i in range(50)])
    assert main(["timeline", "w-0", "--format", "json", "--db", any_url]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["tasks"]) == 50 and not any("cut" in n for n in doc["notes"])


def test_a_task_that_never_ran_is_not_blamed_on_the_tracking_settings(any_url, capsys):
    """A chord body failed by its header's failure is stored FAILURE without being sent
    or run; the note said it lacked STARTED and RECEIVED because
    task_track_started and ledger_track_received were off, though both were on."""
    from datetime import datetime, timezone

    from ledger.events import TaskSent

    ledger = Ledger.open(any_url)
    ledger.append([TaskSent(task_id="a", name="t.part", sent_at=datetime.now(timezone.utc), root_id="a")])
    ledger.append([TaskState(task_id="a", status="SUCCESS", name="t.part", root_id="a")])  # worker tracked nothing
    ledger.append([TaskState(task_id="body", status="FAILURE", name="t.body", root_id="a", parent_id="a")])

    assert main(["timeline", "a", "--format", "json", "--db", any_url]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert len(notes) == 2
    assert notes[0].startswith("1 of 2 tasks were sent and ended with no STARTED state")
    assert notes[1].startswith("1 of 2 tasks ended with no SENT, RECEIVED or STARTED: they did not run")
