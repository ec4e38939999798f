"""The worker app of the fault tests: ``tests.workerapp`` plus a few fault tasks.

The worker builds its app from the same environment as ``tests.workerapp.tasks``
(broker, backend, queue, key prefix) and, from ``LEDGER_FAULT_CONF`` (JSON),
the extra Celery settings a fault test needs (retries, ``acks_late``, ...).
"""

from __future__ import annotations

import json
import os
import time

import redis
from celery import Celery

from tests.workerapp.tasks import make_app as make_workerapp


def make_app(broker: str, backend: str, queue: str, prefix: str, conf: dict) -> Celery:
    app = make_workerapp(broker, backend, queue, prefix)
    transport = dict(app.conf.broker_transport_options, **conf.pop("broker_transport_options", {}))
    app.conf.update(conf, broker_transport_options=transport)
    register(app)
    return app


def register(app: Celery) -> None:
    prefix = app.conf.ledger_prefix

    @app.task(shared=False, name="faults.echo")
    def echo(value):
        return value

    @app.task(shared=False, name="faults.length")
    def length(value):
        return len(value)

    def down(n):
        if not n:
            raise ValueError("deep down")
        try:
            down(n - 1)
        except ValueError as exc:
            raise ValueError("deep down") from exc

    @app.task(shared=False, name="faults.deep")
    def deep(n):
        """Raises a chain of ``n`` exceptions: a traceback of ~300 characters each."""
        return down(n)

    @app.task(shared=False, name="faults.slow_part")
    def slow_part(n, seconds):
        time.sleep(seconds)
        return n

    @app.task(shared=False, name="faults.counted_body")
    def counted_body(numbers, key):
        """A chord body that counts its executions in Redis."""
        redis.Redis.from_url(app.conf.broker_url).incr(f"{prefix}{key}")
        return sum(numbers)


if "LEDGER_TEST_BACKEND" in os.environ:
    app = make_app(
        os.environ["LEDGER_TEST_BROKER"],
        os.environ["LEDGER_TEST_BACKEND"],
        os.environ["LEDGER_TEST_QUEUE"],
        os.environ["LEDGER_TEST_PREFIX"],
        json.loads(os.environ.get("LEDGER_FAULT_CONF", "{}")),
    )
