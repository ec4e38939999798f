"""Tasks run by a real ``celery worker`` process in tests/test_celery_worker.py.

The worker process builds its app from environment variables (set by the test
fixture); the test process builds the same app with :func:`make_app`.

* ``LEDGER_TEST_BROKER`` — Redis broker URL (a database number of the tests' own)
* ``LEDGER_TEST_BACKEND`` — ``ledger+sqlite:///...`` or ``ledger+postgresql+psycopg://...``
* ``LEDGER_TEST_QUEUE`` — the queue this run's worker consumes (unique per run)
* ``LEDGER_TEST_PREFIX`` — Redis key prefix of this run (broker keys and test counters)
* ``LEDGER_TEST_RESULT_EXTENDED`` — ``0`` for Celery's default ``result_extended = False``
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

REDACT_KWARGS = ["password", "token", "card"]
REDACT_ARGS = [2]


def make_app(broker: str, backend: str, queue: str, prefix: str, extended: bool = True) -> Celery:
    app = Celery("workerapp", broker=broker, backend=backend, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        broker_transport_options={"global_keyprefix": prefix},
        result_extended=extended,
        task_track_started=True,
        ledger_redact_kwargs=REDACT_KWARGS,
        ledger_redact_args=REDACT_ARGS,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        ledger_prefix=prefix,
    )
    register(app)
    return app


def _redis(app: Celery) -> redis.Redis:
    return redis.Redis.from_url(app.conf.broker_url)


def register(app: Celery) -> None:
    """Define the test tasks on ``app`` (names are fixed: client and worker agree)."""
    prefix = app.conf.ledger_prefix

    @app.task(shared=False, name="workerapp.ping")
    def ping() -> str:
        return "pong"

    @app.task(shared=False, name="workerapp.add")
    def add(x, y):
        return x + y

    @app.task(shared=False, name="workerapp.untracked", track_started=False)
    def untracked(x):
        """Stores no STARTED state: Celery's default (task_track_started=False)."""
        return x

    @app.task(shared=False, name="workerapp.tsum")
    def tsum(numbers):
        return sum(numbers)

    @app.task(shared=False, name="workerapp.fail")
    def fail(message):
        raise ValueError(message)

    @app.task(shared=False, name="workerapp.sleep")
    def sleep(seconds):
        time.sleep(seconds)
        return seconds

    @app.task(shared=False, name="workerapp.flaky", bind=True, max_retries=5)
    def flaky(self, key, succeed_on):
        attempt = _redis(app).incr(f"{prefix}{key}")
        if attempt < succeed_on:
            raise self.retry(exc=ConnectionError(f"attempt {attempt}"), countdown=0)
        return f"ok on attempt {attempt}"

    @app.task(shared=False, name="workerapp.progress", bind=True)
    def progress(self, gate):
        """Shows a custom state until the test opens ``gate``."""
        self.update_state(state="PROGRESS", meta={"done": 1, "total": 2})
        r = _redis(app)
        while not r.get(f"{prefix}{gate}"):
            time.sleep(0.05)
        return "finished"

    @app.task(shared=False, name="workerapp.steps", bind=True)
    def steps(self, n):
        """``n`` custom states one right after another (each overwrites the last)."""
        for i in range(n):
            self.update_state(state="STEP", meta={"i": i})
        return n

    @app.task(shared=False, name="workerapp.login")
    def login(user, realm, secret, password=None, token=None):
        return f"{user}@{realm} logged in"

    @app.task(shared=False, name="workerapp.charge")
    def charge(amount, card, details=None):
        """``card`` is redacted by name (ledger_redact_kwargs), however it is passed."""
        return f"charged {amount}"

    @app.task(shared=False, name="workerapp.record_error")
    def record_error(request, exc, traceback):
        _redis(app).rpush(f"{prefix}errors", f"{request.id} {type(exc).__name__}: {exc}")

    @app.task(shared=False, name="workerapp.fail_after")
    def fail_after(seconds, message):
        """Fails once the caller is surely waiting (a part failing before get() began
        would not test what get() does while it waits)."""
        time.sleep(seconds)
        raise ValueError(message)

    @app.task(shared=False, name="workerapp.mark")
    def mark(key, value):
        """Appends ``value`` to the Redis list ``key``: the test sees each run of it."""
        _redis(app).rpush(f"{prefix}{key}", value)
        return value

    @app.task(shared=False, name="workerapp.grow", bind=True)
    def grow(self, n):
        """Adds a task to the chord it belongs to (``Task.add_to_chord``)."""
        self.add_to_chord(app.signature("workerapp.add", (n, 100)))
        return n


if "LEDGER_TEST_BACKEND" in os.environ:
    app = make_app(
        os.environ["LEDGER_TEST_BROKER"],
        os.environ["LEDGER_TEST_BACKEND"],
        os.environ["LEDGER_TEST_QUEUE"],
        os.environ["LEDGER_TEST_PREFIX"],
        extended=os.environ.get("LEDGER_TEST_RESULT_EXTENDED", "1") == "1",
    )
