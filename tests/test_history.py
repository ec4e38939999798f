"""`celery-ledger history` and `show --as-of`: what happened to a task, and its state at any time."""

from __future__ import annotations

import json
import pickle

import pytest
from kombu.serialization import dumps

from ledger.api import Ledger
from ledger.audit import show_record, summarize, task_history
from ledger.cli import main
from ledger.events import Encoded, TaskForgotten, TaskState


def enc(value, serializer="json") -> Encoded:
    content_type, encoding, data = dumps(value, serializer=serializer)
    return Encoded(content_type=content_type, content_encoding=encoding,
                   data=data.encode(encoding) if isinstance(data, str) else data)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def story(any_url):
    """A task that started, retried once, failed, was retried by hand, succeeded and was forgotten."""
    ledger = Ledger.open(any_url)
    common = {"name": "proj.tasks.fetch", "worker": "celery@w1", "queue": "celery"}
    ledger.append([TaskState(task_id="t1", status="STARTED", retries=0, **common)])
    ledger.append([TaskState(
        task_id="t1", status="RETRY", retries=0, exc_type="ConnectionError",
        exc_message="upstream timed out",
        result=enc({"exc_type": "ConnectionError", "exc_message": ["upstream timed out"],
                    "exc_module": "builtins"}), **common)])
    ledger.append([TaskState(task_id="t1", status="STARTED", retries=1,
                             **{**common, "worker": "celery@w2"})])
    ledger.append([TaskState(
        task_id="t1", status="FAILURE", retries=1, traceback="Traceback ...\nValueError: bad row 7",
        result=enc({"exc_type": "ValueError", "exc_message": ["bad row 7"], "exc_module": "builtins"}),
        **{**common, "worker": "celery@w2"})])
    ledger.append([TaskState(task_id="t1", status="SUCCESS", retries=2,
                             result=enc({"rows": 42}, "msgpack"), **common)])
    ledger.append([TaskForgotten(task_id="t1")])
    return any_url, ledger


def test_history_lists_every_event_in_order_even_after_forget(story, capsys):
    url, ledger = story
    assert ledger.task_meta("t1") is None  # forgotten: no projection row
    rows = task_history(ledger, "t1")
    assert [r["state"] for r in rows] == ["STARTED", "RETRY", "STARTED", "FAILURE", "SUCCESS", "FORGOTTEN"]
    assert [r["worker"] for r in rows][:5] == ["celery@w1", "celery@w1", "celery@w2", "celery@w2", "celery@w1"]
    assert [r["retries"] for r in rows][:5] == [0, 0, 1, 1, 2]
    assert (rows[1]["exc_type"], rows[1]["exc_message"]) == ("ConnectionError", "upstream timed out")
    # The exception summary falls back to Celery's exception dict in the result.
    assert (rows[3]["exc_type"], rows[3]["exc_message"]) == ("ValueError", "bad row 7")
    assert rows[4]["result"] == '{"rows":42}'
    positions = [r["position"] for r in rows]
    assert positions == sorted(positions)
    times = [r["time"] for r in rows]
    assert times == sorted(times)

    code, out, _ = run(capsys, "history", "t1", "--db", url)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("task t1  proj.tasks.fetch  (6 events)")
    assert lines[1].split() == ["VERSION", "TIME", "STATE", "WORKER", "RETRIES", "DETAIL"]
    body = lines[2:]
    assert [line.split()[2] for line in body] == ["STARTED", "RETRY", "STARTED", "FAILURE", "SUCCESS", "FORGOTTEN"]
    assert "ConnectionError: upstream timed out" in body[1]
    assert "ValueError: bad row 7" in body[3]
    assert '{"rows":42}' in body[4]


def test_history_json_format_is_machine_readable(story, capsys):
    url, _ = story
    code, out, _ = run(capsys, "history", "t1", "--db", url, "--format", "json")
    assert code == 0
    doc = json.loads(out)
    assert doc["task_id"] == "t1"
    assert [e["type"] for e in doc["events"]] == ["task.state"] * 5 + ["task.forgotten"]
    assert doc["events"][3]["exc_type"] == "ValueError"


def test_history_of_an_unknown_task_says_so_and_exits_1(any_url, capsys):
    code, out, err = run(capsys, "history", "nope", "--db", any_url)
    assert code == 1
    assert out == ""
    assert "no events for task 'nope'" in err


def test_pickled_results_are_never_unpickled(any_url, capsys):
    class Boom:
        def __reduce__(self):  # unpickling this would raise: proves nobody unpickles
            return (exec, ("raise SystemExit('unpickled!')",))

    ledger = Ledger.open(any_url)
    raw = pickle.dumps(Boom())
    ledger.append([TaskState(task_id="p", status="SUCCESS", result=Encoded(
        content_type="application/x-python-serialize", content_encoding="binary", data=raw))])
    code, out, _ = run(capsys, "history", "p", "--db", any_url)
    assert code == 0
    assert f"<pickle {len(raw)} bytes>" in out
    assert summarize(enc([1, 2], "pickle")).startswith("<pickle ")


def test_as_of_returns_each_intermediate_state(story, capsys):
    url, ledger = story
    events = ledger.history("t1")
    expected = ["STARTED", "RETRY", "STARTED", "FAILURE", "SUCCESS", None]
    for event, state in zip(events, expected, strict=True):
        by_position = ledger.task_meta("t1", as_of=event.position)
        by_time = ledger.task_meta("t1", as_of=event.recorded_at)
        assert (by_position.status if by_position else None) == state
        # SQLite times are distinct per append here; on PostgreSQL now() is per transaction.
        assert (by_time.status if by_time else None) == state
    first = events[0]
    assert ledger.task_meta("t1", as_of=first.position - 1) is None
    assert show_record(ledger, "t1", events[3].position)["exc_type"] == "ValueError"

    code, out, _ = run(capsys, "show", "t1", "--db", url, "--as-of", f"@{events[1].position}")
    assert code == 0
    assert "state: RETRY" in out and "exc_type: ConnectionError" in out
    code, out, _ = run(capsys, "show", "t1", "--db", url, "--as-of",
                       events[4].recorded_at.isoformat(), "--format", "json")
    doc = json.loads(out)
    assert (doc["state"], doc["result"], doc["retries"]) == ("SUCCESS", {"rows": 42}, 2)
    code, out, _ = run(capsys, "show", "t1", "--db", url)  # now: forgotten
    assert code == 0 and "state: FORGOTTEN" in out  # said, as history says it


def test_show_rejects_a_malformed_as_of(any_url, capsys):
    assert main(["show", "t1", "--db", any_url, "--as-of", "yesterday-ish"]) == 2
    assert "'yesterday-ish' is not a time: use ISO 8601" in capsys.readouterr().err
