"""`celery-ledger export` for audits, and the progress bar that is drawn only on a terminal."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import select
import time
from datetime import datetime, timezone

from ledger.api import Ledger
from ledger.audit import export
from ledger.cli import main
from ledger.events import Encoded, GroupSaved, TaskForgotten, TaskState
from ledger.progress import Progress


def test_export_writes_a_time_window_as_json_lines_and_csv(any_url, tmp_path, capsys):
    ledger = Ledger.open(any_url)
    ledger.append([TaskState(task_id="early", status="SUCCESS")])
    time.sleep(0.02)
    since = datetime.now(timezone.utc)
    pickled = Encoded(content_type="application/x-python-serialize", content_encoding="binary",
                      data=b"\x80\x04K\x01.")
    ledger.append([TaskState(task_id="a", status="STARTED", worker="w1")])
    ledger.append([TaskState(task_id="a", status="FAILURE", exc_type="KeyError", exc_message="'x'",
                             result=Encoded(content_type="application/json", data=b'{"exc_type": "KeyError"}'))])
    ledger.append([TaskState(task_id="b", status="SUCCESS", result=pickled)])
    ledger.append([GroupSaved(group_id="g", result=[["g", None], [[["a", None], None]]])])
    ledger.append([TaskForgotten(task_id="a")])
    time.sleep(0.02)
    until = datetime.now(timezone.utc)
    ledger.append([TaskState(task_id="late", status="SUCCESS")])

    out = tmp_path / "audit.jsonl"
    code = main(["export", "--db", any_url, "--since", since.isoformat(), "--until", until.isoformat(),
                 "--format", "jsonl", "-o", str(out)])
    assert code == 0
    assert "wrote 5 events" in capsys.readouterr().err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["stream_id"], r["type"]) for r in records] == [
        ("task:a", "task.state"), ("task:a", "task.state"), ("task:b", "task.state"),
        ("group:g", "group.saved"), ("task:a", "task.forgotten")]
    assert [r["position"] for r in records] == sorted(r["position"] for r in records)
    assert records[1]["data"]["result"] == {"content_type": "application/json", "value": {"exc_type": "KeyError"}}
    # Pickle is exported as bytes for the auditor, never unpickled here.
    assert records[2]["data"]["result"]["content_type"] == "application/x-python-serialize"
    assert base64.b64decode(records[2]["data"]["result"]["data_base64"]) == pickled.data

    code = main(["export", "--db", any_url, "--since", since.isoformat(), "--task", "a", "--format", "csv"])
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["stream_id"], r["state"]) for r in rows] == [
        ("task:a", "STARTED"), ("task:a", "FAILURE"), ("task:a", "FORGOTTEN")]
    assert (rows[1]["exc_type"], rows[1]["exc_message"], rows[0]["worker"]) == ("KeyError", "'x'", "w1")


def test_export_reads_in_batches_and_loses_no_event(any_url):
    ledger = Ledger.open(any_url)
    n = 10 * 2 + 7
    ledger.append([TaskState(task_id=f"t{i}", status="SUCCESS") for i in range(n)])
    buf = io.StringIO()
    assert export(ledger, buf, fmt="jsonl", batch=10) == n
    positions = [json.loads(line)["position"] for line in buf.getvalue().splitlines()]
    assert len(set(positions)) == n and positions == sorted(positions)


def test_progress_bar_is_drawn_only_on_a_terminal():
    quiet = io.StringIO()
    with Progress("export", 10, stream=quiet) as p:
        p.advance(10)
    assert quiet.getvalue() == ""

    leader, follower = os.openpty()
    try:
        with open(follower, "w", closefd=False) as tty, Progress("rebuild", 1000, stream=tty, interval=0) as p:
            p.advance(250)
            p.advance(250)
        drawn = ""
        while select.select([leader], [], [], 0.5)[0]:  # a pty hands over one write at a time
            drawn += os.read(leader, 65536).decode()
            if drawn.endswith("\n"):
                break
    finally:
        os.close(leader)
        os.close(follower)
    assert "rebuild [" in drawn and "500/1,000 events" in drawn
    assert "/s" in drawn and "ETA " in drawn
    assert drawn.endswith("\r\n") or drawn.endswith("\n")
