"""``celery-ledger demo``: a real in-process Celery worker on the ledger, then the history.

The app uses the in-memory broker and a worker running in a thread of this
process (``celery.contrib.testing.worker.start_worker``), with
``result_backend = "ledger+<--db>"``: tasks really go through a worker, the
backend and the log, nothing is eager. It runs a few tasks, a retry, a failure,
a group and a chord, then prints every event of each task with the
``history`` formatter of :mod:`ledger.audit`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from typing import TextIO

from celery import Celery, _state, chord, group
from celery.app import trace
from celery.contrib.testing.worker import start_worker
from celery.utils.nodenames import anon_nodename

from ledger.store.engine import safe_url

TIMEOUT = 30
#: How often get() re-reads on SQLite (PostgreSQL wakes on NOTIFY instead).
POLL = 0.02


def make_app(db_url: str) -> Celery:
    """The demo's Celery app: memory broker, the ledger as result backend."""
    backend = db_url if db_url.startswith("ledger+") else f"ledger+{db_url}"
    app = Celery("demo", broker="memory://", backend=backend, set_as_current=False)
    app.conf.update(
        ledger_auto_upgrade=True,
        result_extended=True,
        worker_hijack_root_logger=False,
        task_track_started=True,
        # The memory transport polls; its 1 s default would dominate the demo.
        broker_transport_options={"polling_interval": 0.01},
    )
    attempts: dict[str, int] = {}

    @app.task(name="demo.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="demo.total")
    def total(numbers: list[int]) -> int:
        return sum(numbers)

    @app.task(name="demo.flaky", bind=True, max_retries=3)
    def flaky(self, n: int) -> str:
        attempts[self.request.id] = attempts.get(self.request.id, 0) + 1
        if attempts[self.request.id] < 3:
            raise self.retry(exc=ConnectionError(f"upstream busy (attempt {self.request.retries + 1})"),
                             countdown=0)
        return f"ok after {self.request.retries} retries"

    @app.task(name="demo.slow")
    def slow(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    @app.task(name="demo.fail")
    def fail(reason: str) -> None:
        raise ValueError(reason)

    return app


@contextlib.contextmanager
def _worker(app: Celery) -> Iterator[None]:
    """Celery's test worker, in a thread, named as ``celery worker`` names itself.

    ``celery worker`` sets up Celery's fast tracer with its node name, which a
    task's request then carries (the WORKER of STARTED and SUCCESS). The test
    worker does not: its tasks go through ``trace_task_ret``, whose request
    names the machine (``vm``) while RECEIVED names the node (``gen123@vm``).
    The fast tracer is set up here as the command does, and the process's
    default and current app are put back after (the demo also runs in tests).
    """
    default, current = _state.default_app, _state._tls.current_app
    nodename = anon_nodename()
    trace.setup_worker_optimizations(app, nodename)
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, loglevel="CRITICAL", hostname=nodename):
            yield
    finally:
        trace.reset_worker_optimizations(app)
        _state.set_default_app(default)
        _state._set_current_app(current)


def run(db_url: str, out: TextIO = sys.stdout) -> int:
    """Run the demo against ``db_url``; print the histories; return the exit status."""
    from ledger.audit import format_history, task_history
    from ledger.timeline import find_workflow, render_text

    app = make_app(db_url)
    add, total, flaky, fail, slow = (
        app.tasks[f"demo.{n}"] for n in ("add", "total", "flaky", "fail", "slow")
    )
    # The worker's own ERROR log of the failing task would interleave with the tables.
    logging.getLogger("celery").setLevel(logging.CRITICAL)
    print(f"celery-ledger demo: in-process worker, results in ledger+{safe_url(db_url)}", file=out)
    sections: list[tuple[str, list[str]]] = []
    with _worker(app):
        r = add.delay(2, 3)
        print(f"  add(2, 3)            -> {r.get(timeout=TIMEOUT, interval=POLL)}", file=out)
        sections.append(("a task", [r.id]))

        r = flaky.delay(7)
        print(f"  flaky(7)             -> {r.get(timeout=TIMEOUT, interval=POLL)!r}", file=out)
        sections.append(("a task that retried twice", [r.id]))

        r = fail.delay("bad input")
        try:
            r.get(timeout=TIMEOUT, interval=POLL)
        except ValueError as exc:
            print(f"  fail('bad input')    -> raised {exc!r}", file=out)
        sections.append(("a failure", [r.id]))

        g = group(add.s(i, i) for i in range(3)).apply_async()
        print(f"  group of 3 adds      -> {g.get(timeout=TIMEOUT, interval=POLL)}", file=out)
        sections.append(("a group", [c.id for c in g.results]))

        c = chord((add.s(i, 10) for i in range(3)), total.s()).apply_async()
        print(f"  chord(3 adds, total) -> {c.get(timeout=TIMEOUT, interval=POLL)}", file=out)
        sections.append(("a chord: header parts, then the body", [*(p.id for p in c.parent.results), c.id]))

        # One worker process: the header's second and third part wait in the queue.
        busy = chord((slow.s(0.2) for _ in range(3)), total.s()).apply_async()
        print(f"  chord(3 slow, total) -> {busy.get(timeout=TIMEOUT, interval=POLL)}", file=out)

    ledger = app.backend.ledger
    for title, ids in sections:
        print(f"\n== {title}", file=out)
        for task_id in ids:
            print(format_history(task_id, task_history(ledger, task_id)), file=out)
    print("\n== a chord of slow tasks as a timeline: queue wait, then each run", file=out)
    print(render_text(find_workflow(ledger, busy.id)), file=out)
    print(f"\nEvery line above is an event in {ledger.url}; try "
          f"`celery-ledger history <task id> --db {safe_url(db_url)}`.", file=out)
    return 0
