"""The web console in a real headless Chromium, on data stored by a real ``celery worker``.

One PostgreSQL database (LISTEN/NOTIFY feeds the live pages), one worker and one
``celery-ledger web`` process for the module; the workflow is the one of
tests/test_audit_workflow.py (a chain, a group and a chord with a retried part
and a failing body). Screenshots of every page go to ``test-artifacts/web/``.
"""

from __future__ import annotations

import json
import re
import uuid

import pytest

from ledger.api import Ledger
from ledger.events import Encoded, TaskState
from tests.browser import WAIT_MS, chromium, server_for, shoot  # noqa: F401  (fixtures)
from tests.conftest import PG_SERVER, _new_pg_db, admin
from tests.test_audit_workflow import run_workflow  # noqa: F401  (fixture)
from tests.test_celery_worker import WAIT, task, worker  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.worker, pytest.mark.browser, pytest.mark.postgres]


@pytest.fixture(scope="module")
def db_url(pg_template):
    """PostgreSQL only (the worker fixture's database): the live pages follow NOTIFY."""
    name = _new_pg_db(pg_template)
    yield f"{PG_SERVER}/{name}"
    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def site(db_url, server_for):  # noqa: F811
    return server_for(db_url).base


def wait_live(page) -> None:
    """Until the page's EventSource is connected (its status reads 'live')."""
    page.wait_for_selector("#live-status.on", timeout=WAIT_MS)


def test_every_page_loads_without_a_console_error(site, chromium, run_workflow):  # noqa: F811
    ledger, ids = run_workflow
    flaky = ledger.history(ids["flaky"])
    retry_at = next(e.position for e in flaky if getattr(e.data, "status", None) == "RETRY")
    pages = {
        "tasks": "/",
        "task": f"/tasks/{ids['flaky']}",
        "task-as-of": f"/tasks/{ids['flaky']}?as_of=@{retry_at}",
        "task-failed": f"/tasks/{ids['body']}",
        "workflow": f"/workflows/{ids['first']}",
        "live": "/live",
        "stats": "/stats",
    }
    for name, path in pages.items():
        page = chromium.open(site + path)
        if name in ("live", "tasks"):
            wait_live(page)
        if name == "live":
            page.wait_for_selector("#live-events tr")
        shoot(page, name)
        page.close()
    assert chromium.errors == []


def test_task_page_shows_every_event_and_the_state_as_of_one(site, chromium, run_workflow):  # noqa: F811
    ledger, ids = run_workflow
    events = ledger.history(ids["flaky"])
    page = chromium.open(f"{site}/tasks/{ids['flaky']}")
    rows = page.locator("table.history tbody tr")
    assert rows.count() == len(events)
    assert page.locator("table.history").inner_text().count("ConnectionError: attempt 1") == 1
    retry = next(e for e in events if getattr(e.data, "status", None) == "RETRY")
    page.select_option("#as-of-event", f"@{retry.position}")
    page.click("form.asof button >> nth=0")
    page.wait_for_url(re.compile(rf"as_of=(%40|@){retry.position}\b"))
    want = ledger.task_meta(ids["flaky"], as_of=retry.position).status
    assert page.locator("p.summary .state").inner_text() == want
    later = [e for e in events if e.position > retry.position]
    assert page.locator("table.history tr.later").count() == len(later)
    page.close()
    assert chromium.errors == []


