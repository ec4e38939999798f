"""One event shape in every JSON output: history, show, tail and export (issue 15).

The same keys and the same values for the same event whichever command prints
it: stored values decoded (not JSON text inside JSON), args/kwargs as stored
(redacted); the CSV export carries args/kwargs too.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kombu.serialization import dumps

from ledger.api import Ledger
from ledger.events import Encoded, TaskState

CLI = str(Path(sys.executable).parent / "celery-ledger")


def enc(value, serializer="json") -> Encoded:
    content_type, encoding, data = dumps(value, serializer=serializer)
    return Encoded(content_type=content_type, content_encoding=encoding,
                   data=data.encode(encoding) if isinstance(data, str) else data)


def cli(*argv: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "LEDGER_DATABASE_URL"}
    run = subprocess.run([CLI, *argv], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    return run.stdout


@pytest.fixture
def charged(any_url):
    """One task state with a msgpack result and JSON args/kwargs (one of them redacted)."""
    Ledger.open(any_url).append([TaskState(
        task_id="t1", status="SUCCESS", name="shop.charge", worker="w1", retries=0,
        result=enc({"paid": 42}, "msgpack"), args=enc([42, "[redacted]"]),
        kwargs=enc({"currency": "EUR", "options": {"card": "[redacted]"}}),
    )])
    return any_url


def test_history_show_tail_and_export_print_the_same_event(charged):
    url = charged
    shapes = {
        "history": json.loads(cli("history", "t1", "--format", "json", "--db", url))["events"][0],
        "show": json.loads(cli("show", "t1", "--format", "json", "--db", url))["event"],
        "tail": json.loads(cli("tail", "--format", "json", "--db", url)),
        "export jsonl": json.loads(cli("export", "--format", "jsonl", "--db", url)),
        "export json": json.loads(cli("export", "--format", "json", "--db", url))[0],
    }
    first = shapes["history"]
    for name, shape in shapes.items():
        assert shape == first, name
    data = first["data"]
    # Decoded values, not JSON text inside JSON; args/kwargs as stored (redacted).
    assert data["result"] == {"content_type": "application/x-msgpack", "value": {"paid": 42}}
    assert data["args"]["value"] == [42, "[redacted]"]
    assert data["kwargs"]["value"] == {"currency": "EUR", "options": {"card": "[redacted]"}}
    assert (first["state"], first["name"], first["worker"], first["type"]) == (
        "SUCCESS", "shop.charge", "w1", "task.state")


def test_the_csv_export_carries_args_and_kwargs(charged):
    rows = list(csv.DictReader(io.StringIO(cli("export", "--format", "csv", "--db", charged))))
    assert (rows[0]["args"], rows[0]["kwargs"]) == (
        '[42,"[redacted]"]', '{"currency":"EUR","options":{"card":"[redacted]"}}')


def test_export_as_text_is_one_line_per_event(charged):
    out = cli("export", "--format", "text", "--db", charged)
    assert out.splitlines()[0].endswith("task:t1  task.state  SUCCESS")
    assert out == cli("tail", "--db", charged)
