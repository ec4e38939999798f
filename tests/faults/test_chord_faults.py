"""Chords under worker death and duplicate deliveries: every body fires exactly once.

* A real worker (``acks_late``, ``task_reject_on_worker_lost``) is SIGKILLed,
  with its pool, in the middle of a chord; a second worker gets the unacked parts
  redelivered and the body runs exactly once, with every part's result.
* Two processes return the parts of 1,000-part chords, 5% of the parts twice,
  in random order, for several chords: each body is sent exactly once.
"""

from __future__ import annotations

import random
import time
import uuid
from datetime import datetime, timezone

import redis
from celery import chord, states
from celery.app.task import Context

from ledger.api import Ledger
from ledger.events import TaskState
from ledger.rebuild import verify
from tests.conftest import RUN_ID
from tests.test_celery_chords import BODY_QUEUE, bodies_sent, run_forked_together
from tests.test_celery_chords import make_app as make_chord_app

WAIT = 120  # hang guard, not a timing assertion

KILLABLE = {
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    # Unacked messages of a dead worker come back after 2 s, checked every second.
    "broker_transport_options": {"visibility_timeout": 2, "unacked_restore_interval": 1,
                                 "unacked_restore_throttle": 1},
}


def test_worker_killed_mid_chord_with_acks_late_fires_the_body_once_after_redelivery(
        pg_url, workers):
    w = workers(f"ledger+{pg_url}", KILLABLE)
    first = w.start(concurrency=3)
    app = w.client()
    part, body = app.tasks["faults.slow_part"], app.tasks["faults.counted_body"]
    key = f"bodies-{uuid.uuid4().hex[:6]}"
    parts = 12
    r = chord([part.s(i, 0.5) for i in range(parts)], body.s(key)).apply_async()
    ledger = Ledger.open(pg_url)
    gid = r.parent.id
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        state = ledger.chord(gid)
        if state is not None and state.returned >= 3:
            break
        time.sleep(0.05)
    returned_before_kill = ledger.chord(gid).returned
    assert returned_before_kill < parts, "the chord finished before the kill"
    w.kill(first)
    w.start(concurrency=3)
    assert r.get(timeout=WAIT) == sum(range(parts))
    counter = redis.Redis.from_url(app.conf.broker_url)
    assert int(counter.get(f"{w.prefix}{key}")) == 1
    assert [e.data.status for e in ledger.history(r.id) if e.type == "task.state"].count(states.SUCCESS) == 1
    state = ledger.chord(gid)
    assert state.returned == state.size == parts
    # the kill was real: some part ran twice (started by the dead worker, redelivered)
    header = [res.id for res in r.parent.results]
    restarted = [t for t in header
                 if [e.data.status for e in ledger.history(t) if e.type == "task.state"]
                 .count(states.STARTED) > 1]
    assert restarted, "no part was redelivered"
    print(f"\nFAULTS sigkill: returned before kill={returned_before_kill}, "
          f"redelivered parts={len(restarted)}, bodies=1")


# -- two processes, 1,000-part chords, 5% duplicate deliveries ------------------------------

CHORDS = 3
PARTS = 1000
DUPLICATE_SHARE = 0.05


def _return_parts(url: str, prefix: str, deliveries: list, start) -> None:
    backend = make_chord_app(url, prefix).backend
    start.wait()
    for gid, tid, index, body in deliveries:
        backend.on_chord_part_return(Context(id=tid, group=gid, group_index=index, chord=body),
                                     states.SUCCESS, index)


def test_two_processes_returning_1000_part_chords_with_5_percent_duplicates_fire_each_body_once(
        pg_url):
    prefix = f"faults-chords-{RUN_ID}-{uuid.uuid4().hex[:6]}:"
    app = make_chord_app(pg_url, prefix)
    backend = app.backend
    rng = random.Random(8)
    per_process: list[list] = [[], []]
    bodies, duplicates = {}, 0
    for _ in range(CHORDS):
        gid = str(uuid.uuid4())
        part_ids = [str(uuid.uuid4()) for _ in range(PARTS)]
        body = app.signature("chords.body", options={"queue": BODY_QUEUE})
        body.freeze()
        backend.apply_chord((gid, [app.AsyncResult(t) for t in part_ids]), body)
        backend.set_chord_size(gid, PARTS)
        now = datetime.now(timezone.utc)
        backend.ledger.append([
            TaskState(task_id=t, status=states.SUCCESS, result=backend.encoded(i), date_done=now)
            for i, t in enumerate(part_ids)
        ])
        deliveries = [(gid, t, i, dict(body)) for i, t in enumerate(part_ids)]
        again = rng.sample(deliveries, int(PARTS * DUPLICATE_SHARE))
        duplicates += len(again)
        deliveries += again
        rng.shuffle(deliveries)
        for d in deliveries:  # each delivery goes to one of the two processes
            per_process[rng.randrange(2)].append(d)
        bodies[body.id] = gid

    run_forked_together(_return_parts, [(pg_url, prefix, d) for d in per_process], 300)

    sent = bodies_sent(prefix)
    assert sorted(m["headers"]["id"] for m in sent) == sorted(bodies)
    for gid in bodies.values():
        state = backend.ledger.chord(gid)
        assert state.returned == PARTS and state.fired_position is not None
    # the racing parts' live completion and claims equal a rebuild from the log
    assert verify(backend.ledger, ["chords"]) == []
    print(f"\nFAULTS chords={CHORDS}x{PARTS} duplicate deliveries={duplicates} "
          f"bodies sent={len(sent)}")