def test_workflow_page_draws_the_bars_of_a_chord_with_a_retried_part(site, chromium, run_workflow):  # noqa: F811
    ledger, ids = run_workflow
    page = chromium.open(f"{site}/workflows/{ids['body']}")
    svg = page.locator("svg.gantt")
    tasks = [ids["first"], *ids["members"], ids["plain"], ids["flaky"], ids["body"]]
    chart_right = float(svg.get_attribute("width"))
    for task_id in tasks:
        row = svg.locator(f'g.row.task[data-task-id="{task_id}"]')
        assert row.count() == 1, task_id
        bars = row.locator("rect.bar")
        assert bars.count() >= 1
        for i in range(bars.count()):
            x, w = float(bars.nth(i).get_attribute("x")), float(bars.nth(i).get_attribute("width"))
            assert x > 0 and w > 0 and x + w <= chart_right, (task_id, x, w)
        assert row.locator("a").get_attribute("href") == f"/tasks/{task_id}"
    # The chord's header part that retried: its retried attempt before its final run.
    flaky = svg.locator(f'g.row.task[data-task-id="{ids["flaky"]}"]')
    retried, final = flaky.locator("rect.bar.retried"), flaky.locator("rect.bar.success")
    assert retried.count() == 1 and final.count() == 1
    assert float(retried.get_attribute("x")) < float(final.get_attribute("x"))
    # The failed body: a red bar and its message; the chord rows above it.
    body = svg.locator(f'g.row.task[data-task-id="{ids["body"]}"]')
    assert body.locator("rect.bar.failure").count() == 1
    assert body.locator("text.marker").text_content() == "✗ ValueError: body failed"
    labels = svg.locator("g.row.container text.label").all_text_contents()
    assert sum(label.startswith("chord ") or label.startswith("body: chord ") for label in labels) == 2
    assert svg.locator("g.axis text").count() >= 2
    # Stages follow each other on the time axis: the first task ends before the body starts.
    first_bar = svg.locator(f'g.row.task[data-task-id="{ids["first"]}"] rect.bar').last
    body_bar = body.locator("rect.bar.failure")
    assert float(first_bar.get_attribute("x")) < float(body_bar.get_attribute("x"))
    shoot(page, "workflow-chord")
    shoot(page, "workflow-chart", down_to="svg.gantt")  # the README's picture
    page.close()
    assert chromium.errors == []


def test_a_task_a_worker_stores_appears_on_the_live_and_tasks_pages_without_reload(
    site, chromium, worker  # noqa: F811
):
    live = chromium.open(f"{site}/live")
    tasks = chromium.open(f"{site}/")
    for page in (live, tasks):
        wait_live(page)
        page.evaluate("window.__notReloaded = true")
    result = task(worker, "add").delay(20, 22)
    assert result.get(timeout=WAIT) == 42
    live.wait_for_selector(f'#live-events a[href="/tasks/{result.id}"]', timeout=WAIT_MS)
    states = live.locator("#live-events tr", has=live.locator(f'a[href="/tasks/{result.id}"]'))
    live.wait_for_function(
        "id => [...document.querySelectorAll('#live-events tr')].some("
        "tr => tr.textContent.includes(id) && tr.textContent.includes('SUCCESS'))",
        arg=result.id, timeout=WAIT_MS,
    )
    # each event of the task once: SENT (publisher), RECEIVED (worker), STARTED, SUCCESS
    rows = states.all_text_contents()
    # (a row's text is its cells run together: position, time, type, state, ...)
    assert [sum(marker in row for row in rows) for marker in
            ("task.sentSENT", "task.receivedRECEIVED", "task.stateSTARTED", "task.stateSUCCESS")
            ] == [1, 1, 1, 1], rows
    assert len(rows) == 4, rows
    tasks.wait_for_selector(f'#task-rows a[href="/tasks/{result.id}"]', timeout=WAIT_MS)
    for page in (live, tasks):
        assert page.evaluate("window.__notReloaded") is True
    shoot(live, "live-after-task")
    shoot(tasks, "tasks-after-task")
    live.close()
    tasks.close()
    assert chromium.errors == []


SCRIPT = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"


def test_a_script_stored_as_name_or_result_renders_as_text(site, chromium, worker, db_url):  # noqa: F811
    # A real worker returns the markup as its result (and stores it in args).
    result = task(worker, "add").delay(SCRIPT, "")
    assert result.get(timeout=WAIT) == SCRIPT
    # A task *name* cannot be chosen through a worker: another writer stores one.
    named = f"named-{uuid.uuid4().hex[:8]}"
    value = Encoded(content_type="application/json", data=json.dumps(SCRIPT).encode())
    Ledger.open(db_url).append([TaskState(task_id=named, status="SUCCESS", name=SCRIPT, result=value)])
    live = chromium.open(f"{site}/live")
    wait_live(live)
    for path in (f"/tasks/{result.id}", f"/tasks/{named}", "/"):
        page = chromium.open(site + path)
        assert page.get_by_text("<script>document.title='pwned'</script>", exact=False).count() >= 1
        assert page.locator("main script, main img").count() == 0
        assert "pwned" not in page.title()
        page.close()
    live.wait_for_selector(f'#live-events a[href="/tasks/{named}"]', timeout=WAIT_MS)
    assert live.get_by_text(SCRIPT, exact=True).count() >= 1
    assert live.locator("#live-events script, #live-events img").count() == 0
    assert "pwned" not in live.title()
    shoot(live, "live-script-as-text")
    live.close()
    assert chromium.errors == []


