"""The web console over HTTP: pages and API agree with the log, and it is safe by default.

In-process requests go through Starlette's test client; the event stream, the
bind check and the credentials are tested against a real server (uvicorn in a
thread, or the ``celery-ledger web`` process).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import pickle
import re
import socket
import subprocess
import threading
import time
from datetime import timedelta

import httpx
import pytest
import uvicorn
from starlette.testclient import TestClient

from ledger.api import Ledger
from ledger.cli import main
from ledger.events import Encoded, TaskForgotten, TaskSent, TaskState, utcnow
from ledger.output import terminal_safe
from ledger.web.app import create_app
from ledger.web.feed import EventFeed, Overflow
from ledger.web.security import Credentials, check_bind
from ledger.web.server import read_only
from tests.browser import CLI, server_for  # noqa: F401  (fixture)
from tests.kafka import free_port

WAIT = 30  # a hang guard, not a speed check


def as_json(value) -> Encoded:
    return Encoded(content_type="application/json", data=json.dumps(value).encode())


def store_retried_task(ledger: Ledger, task_id: str = "t-1") -> None:
    """STARTED, RETRY (ConnectionError), STARTED, SUCCESS, as a worker would store them."""
    common = dict(task_id=task_id, name="shop.charge", worker="w1@host", queue="payments",
                  args=as_json([42]), kwargs=as_json({"card": "[redacted]"}))
    ledger.append([TaskState(status="STARTED", retries=0, **common)])
    ledger.append([TaskState(status="RETRY", retries=0, exc_type="ConnectionError",
                             exc_message="gateway down", traceback="Traceback ...\nConnectionError",
                             **common)])
    ledger.append([TaskState(status="STARTED", retries=1, **common)])
    ledger.append([TaskState(status="SUCCESS", retries=1, result=as_json({"charged": True}), **common)])


@pytest.fixture
def client(ledger):
    with TestClient(create_app(ledger), base_url="http://127.0.0.1") as c:
        yield c


def test_task_api_and_page_show_every_event_and_the_state_as_of_one(ledger, client):
    store_retried_task(ledger)
    doc = client.get("/api/tasks/t-1").json()
    assert doc["state"] == "SUCCESS" and doc["name"] == "shop.charge"
    assert [e["state"] for e in doc["events"]] == ["STARTED", "RETRY", "STARTED", "SUCCESS"]
    retry = doc["events"][1]
    assert (retry["exc_type"], retry["exc_message"], retry["worker"], retry["queue"]) == (
        "ConnectionError", "gateway down", "w1@host", "payments")
    assert retry["traceback"].endswith("ConnectionError")
    assert doc["events"][3]["result"] == '{"charged": true}'
    assert doc["events"][0]["kwargs"] == '{"card": "[redacted]"}'
    at_retry = client.get(f"/api/tasks/t-1?as_of=@{retry['position']}").json()
    assert at_retry["state"] == "RETRY" and at_retry["as_of_position"] == retry["position"]
    before = client.get(f"/api/tasks/t-1?as_of=@{doc['events'][0]['position'] - 1}").json()
    assert before["state"] == "PENDING"
    at_time = client.get("/api/tasks/t-1", params={"as_of": retry["time"]}).json()
    assert at_time["state"] == "RETRY"

    page = client.get(f"/tasks/t-1?as_of=@{retry['position']}").text
    assert page.count('<tr class="later') == 2  # the two events after the as-of point
    assert "ConnectionError: gateway down" in page


def test_tombstones_and_prunes_are_noted(ledger, client, any_url, capsys):
    store_retried_task(ledger)
    ledger.append([TaskForgotten(task_id="t-1")])
    ledger.append([TaskState(task_id="t-2", status="STARTED")])
    doc = client.get("/api/tasks/t-1").json()
    assert doc["state"] == "FORGOTTEN" and doc["events"][-1]["state"] == "FORGOTTEN"
    assert "forgotten: the result was removed" in client.get("/tasks/t-1").text
    cutoff = utcnow() + timedelta(seconds=1)
    time.sleep(1.1)
    ledger.append([TaskState(task_id="t-2", status="SUCCESS")])
    assert main(["prune", "--before", cutoff.isoformat(), "--db", any_url]) == 0
    # t-2 keeps the event its projection row needs; its STARTED is gone, and shown so.
    events = client.get("/api/tasks/t-2").json()["events"]
    assert [(e["version"], e["state"], e["position"]) for e in events][0] == ("1", "PRUNED", None)
    assert events[1]["state"] == "SUCCESS" and "removed by celery-ledger prune" in client.get("/tasks/t-2").text
    capsys.readouterr()
    doc = client.get("/api/tasks/t-1").json()
    assert doc["events"] == [] and doc["pruned"][0]["before"] == cutoff.isoformat()
    assert f"Events recorded before {cutoff.isoformat()} were pruned" in client.get("/tasks/t-1").text


def test_bad_input_answers_one_line_naming_it(ledger, client):
    store_retried_task(ledger)
    r = client.get("/api/tasks/t-1?as_of=the-day-before")
    assert r.status_code == 400 and r.json()["error"].startswith("as_of: 'the-day-before' is not a time: use ISO 8601")
    r = client.get("/api/tasks/t-1?as_of=3")
    assert r.status_code == 400 and "write @3 for a log position" in r.json()["error"]
    r = client.get("/api/tasks/nope")
    assert r.status_code == 404 and r.json() == {"error": "no events for task 'nope' in this ledger"}
    r = client.get("/workflows/nope")
    assert r.status_code == 404 and "no task, group or chord &#39;nope&#39;" in r.text
    assert client.get("/api/events?backlog=lots").status_code == 400


def test_a_time_past_the_year_1_or_9999_in_utc_is_a_400_naming_it(ledger, client):
    """A valid local time whose offset takes it out of the years 1 to 9999 in UTC was
    an OverflowError where the database layer converts it to UTC: a 500."""
    store_retried_task(ledger)
    early, late = "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-12:00"
    for path, param, value in [
        ("/stats", "since", early), ("/", "since", early), ("/api/tasks", "until", late),
        ("/api/stats", "since", early), ("/tasks/t-1", "as_of", late), ("/api/tasks/t-1", "as_of", early),
    ]:
        r = client.get(path, params={param: value})
        assert r.status_code == 400, (path, r.text)
        if path.startswith("/api/"):
            assert r.json()["error"] == (
                f"{param}: {value!r} is outside the years 1 to 9999 in UTC: use ISO 8601 "
                "(2026-01-31T12:00:00Z, 2026-01-31), -30m, -1h, -2d, now, today, yesterday")
    # The Stats page's default period (24 h before ``until``) reached before the year 1.
    r = client.get("/api/stats", params={"until": "0001-01-01T01:00:00Z"})
    assert r.status_code == 200 and r.json()["since"] == "0001-01-01T00:00:00Z"


def test_a_nul_in_an_id_is_not_found_and_in_a_filter_matches_nothing(ledger, client):
    """PostgreSQL refuses a NUL in any text (psycopg's DataError: a 500); no task can
    have one there. On both databases: an id with a NUL is a 404, a filter with one
    lists no task."""
    store_retried_task(ledger)
    for path in ("/tasks/a%00b", "/workflows/a%00b", "/api/tasks/a%00b", "/api/workflows/a%00b",
                 "/tasks/a%00b?as_of=@1"):
        assert client.get(path).status_code == 404, path
    for param in ("name", "state", "worker", "queue", "exception", "root", "args"):
        r = client.get("/api/tasks", params={param: "a\x00b"})
        assert r.status_code == 200 and r.json()["tasks"] == [], (param, r.text)
        assert client.get("/", params={param: "a\x00b"}).status_code == 200, param
    # A page key is a place in the list, not a filter: on PostgreSQL a NUL in its task
    # id places it nowhere exactly (SQLite holds such ids, and pages by them).
    older = client.get("/api/tasks", params={"before": f"{utcnow().isoformat()}|a\x00b"})
    if ledger.could_hold("\x00"):
        assert older.status_code == 200 and [t["task_id"] for t in older.json()["tasks"]] == ["t-1"]
    else:
        assert older.status_code == 400 and older.json()["error"] == (
            "before: the task id 'a\\x00b' has a NUL character, which this database cannot hold")
    assert [t["task_id"] for t in client.get("/api/tasks", params={"name": "shop.charge"}).json()["tasks"]] == [
        "t-1"]


ODD_IDS = ["slash/id/../x", "../../stats", "100%", "what?as_of=@1", "a#b", "a b", "%2F", "./"]


def test_links_to_odd_ids_open_their_own_pages(ledger):
    """Ids in link paths kept ``/`` (Jinja's ``urlencode``): ``slash/id/../x`` linked
    to ``/tasks/slash/id/../x``, which a browser resolves to ``/tasks/slash/x``, and
    ``../../stats`` to the Stats page. Every link, resolved as a browser does, opens
    the page of the id it was made for. A real server: Starlette's test client
    decodes a path twice (``%252F`` reaches the app as ``/``), uvicorn once."""
    from html import unescape
    from urllib.parse import urljoin, urlsplit

    root = ODD_IDS[0]
    for task_id in ODD_IDS:
        ledger.append([TaskState(task_id=task_id, status="SUCCESS", name="odd", root_id=root)])
    running = Running(create_app(ledger))

    def get(path: str) -> httpx.Response:
        return httpx.get(running.base + path, timeout=WAIT)

    def links(page: str, prefix: str) -> set[str]:
        hrefs = re.findall(r'(?:href|action)="([^"]*)"', get(page).text)
        # A browser resolves dot segments (RFC 3986, 5.2.4) before it sends the path.
        return {urlsplit(urljoin(running.base + page, unescape(h))).path
                for h in hrefs if h.startswith(prefix)}

    try:
        tasks = links("/", "/tasks/")
        assert len(tasks) == len(ODD_IDS)
        shown = set()
        for path in tasks:
            r = get(path)
            assert r.status_code == 200, path
            [task_id] = re.findall(r"<h1>odd <code>(.*?)</code>", r.text)
            shown.add(unescape(task_id))
            # its "now" link and both as-of forms, its JSON, its workflow
            assert path in links(path, "/tasks/"), path
            assert get(path.replace("/tasks/", "/api/tasks/", 1)).json()["task_id"] == unescape(task_id)
            assert len(links(path, "/workflows/")) == 1
        assert shown == set(ODD_IDS)
        [workflow] = links("/", "/workflows/")
        assert get(workflow.replace("/workflows/", "/api/workflows/", 1)).json()["root_id"] == root
        assert links(workflow, "/tasks/") == tasks
    finally:
        running.stop()


def store_catalogue(ledger: Ledger) -> list[str]:
    """Seven tasks, oldest first: names, workers, a failure and a retry to filter on."""
    ids = []
    for i in range(7):
        common = dict(task_id=f"c-{i}", name="shop.charge" if i % 2 == 0 else "mail.send",
                      worker=f"w{i % 2 + 1}@host", queue="q", args=as_json([i * 11]))
        ledger.append([TaskState(status="STARTED", **common)])
        if i == 5:  # Celery counts the attempt in ``retries`` from the retry on
            ledger.append([TaskState(status="RETRY", exc_type="ConnectionError", **common)])
            common["retries"] = 1
            ledger.append([TaskState(status="STARTED", **common)])
        if i == 3:
            ledger.append([TaskState(status="FAILURE", exc_type="ValueError", exc_message="no", **common)])
        else:
            ledger.append([TaskState(status="SUCCESS", result=as_json(i), **common)])
        ids.append(f"c-{i}")
    return ids


def test_tasks_api_filters_newest_first_and_pages(ledger, client):
    ids = store_catalogue(ledger)

    def listed(query: str) -> list[str]:
        r = client.get("/api/tasks" + query)
        assert r.status_code == 200, r.text
        return [t["task_id"] for t in r.json()["tasks"]]

    assert listed("") == ids[::-1]
    assert listed("?name=shop.*") == ["c-6", "c-4", "c-2", "c-0"]
    assert listed("?name=mail.send&worker=w2@host") == ["c-5", "c-3", "c-1"]
    assert listed("?state=FAILURE") == ["c-3"] == listed("?exception=ValueError")
    assert listed("?args=55") == ["c-5"]
    assert listed("?root=c-2") == ["c-2"]
    assert listed("?name=shop.charge&state=FAILURE") == []
    r = client.get("/api/tasks?limit=0")
    assert r.status_code == 400 and r.json()["error"].startswith("limit: ")
    assert client.get("/api/tasks?colour=red").json() == {"error": "unknown parameter 'colour'"}
    r = client.get("/api/tasks?before=yesterday")
    assert r.status_code == 400 and r.json()["error"].startswith("before: not a page key")
    html = client.get("/?name=shop.*&limit=2").text
    assert html.count("<tr data-task-id=") == 2 and 'href="/?name=shop.%2A&amp;before=' in html


def test_tasks_pages_by_key_through_the_whole_list_both_ways(ledger, client):
    """Keyset paging: older pages from the last row's (first seen, id), newer ones from
    the first row's; ties in first-seen time (one transaction) are ordered by id."""
    ids = store_catalogue(ledger)
    ledger.append([TaskState(task_id=f"tie-{i}", status="SUCCESS", name="tie") for i in range(3)])
    expected = [f"tie-{i}" for i in (2, 1, 0)] + ids[::-1]
    pages, page = [], client.get("/api/tasks?limit=3").json()
    assert page["newer"] is None
    while True:
        pages.append([t["task_id"] for t in page["tasks"]])
        if page["older"] is None:
            break
        page = client.get("/api/tasks", params={"limit": 3, "before": page["older"]}).json()
    assert pages == [expected[i:i + 3] for i in range(0, len(expected), 3)]
    back = []
    while page["newer"] is not None:
        page = client.get("/api/tasks", params={"limit": 3, "after": page["newer"]}).json()
        back.append([t["task_id"] for t in page["tasks"]])
    assert back == pages[-2::-1]


def test_stats_api_counts_rates_and_runtimes_by_name(ledger, client):
    store_catalogue(ledger)
    rows = {r["name"]: r for r in client.get("/api/stats").json()["rows"]}
    assert rows["shop.charge"]["total"] == 4 and rows["shop.charge"]["states"] == {"SUCCESS": 4}
    mail = rows["mail.send"]
    assert mail["total"] == 3 and mail["states"] == {"SUCCESS": 2, "FAILURE": 1}
    assert mail["failure_rate"] == pytest.approx(1 / 3) and mail["retry_rate"] == pytest.approx(1 / 3)
    assert 0 <= mail["runtime_p50"] <= mail["runtime_p99"] <= mail["runtime_max"]
    later = utcnow() + timedelta(hours=1)
    window = {"since": later.isoformat(), "until": (later + timedelta(hours=1)).isoformat()}
    assert client.get("/api/stats", params=window).json()["rows"] == []
    backwards = client.get("/api/stats", params={"since": later.isoformat(), "until": utcnow().isoformat()})
    assert backwards.status_code == 400 and backwards.json()["error"].startswith("since (")
    # a relative time before the year 1 was an OverflowError: a 500 and a traceback
    for path in ("/api/stats", "/api/tasks"):
        ancient = client.get(path, params={"since": "-99999999999999999999d"})
        assert ancient.status_code == 400, ancient.text
        assert ancient.json()["error"] == (
            "since: '-99999999999999999999d' is before the year 1: use ISO 8601 (2026-01-31T12:00:00Z,"
            " 2026-01-31), -30m, -1h, -2d, now, today, yesterday")
    assert client.get("/stats", params={"since": "-9999999d"}).status_code == 400
    workers = {r["name"]: r["total"] for r in client.get("/api/stats?by=worker").json()["rows"]}
    assert workers == {"w1@host": 4, "w2@host": 3}
    assert "mail.send" in client.get("/stats").text


def test_stats_api_gives_queue_wait_and_tasks_api_lists_lost_tasks(ledger, client):
    """Queue wait: from SENT (or its ETA, if later) to STARTED; a task only sent is
    listed by ``state=SENT`` with its times, and Celery has no state for it."""
    t0 = utcnow() - timedelta(minutes=20)
    waits = []
    for i, eta in enumerate([None, None, t0 + timedelta(minutes=5)]):
        ledger.append([TaskSent(task_id=f"q-{i}", name="shop.queue", sent_at=t0 + timedelta(minutes=i),
                                queue="q", eta=eta)])
        ledger.append([TaskState(task_id=f"q-{i}", status="STARTED", name="shop.queue", worker="w1@host")])
        started = ledger.history(f"q-{i}")[-1].recorded_at
        waits.append((started - max(t0 + timedelta(minutes=i), eta or t0)).total_seconds())
    ledger.append([TaskSent(task_id="lost", name="shop.queue", sent_at=t0, queue="nobody")])
    (row,) = [r for r in client.get("/api/stats").json()["rows"] if r["name"] == "shop.queue"]
    assert row["total"] == 4 and row["states"] == {"STARTED": 3, "SENT": 1}
    low, mid, high = sorted(waits)
    assert row["queue_wait_p50"] == pytest.approx(mid, abs=2e-6)
    assert row["queue_wait_p99"] == pytest.approx(mid + 0.98 * (high - mid), abs=2e-6)
    assert row["queue_wait_max"] == pytest.approx(high, abs=2e-6)
    (lost,) = client.get("/api/tasks?state=SENT").json()["tasks"]
    assert (lost["task_id"], lost["queue"], lost["received_at"], lost["queue_wait_s"]) == (
        "lost", "nobody", None, None)
    assert "shop.queue" in client.get("/stats").text
    assert ledger.task_meta("lost") is None  # PENDING for Celery


class Boom:
    """Unpickling this would create ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_stored_pickles_are_never_unpickled(ledger, client, tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(Boom(str(marker)))
    pickled = Encoded(content_type="application/x-python-serialize", content_encoding="binary",
                      data=payload)
    ledger.append([TaskState(task_id="p-1", status="SUCCESS", result=pickled, args=pickled)])
    doc = client.get("/api/tasks/p-1").json()
    assert doc["events"][0]["result"] == f"<pickle {len(payload)} bytes>"
    assert f"&lt;pickle {len(payload)} bytes&gt;" in client.get("/tasks/p-1").text
    assert not marker.exists()


def test_a_lone_surrogate_in_a_result_or_argument_is_shown_escaped_not_a_500(ledger, client):
    # json.loads('"a\\ud800b"') is a str no UTF-8 response can hold; one such task among
    # the newest made the Tasks page a 500 for everyone.
    ledger.append([TaskState(task_id="s-1", status="SUCCESS", name="s.task",
                             result=as_json("a\ud800b"), args=as_json(["\ud800"]))])
    assert client.get("/workflows/s-1").status_code == client.get("/api/workflows/s-1").status_code == 200
    for path in ("/", "/partials/tasks", "/tasks/s-1"):
        r = client.get(path)
        assert r.status_code == 200, path
        assert "\\ud800" in r.text, path
    assert "&#34;a\\ud800b&#34;" in client.get("/tasks/s-1").text
    for path in ("/api/tasks", "/api/tasks/s-1"):
        r = client.get(path)
        assert r.status_code == 200, path
        assert "\\ud800" in r.text, path  # JSON's own escape: valid JSON, UTF-8 holds it
    event = client.get("/api/tasks/s-1").json()["events"][0]  # the values as stored
    assert (json.loads(event["result"]), json.loads(event["args"])) == ("a\ud800b", ["\ud800"])
    assert client.get("/api/tasks").json()["tasks"][0]["args"] == '["\ud800"]'


def test_pages_show_control_characters_and_bidi_overrides_escaped_as_the_cli_does(ledger, client):
    hostile = dict(task_id="id\u202eexe", name="safe\u202etxt.exe", worker="w\x1b]0;T\x07",
                   queue="q\x1b[2J", root_id="id\u202eexe")
    ledger.append([TaskState(status="CUSTOM\u202e", **hostile)])
    ledger.append([TaskState(status="FAILURE", exc_type="Value\u2066Error",
                             exc_message="bad\x1b[31m", traceback="Traceback\n\x9b31m",
                             result=as_json({"exc_type": "ValueError"}), **hostile)])
    shown = [terminal_safe(v) for v in ("safe\u202etxt.exe", "w\x1b]0;T\x07", "q\x1b[2J",
                                        "id\u202eexe", "Value\u2066Error", "bad\x1b[31m")]
    assert shown[0] == "safe\\u202etxt.exe" and shown[1] == "w\\x1b]0;T\\x07"  # the CLI's forms
    quoted = "id%E2%80%AEexe"
    for path in ("/", f"/tasks/{quoted}", f"/workflows/{quoted}", f"/tasks/{quoted}?as_of=@1"):
        page = client.get(path)
        assert page.status_code == 200, path
        assert not any(c in page.text for c in "\u202e\u2066\x1b\x07\x9b"), path
        for text in shown[:4] if path == "/" else shown[:2] if "workflows" in path else shown:
            assert text in page.text, (path, text)
    task_page = client.get(f"/tasks/{quoted}").text
    assert "CUSTOM\\u202e" in task_page and "Traceback\n\\x9b31m" in task_page
    assert f'action="/tasks/{quoted}"' in task_page  # links keep the id itself
    assert f'href="/tasks/{quoted}"' in client.get("/").text
    event = client.get(f"/api/tasks/{quoted}").json()["events"][-1]  # the API: values as stored
    assert (event["name"], event["worker"], event["exc_message"]) == (
        "safe\u202etxt.exe", "w\x1b]0;T\x07", "bad\x1b[31m")


def all_paths(ledger: Ledger) -> list[str]:
    store_retried_task(ledger)
    return ["/", "/live", "/stats", "/tasks/t-1", "/tasks/t-1?as_of=@2", "/workflows/t-1",
            "/api/tasks", "/api/tasks/t-1", "/api/workflows/t-1", "/api/stats", "/tasks/missing"]


def test_every_response_has_a_csp_and_pages_run_no_inline_script(ledger, client):
    for path in all_paths(ledger):
        r = client.get(path)
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp, path
        assert r.headers["x-content-type-options"] == "nosniff"
        if r.headers["content-type"].startswith("text/html"):
            scripts = re.findall(r"<script\b[^>]*>", r.text)
            assert scripts == ['<script src="/static/console.js" defer>'], (path, scripts)
            assert not re.search(r"\son[a-z]+\s*=|\sstyle\s*=", r.text), path
    js = client.get("/static/console.js")
    assert js.status_code == 200 and "innerHTML" not in js.text.replace("tmp.innerHTML = html", "")


def test_no_endpoint_writes(ledger, client):
    paths = all_paths(ledger)
    head = ledger.follower_lag()["head_position"]
    for path in paths:
        client.get(path)
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            assert client.request(method, path).status_code in (404, 405), (method, path)
    assert ledger.follower_lag()["head_position"] == head


def test_the_servers_connections_cannot_write(any_url):
    ledger = Ledger.open(any_url)
    ledger.engine.dispose()
    read_only(ledger)
    with pytest.raises(Exception, match="(?i)read-only|readonly"):
        ledger.append([TaskState(task_id="w-1", status="STARTED")])
    assert ledger.history("w-1") == []


# -- who may connect ---------------------------------------------------------------------


def test_a_public_address_is_refused_without_auth(sqlite_url, capsys):
    # A process with a deadline: were it to listen, it would not return by itself.
    done = subprocess.run([CLI, "web", "--db", sqlite_url, "--host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(
        "celery-ledger: refusing to listen on 0.0.0.0 (not a loopback address) without --auth")
    assert done.stderr.count("\n") == 1
    check_bind("0.0.0.0", Credentials.parse("token:s3cret"))  # allowed with credentials
    check_bind("localhost", None)
    assert main(["web", "--db", sqlite_url, "--auth", "nocolon"]) == 2
    assert "--auth must be USER:PASSWORD or token:SECRET" in capsys.readouterr().err


def test_an_older_schema_is_refused_at_startup_in_one_line(any_url):
    """The console started on a database at an older revision, then answered every
    page with a 500 (SchemaMissing tracebacks); the CLI's commands say what to run."""
    from ledger import migrate

    migrate.downgrade(Ledger.open(any_url).engine, "0003_catalogue")
    # A process with a deadline: were it to listen, it would not return by itself.
    done = subprocess.run([CLI, "web", "--db", any_url, "--port", str(free_port())],
                          capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 1 and done.stdout == "", done.stderr
    assert done.stderr.count("\n") == 1 and "has ledger schema 0003_catalogue" in done.stderr
    assert done.stderr.rstrip().endswith(f"run `celery-ledger db upgrade --db {Ledger.open(any_url).url}`")


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_credentials_are_required_when_set(sqlite_url, server_for):  # noqa: F811
    token = server_for(sqlite_url, "--auth", "token:s3cret").base
    for headers, status in [
        ({}, 401), ({"Authorization": "Bearer wrong"}, 401), ({"Authorization": "Bearer s3cret"}, 200),
        (basic("anyone", "s3cret"), 200), (basic("anyone", "s3cre"), 401),
        ({"Authorization": "Basic !!notbase64"}, 401),
    ]:
        r = httpx.get(token + "/live", headers=headers, timeout=WAIT)
        assert r.status_code == status, headers
    assert httpx.get(token + "/live", timeout=WAIT).headers["www-authenticate"].startswith("Basic")
    user = server_for(sqlite_url, "--auth", "ops:pa:ss").base
    assert httpx.get(user + "/api/stats", headers=basic("ops", "pa:ss"), timeout=WAIT).status_code != 401
    assert httpx.get(user + "/api/stats", headers=basic("dev", "pa:ss"), timeout=WAIT).status_code == 401
    assert httpx.get(user + "/api/stats", headers={"Authorization": "Bearer pa:ss"},
                     timeout=WAIT).status_code == 401


def test_without_auth_only_localhost_names_are_answered(ledger):
    # A web page whose own host name resolves to 127.0.0.1 (DNS rebinding) sends its name.
    with TestClient(create_app(ledger), base_url="http://evil.example") as c:
        r = c.get("/live")
        assert r.status_code == 403 and "only to localhost" in r.text
    for host in ("localhost:5580", "127.0.0.1", "[::1]:5580"):
        with TestClient(create_app(ledger), base_url=f"http://{host}") as c:
            assert c.get("/live").status_code == 200, host
    # Host names are case-insensitive (LOCALHOST was a 403); a loopback address is no
    # one's domain; the name the console was told to listen on (found loopback) is its own.
    # (The header as sent: httpx would write a base URL's host in lower case.)
    for host, bound in (("LOCALHOST:5580", None), ("127.0.0.2:5580", "127.0.0.2"), ("127.9.9.9", None),
                        ("[0:0:0:0:0:0:0:1]", None), ("Ledger.Internal:80", "ledger.internal")):
        with TestClient(create_app(ledger, host=bound), base_url="http://127.0.0.1") as c:
            assert c.get("/live", headers={"host": host}).status_code == 200, host
    for host in ("evil.example", "127.0.0.1.evil.example", "LOCALHOST.evil.example", "10.0.0.1"):
        with TestClient(create_app(ledger, host="127.0.0.2"), base_url="http://127.0.0.1") as c:
            assert c.get("/live", headers={"host": host}).status_code == 403, host


def test_the_console_answers_on_the_loopback_address_it_listens_on(sqlite_url):
    """``web --host 127.0.0.2`` printed its address, then answered every request
    there with 403 "answers only to localhost"."""
    port = free_port()
    proc = subprocess.Popen([CLI, "web", "--db", sqlite_url, "--host", "127.0.0.2", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout.readline().startswith(f"celery-ledger web: http://127.0.0.2:{port}/ on ")
        deadline = time.monotonic() + WAIT  # a hang guard: the banner comes before the bind
        while True:
            try:
                r = httpx.get(f"http://127.0.0.2:{port}/api/stats", timeout=WAIT)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert r.status_code == 200, r.text
    finally:
        proc.terminate()
        proc.wait(WAIT)


@pytest.mark.postgres
def test_the_database_password_is_never_rendered(pg_url, server_for):  # noqa: F811
    # The test server trusts local connections, so any password gets in.
    secret = "pw-never-shown-7731"
    url = pg_url.replace("postgres@", f"postgres:{secret}@", 1)
    store_retried_task(Ledger.open(pg_url))
    server = server_for(url)
    bodies = [httpx.get(server.base + p, timeout=WAIT).text for p in all_paths(Ledger.open(pg_url))]
    assert all("postgres:***@" in b for b in bodies if "<header>" in b)
    assert not any(secret in b for b in bodies)
    assert secret not in server.output() and "postgres:***@" in server.output()


# -- the event stream --------------------------------------------------------------------


class Running:
    """The app under uvicorn in a thread (a real socket) for the stream tests."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                   log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + WAIT
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(WAIT)


def read_events(response, n: int) -> list[dict]:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            out.append(json.loads(line[6:]))
            if len(out) == n:
                return out
    return out


def test_the_event_stream_sends_one_json_line_per_appended_event(ledger):
    running = Running(create_app(ledger))
    try:
        with httpx.stream("GET", running.base + "/api/events", timeout=WAIT) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            store_retried_task(ledger, "s-1")
            ledger.append([TaskForgotten(task_id="s-1")])
            events = read_events(r, 5)
    finally:
        running.stop()
    history = ledger.history("s-1")
    assert [(e["task_id"], e["type"], e["state"], e["position"]) for e in events] == [
        ("s-1", h.type, s, h.position)
        for h, s in zip(history, ["STARTED", "RETRY", "STARTED", "SUCCESS", "FORGOTTEN"], strict=True)
    ]
    assert events[0]["name"] == "shop.charge" and events[0]["worker"] == "w1@host"


def test_a_client_that_cannot_keep_up_is_cut_off_alone():
    """Bounded per-client queues: the slow client overflows, the one that reads gets all."""

    async def scenario() -> tuple[list, list]:
        feed = EventFeed(None, lambda e: e, client_queue=3)  # type: ignore[arg-type]
        feed._loop = asyncio.get_running_loop()
        with feed.subscribe() as slow, feed.subscribe() as fast:
            got = []
            for i in range(10):
                feed._hand_over(f"event {i}")
                got.extend(await fast.next_batch())
            stuck = [slow.queue.get_nowait() for _ in range(slow.queue.qsize())]
            return got, stuck

    got, stuck = asyncio.run(scenario())
    assert got == [f"event {i}" for i in range(10)]
    assert len(stuck) == 1 and isinstance(stuck[0], Overflow) and stuck[0].dropped == 4


def test_events_handed_over_together_reach_every_client_as_one_chunk_counted_per_event():
    """The loop is woken once for a burst; the burst counts its events against each client's bound."""

    async def scenario() -> tuple[list, list]:
        feed = EventFeed(None, lambda e: e, client_queue=3)  # type: ignore[arg-type]
        feed._loop = asyncio.get_running_loop()
        with feed.subscribe() as small, contextlib.ExitStack() as stack:
            feed.client_queue = 10
            big = stack.enter_context(feed.subscribe())
            for i in range(5):  # the follower's burst, before the loop runs
                feed._hand_over(f"e{i};")
            got = await big.next_batch()
            return got, [small.queue.get_nowait() for _ in range(small.queue.qsize())]

    got, small = asyncio.run(scenario())
    assert got == ["e0;e1;e2;e3;e4;"]
    assert len(small) == 1 and isinstance(small[0], Overflow) and small[0].dropped == 5


def sse_socket(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    sock.settimeout(WAIT)
    return sock


def read_until(sock: socket.socket, done) -> bytes:
    """Bytes from ``sock`` until ``done(chunks)`` (cheap to check: the list of chunks)."""
    chunks: list[bytes] = []
    while not done(chunks):
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def data_lines(n: int):
    """``done`` for :func:`read_until`: ``n`` SSE messages received (counted once per chunk)."""
    seen = [0, 0]  # chunks counted, messages in them

    def done(chunks: list[bytes]) -> bool:
        for chunk in chunks[seen[0]:]:
            seen[1] += chunk.count(b"\n\n")
        seen[0] = len(chunks)
        return seen[1] >= n + 1  # and the ": connected" comment
    return done


@pytest.mark.postgres
def test_a_client_that_never_reads_does_not_hold_up_writers_or_other_clients(pg_url):
    ledger = Ledger.open(pg_url)
    running = Running(create_app(ledger, client_queue=2500))
    slow = sse_socket(running.port, rcvbuf=4096)
    fast = sse_socket(running.port)
    n = 20_000
    try:
        read_until(fast, lambda got: got)
        read_until(slow, lambda got: got)
        appended = [TaskState(task_id=f"x-{i}", status="SUCCESS", name="n" * 200) for i in range(n)]
        writer = threading.Thread(target=ledger.append, args=(appended,))
        writer.start()
        # Raw bytes, counted: the reader keeps up without parsing as it goes.
        got = b": connected\n\n" + read_until(fast, data_lines(n))
        writer.join(WAIT)
        lines = [json.loads(line[6:]) for line in got.split(b"\n") if line.startswith(b"data: ")]
        ids = [d["task_id"] for d in lines]
        assert ids == [f"x-{i}" for i in range(n)]
        assert b"event: overflow" not in got
        # The slow client, reading at last, finds its stream ended with an overflow.
        rest = read_until(slow, lambda got: bool(got) and got[-1].endswith(b"0\r\n\r\n"))
        assert b"event: overflow" in rest and rest.count(b"\ndata: ") < n
    finally:
        slow.close()
        fast.close()
        running.stop()
