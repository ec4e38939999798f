"""History and timeline of a real workflow run by a real ``celery worker``.

chain(add(1, 1), group(add(2, 2), add(3, 3)), chord([add(4, 4), flaky(key, 2)], fail(...))):
a first task, a group, then a chord whose header has a task that retries once
and whose body fails. Celery runs the group as a chord whose body is the second
chord. The worker (prefork, Redis broker) is the one from
tests/test_celery_worker.py, started for this module.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from celery import chain, chord, group

from ledger.api import Ledger
from ledger.audit import task_history
from ledger.cli import main
from ledger.events import LIFECYCLE_TYPES
from ledger.timeline import QUEUE_CHAR, find_workflow, render_text, to_json
from tests.test_celery_worker import WAIT, db_url, task, worker  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.worker]


@pytest.fixture(scope="module")
def run_workflow(worker):  # noqa: F811
    key = f"flaky-{uuid.uuid4().hex[:8]}"
    add, flaky, fail = (task(worker, n) for n in ("add", "flaky", "fail"))
    sig = chain(add.si(1, 1), group(add.si(2, 2), add.si(3, 3)),
                chord([add.si(4, 4), flaky.si(key, 2)], fail.si("body failed")))
    body = sig.apply_async()
    with pytest.raises(Exception, match="body failed"):
        body.get(timeout=WAIT)
    ledger = worker.backend.ledger
    # The client's result graph: body <- second header <- group <- first task. (Celery
    # gives the nested chord a new group id when it applies it, so that one id is
    # taken from the ledger in the tests, the member ids from here.)
    second, first_group = body.parent, body.parent.parent
    first = first_group.parent
    flaky_id = next(r.id for r in second.results
                    if ledger.history(r.id)[0].data.name == "workerapp.flaky")
    # Celery stores attempt 1's RETRY after it sent attempt 2, which another worker
    # process may have run (and the chord after it) first: wait, bounded, for it.
    deadline = time.monotonic() + WAIT
    while "RETRY" not in states(ledger, flaky_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    return ledger, {
        "first": first.id,
        "group": first_group.id,
        "members": sorted(r.id for r in first_group.results),
        "flaky": flaky_id,
        "plain": next(r.id for r in second.results if r.id != flaky_id),
        "body": body.id,
    }


def states(ledger: Ledger, task_id: str) -> list[str]:
    """The task's Celery states in log order (its SENT/RECEIVED left out)."""
    return [r["state"] for r in task_history(ledger, task_id) if r["event"] not in LIFECYCLE_TYPES]


def test_history_of_a_real_workflow_matches_what_happened(run_workflow, db_url, capsys):  # noqa: F811
    ledger, ids = run_workflow
    assert states(ledger, ids["first"]) == ["STARTED", "SUCCESS"]
    assert states(ledger, ids["plain"]) == ["STARTED", "SUCCESS"]
    # Celery sends the retry before it stores RETRY, so another worker process
    # may run the retry first: the log keeps the order things really happened in.
    # Every attempt was sent and received once (publisher and worker append them,
    # so they may commit in either order, even after the worker's states).
    for key, attempts in (("first", 1), ("plain", 1), ("body", 1), ("flaky", 2)):
        lifecycle = [r for r in task_history(ledger, ids[key]) if r["event"] in LIFECYCLE_TYPES]
        assert key and sorted((r["state"], r["retries"]) for r in lifecycle) == sorted(
            (state, n) for state in ("RECEIVED", "SENT") for n in range(attempts)
        )
    flaky = [r for r in task_history(ledger, ids["flaky"]) if r["event"] not in LIFECYCLE_TYPES]
    assert sorted(r["state"] for r in flaky) == ["RETRY", "STARTED", "STARTED", "SUCCESS"]
    assert flaky[0]["state"] == "STARTED" and flaky[0]["retries"] == 0
    retry = next(r for r in flaky if r["state"] == "RETRY")
    success = next(r for r in flaky if r["state"] == "SUCCESS")
    assert (retry["exc_type"], retry["exc_message"]) == ("ConnectionError", "attempt 1")
    assert success["result"] == '"ok on attempt 2"' and success["retries"] == 1
    assert all(r["worker"] for r in flaky)
    assert states(ledger, ids["body"]) == ["STARTED", "FAILURE"]
    body = task_history(ledger, ids["body"])[-1]
    assert (body["exc_type"], body["exc_message"]) == ("ValueError", "body failed")

    assert main(["history", ids["flaky"], "--db", db_url]) == 0
    out = capsys.readouterr().out
    assert "workerapp.flaky" in out and "ConnectionError: attempt 1" in out


