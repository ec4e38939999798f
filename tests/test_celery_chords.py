"""Native chords under redelivery: parts returned twice, from two processes, fire the body once.

The body is published to a queue no worker consumes, so the Redis list of that
queue holds exactly the bodies that were sent: no waiting, no timing.
"""

from __future__ import annotations

import base64
import json
import multiprocessing
import random
import uuid

import pytest
import redis
from celery import Celery, states
from celery.app.task import Context

from tests.conftest import RUN_ID

REDIS = "redis://127.0.0.1:6379/11"
CHORDS = 20
PARTS = 5


def make_app(url: str, prefix: str) -> Celery:
    app = Celery("chords", broker=REDIS, backend=f"ledger+{url}", set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": prefix}
    return app


def return_every_part(url: str, prefix: str, chords: list, start, seed: int) -> None:
    """One 'worker': returns every part of every chord, in its own random order."""
    backend = make_app(url, prefix).backend
    rng = random.Random(seed)
    start.wait()
    for gid, part_ids, body in chords:
        order = list(enumerate(part_ids))
        rng.shuffle(order)
        for index, tid in order:
            req = Context(id=tid, group=gid, group_index=index, chord=body)
            backend.on_chord_part_return(req, states.SUCCESS, index)


def test_redelivered_parts_from_two_processes_fire_the_body_once(any_url):
    prefix = f"chords-{RUN_ID}-{uuid.uuid4().hex[:6]}:"
    queue = "bodies-nobody-consumes"
    app = make_app(any_url, prefix)
    backend = app.backend
    chords = []
    for _ in range(CHORDS):
        gid = str(uuid.uuid4())
        part_ids = [str(uuid.uuid4()) for _ in range(PARTS)]
        body = app.signature("chords.body", options={"queue": queue})
        body.freeze()
        header = app.GroupResult(gid, [app.AsyncResult(t) for t in part_ids])
        backend.apply_chord((gid, header.results), body)
        backend.set_chord_size(gid, PARTS)
        for index, tid in enumerate(part_ids):
            backend.store_result(tid, index, states.SUCCESS)
        chords.append((gid, part_ids, dict(body)))

    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(2)
    workers = [ctx.Process(target=return_every_part, args=(any_url, prefix, chords, start, seed))
               for seed in (1, 2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0]

    r = redis.Redis.from_url(REDIS)
    try:
        sent = [json.loads(m) for m in r.lrange(f"{prefix}{queue}", 0, -1)]
    finally:
        r.delete(*(list(r.scan_iter(f"{prefix}*")) or [f"{prefix}{queue}"]))
    sent_ids = sorted(m["headers"]["id"] for m in sent)
    assert sent_ids == sorted(body["options"]["task_id"] for _, _, body in chords)
    assert [m["headers"]["task"] for m in sent] == ["chords.body"] * CHORDS
    # The body got the header results in header order.
    assert all(json.loads(base64.b64decode(m["body"]))[0] == [[0, 1, 2, 3, 4]] for m in sent)
    for gid, _, _ in chords:
        state = backend.ledger.chord(gid)
        assert state.returned == PARTS and state.fired_position is not None


@pytest.mark.parametrize("returns", [1, 2])
def test_chord_fires_only_when_every_distinct_part_returned(any_url, returns):
    prefix = f"chords-{RUN_ID}-{uuid.uuid4().hex[:6]}:"
    app = make_app(any_url, prefix)
    backend = app.backend
    gid, part_ids = str(uuid.uuid4()), [str(uuid.uuid4()) for _ in range(3)]
    body = app.signature("chords.body", options={"queue": "bodies-nobody-consumes"})
    body.freeze()
    backend.apply_chord((gid, [app.AsyncResult(t) for t in part_ids]), body)
    backend.set_chord_size(gid, 3)
    for index, tid in enumerate(part_ids[:2]):
        backend.store_result(tid, index, states.SUCCESS)
        for _ in range(returns):  # a redelivered part must not count twice
            backend.on_chord_part_return(Context(id=tid, group=gid, chord=dict(body)),
                                         states.SUCCESS, index)
    state = backend.ledger.chord(gid)
    r = redis.Redis.from_url(REDIS)
    try:
        assert (state.returned, state.fired_position) == (2, None)
        assert r.llen(f"{prefix}bodies-nobody-consumes") == 0
    finally:
        keys = list(r.scan_iter(f"{prefix}*"))
        if keys:
            r.delete(*keys)