def test_the_live_page_shows_bidi_overrides_and_escapes_as_the_cli_does(site, chromium, db_url):  # noqa: F811
    """The Live page's rows come from /api/events through its script: a name with a
    right-to-left override showed as "safeexe.txt", an ESC went into the page raw,
    where the server-rendered pages and the CLI show both as escapes."""
    live = chromium.open(f"{site}/live")
    wait_live(live)
    spoof = f"bidi-{uuid.uuid4().hex[:8]}"
    Ledger.open(db_url).append([TaskState(task_id=spoof, status="SUCCESS", name="safe\u202etxt.exe",
                                          worker="w\x1b[31m@h")])
    row = live.locator("#live-events tr", has=live.locator(f'a[href="/tasks/{spoof}"]'))
    row.wait_for(timeout=WAIT_MS)
    cells = row.locator("td").all_inner_texts()
    assert "safe\\u202etxt.exe" in cells and "w\\x1b[31m@h" in cells
    assert not any("\u202e" in c or "\x1b" in c for c in cells)
    shoot(live, "live-bidi-escaped")
    live.close()
    assert chromium.errors == []


def test_redacted_arguments_stay_redacted(site, chromium, worker):  # noqa: F811
    result = task(worker, "login").delay("ann", "realm-1", "s3cret-arg", password="hunter2-kw")
    assert result.get(timeout=WAIT) == "ann@realm-1 logged in"
    page = chromium.open(f"{site}/tasks/{result.id}")
    text = page.locator("main").inner_text()
    assert '["ann", "realm-1", "[redacted]"]' in text and '"password": "[redacted]"' in text
    api = page.request.get(f"{site}/api/tasks/{result.id}").text()
    for secret in ("s3cret-arg", "hunter2-kw"):
        assert secret not in text and secret not in api and secret not in page.content()
    shoot(page, "task-redacted")
    page.close()
    assert chromium.errors == []


def listed(page) -> list[str]:
    return page.eval_on_selector_all("#task-rows tr[data-task-id]", "rows => rows.map(r => r.dataset.taskId)")


def test_filtering_the_tasks_page(site, chromium, run_workflow):  # noqa: F811
    ledger, ids = run_workflow
    workflow = {ids["first"], *ids["members"], ids["plain"], ids["flaky"], ids["body"]}
    page = chromium.open(f"{site}/")
    page.fill("input[name=name]", "workerapp.fl*")
    page.click("#apply-filters")
    page.wait_for_url(re.compile(r"name=workerapp.fl"))
    assert ids["flaky"] in listed(page)
    names = page.eval_on_selector_all("#task-rows tr td:nth-child(2)", "cells => cells.map(c => c.textContent)")
    assert set(names) == {"workerapp.flaky"}

    page.fill("input[name=name]", "")
    page.select_option("select[name=state]", "FAILURE")
    page.click("#apply-filters")
    page.wait_for_url(re.compile(r"state=FAILURE"))
    assert listed(page) == [ids["body"]]
    api = page.request.get(f"{site}/api/tasks?state=FAILURE").json()
    assert [t["task_id"] for t in api["tasks"]] == [ids["body"]]
    assert api["tasks"][0]["exc_type"] == "ValueError"

    page.select_option("select[name=state]", "")
    page.fill("input[name=root]", ids["first"])
    page.click("#apply-filters")
    page.wait_for_url(re.compile(r"root="))
    assert set(listed(page)) == workflow

    page.fill("input[name=root]", "")
    page.fill("input[name=args]", "body failed")
    page.click("#apply-filters")
    page.wait_for_url(re.compile(r"args=body"))
    assert listed(page) == [ids["body"]]
    shoot(page, "tasks-filtered")

    page.goto(f"{site}/?since=not-a-time")
    assert "since: 'not-a-time' is not a time: use ISO 8601" in page.locator("p.error").inner_text()
    page.close()
    assert [e for e in chromium.errors if "400" not in e] == []
