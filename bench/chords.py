"""Chord completion latency: from the last header part's return to the body being sent.

The parent applies a real ``chord(header, body)`` through Celery's canvas, so
the backend sees ``set_chord_size``/``apply_chord`` and the Redis broker
receives the header messages, exactly as from a client. Four forked children
then play prefork worker children: each takes header messages from the broker,
builds the request a worker would (id, group, group_index, chord body) and
calls ``mark_as_done`` -- which stores the result and calls
``on_chord_part_return``. A child that publishes the body records the time in
Celery's ``after_task_publish`` signal; the body queue on the broker must then
hold exactly one message.
"""

from __future__ import annotations

import base64
import json
import time

import redis
from celery import Celery, chord, signals
from celery.app.task import Context

from bench.backend_ops import HOSTNAME
from bench.processes import Slice, run_forked
from bench.stats import Run

WORKERS = 4


def _requests(client: redis.Redis, queue: str) -> list[Context]:
    """Turn the header messages on the broker into worker requests (kombu's Redis layout)."""
    requests = []
    while (raw := client.rpop(queue)) is not None:
        message = json.loads(raw)
        headers = message["headers"]
        args, kwargs, embed = json.loads(base64.b64decode(message["body"]))
        requests.append(
            Context(
                headers,
                args=args,
                kwargs=kwargs,
                hostname=HOSTNAME,
                delivery_info={"exchange": "", "routing_key": queue, "priority": 0, "redelivered": False},
                chord=embed.get("chord"),
                callbacks=embed.get("callbacks"),
                errbacks=embed.get("errbacks"),
                chain=embed.get("chain"),
                ignore_result=False,
            )
        )
    return requests


def measure_chord(setup_app: Celery, worker_app: Celery, size: int, prefix: str) -> Run:
    """Run one chord of ``size`` parts; latency in seconds, ok only if the body fired once."""
    header_q, body_q, warm_q = f"{prefix}.header", f"{prefix}.body", f"{prefix}.warm-up"
    client = redis.Redis.from_url(setup_app.conf.broker_url)
    try:
        header = [setup_app.signature("bench.part", (i,), queue=header_q) for i in range(size)]
        body = setup_app.signature("bench.body", queue=body_q)
        chord(header, app=setup_app)(body)
        requests = _requests(client, header_q)
        if len(requests) != size:
            return Run(0, 0, ok=False, note=f"broker held {len(requests)} of {size} header messages")
        backend = worker_app.backend

        def job(child: int, _deadline: float) -> Slice:
            sent: list[float] = []

            def on_publish(sender=None, **_kw):
                if sender == "bench.body":
                    sent.append(time.monotonic())

            signals.after_task_publish.connect(on_publish, weak=False)
            # A worker child's broker connection is up before its tasks run: open
            # the pooled one now so the body's publish is not timed as a connect.
            conn = worker_app.pool.acquire(block=True)
            conn.ensure_connection()
            conn.release()
            # Likewise its result backend connection (for every contender): a
            # fresh child's first store also opens one, ~15-25 ms on PostgreSQL,
            # which a chord of 10 parts timed as the chord's latency.
            backend.get_task_meta(f"{prefix}-warm-up")
            # And its publishing path: a worker child builds the app's task registry,
            # router and queues, and the ledger its task.sent statement, on its first
            # publish, then keeps them for every task it runs (~5-10 ms in a fresh
            # fork, on every contender alike). One publish to a queue of its own
            # (purged below) leaves the child as it is after its first chord.
            worker_app.signature("bench.warm_up", queue=warm_q).delay()
            s = Slice(started=time.monotonic(), extra={"sent": sent, "returns": []})
            for req in requests[child::WORKERS]:
                s.extra["returns"].append(time.monotonic())
                backend.mark_as_done(req.id, req.args[0], request=req)
                s.ops += 1
            s.ended = time.monotonic()
            return s

        slices = run_forked(job, WORKERS, 0)
        sent = [t for s in slices for t in s.extra["sent"]]
        last_return = max(t for s in slices for t in s.extra["returns"])
        # Give a late duplicate a moment to show up on the broker before counting.
        time.sleep(0.05)
        on_broker = client.llen(body_q)
        fired_once = len(sent) == 1 and on_broker == 1
        latency = (min(sent) - last_return) if sent else None
        note = "" if fired_once else f"body published {len(sent)}x, {on_broker} on broker"
        return Run(
            ops=1 if fired_once else 0,
            seconds=latency or 0.0,
            latencies=[latency] if latency is not None else [],
            ok=fired_once,
            note=note,
        )
    finally:
        client.delete(header_q, body_q, warm_q)
        client.close()