def test_as_of_walks_through_each_state_of_a_retried_task(run_workflow):
    ledger, ids = run_workflow
    events = ledger.history(ids["flaky"])
    metas = [ledger.task_meta(ids["flaky"], as_of=e.position) for e in events]
    seen = [m and m.status for m in metas]
    # the latest state, except that SUCCESS stays; SENT/RECEIVED change nothing
    expected, state = [], None
    for e in events:
        if e.type not in LIFECYCLE_TYPES and state != "SUCCESS":
            state = e.data.status
        expected.append(state)
    assert seen == expected
    events = [e for e in events if e.type not in LIFECYCLE_TYPES]
    assert set(seen) >= {"STARTED", "SUCCESS"}
    retry_at = next(e.position for e in events if e.data.status == "RETRY")
    before_success = [e.position for e in events if e.data.status == "SUCCESS"][0] > retry_at
    assert ledger.task_meta(ids["flaky"], as_of=retry_at).status == ("RETRY" if before_success else "SUCCESS")
    assert ledger.task_meta(ids["flaky"], as_of=events[0].position - 1) is None


@pytest.mark.parametrize("start", ["body", "first", "flaky", "group"])
def test_timeline_finds_the_whole_workflow_from_any_member(run_workflow, start):
    ledger, ids = run_workflow
    wf = find_workflow(ledger, ids[start])
    assert wf.root == ids["first"]
    second = sorted([ids["plain"], ids["flaky"]])
    assert set(wf.tasks) == {ids["first"], *ids["members"], *second, ids["body"]}
    outer = wf.chords[ids["group"]]  # the group, run as a chord whose body is the chord
    assert outer["header"] == ids["members"] and sorted(outer["body"]) == second
    inner = next(c for g, c in wf.chords.items() if g != ids["group"])
    assert inner["header"] == second and inner["body"] == [ids["body"]]
    assert inner["size"] == inner["returned"] == 2 and inner["fired_at"]
    runs = wf.tasks
    assert {r.state for r in runs.values() if r.task_id != ids["body"]} == {"SUCCESS"}
    assert runs[ids["body"]].state == "FAILURE" and runs[ids["body"]].exc_type == "ValueError"
    assert runs[ids["flaky"]].retries == 1
    assert sum(r.retries for r in runs.values()) == 1
    # What happened when. Celery publishes a chain's next step before it stores
    # the result of the step that returned ("callback tasks must be applied
    # before the result is stored", celery/app/trace.py), so the group may start
    # before the first task's SUCCESS is in the log: it starts after the first
    # task started. A chord's body is sent by the backend after its last part's
    # result is stored, so from there on each stage ended before the next began.
    stages = [[ids["first"]], ids["members"], second, [ids["body"]]]
    assert runs[ids["first"]].start <= min(runs[t].start for t in ids["members"])
    for earlier, later in zip(stages[1:-1], stages[2:], strict=True):
        assert max(runs[t].ended_at for t in earlier) <= min(runs[t].start for t in later), [
            (t, runs[t].name, runs[t].started_at, runs[t].received_start, runs[t].first_at, runs[t].ended_at)
            for t in earlier + later]
    assert all(r.start <= r.ended_at for r in runs.values())


def test_timeline_draws_the_tree_and_a_gantt_chart(run_workflow, db_url, capsys, tmp_path):  # noqa: F811
    ledger, ids = run_workflow
    text = render_text(find_workflow(ledger, ids["body"]))
    lines = text.splitlines()
    assert lines[0].startswith(f"workflow of task {ids['body']}  root {ids['first']}  6 tasks")
    expected = [
        f"└─ workerapp.add {ids['first']}",
        f"   └─ chord {ids['group']} (2/2 parts returned, body fired)",
        "      ├─ workerapp.add ",  # the group's two tasks, in the order they started
        "      ├─ workerapp.add ",
        "      └─ body: chord ",
        "         ├─ workerapp.",  # the second chord's header
        "         ├─ workerapp.",
        f"         └─ body: workerapp.fail {ids['body']}",
    ]
    tree = lines[2:-2]  # below: the axis and the legend
    assert len(tree) == len(expected), text
    assert all(line.startswith(want) for line, want in zip(tree, expected, strict=True)), text
    assert sorted(line.split()[2] for line in tree[2:4]) == ids["members"]
    assert {line.split()[2] for line in tree[5:7]} == {ids["plain"], ids["flaky"]}
    bars = {k: next(line for line in tree if ids[k] in line).rsplit("|", 2)[1]
            for k in ("first", "flaky", "body")}
    assert bars["first"].lstrip(" " + QUEUE_CHAR).startswith("█") and bars["body"].rstrip(" ").endswith("▓")
    assert bars["first"].index("█") < bars["body"].index("▓")
    assert "▒" in bars["flaky"]  # the attempt that was retried

    page = tmp_path / "wf.html"
    assert main(["timeline", ids["group"], "--db", db_url, "--format", "json", "--html", str(page)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads(json.dumps(to_json(find_workflow(ledger, ids["group"])), default=str))
    assert doc["kind"] == "chord" and doc["root_id"] == ids["first"]  # the group ran as a chord
    assert [t["task"]["task_id"] for t in doc["tree"]] == [ids["first"]]
    html = page.read_text()
    assert html.startswith("<!doctype html>") and "<script" not in html
    assert all(t in html for t in (ids["first"], *ids["members"], ids["flaky"], ids["body"]))


def test_timeline_of_an_unknown_id_says_so(db_url, capsys):  # noqa: F811
    assert main(["timeline", "no-such-id", "--db", db_url]) == 1
    assert "no task, group or chord 'no-such-id'" in capsys.readouterr().err
