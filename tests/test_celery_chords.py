"""Native chords under redelivery: parts returned twice, from two processes, fire the body once.

The body is published to a queue no worker consumes, so the Redis list of that
queue holds exactly the bodies that were sent: no waiting, no timing.
"""

from __future__ import annotations

import base64
import json
import multiprocessing
import random
import threading
import time
import uuid

import pytest
import redis
from celery import Celery, states
from celery.app.task import Context
from celery.exceptions import ChordError
from celery.utils.functional import _regen

from tests.conftest import REDIS, RUN_ID

#: where the tests send chord bodies: no worker consumes it, so it holds exactly the bodies sent
BODY_QUEUE = f"bodies-nobody-consumes-{RUN_ID}"
CHORDS = 20
PARTS = 5


def make_app(url: str, prefix: str) -> Celery:
    app = Celery("chords", broker=REDIS, backend=f"ledger+{url}", set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": prefix}
    return app


def run_forked_together(target, args_per_process: list[tuple], timeout: float) -> None:
    """``target(*args, start=barrier)`` in one forked process per ``args``; they pass
    the barrier together, and each must exit 0 within ``timeout`` seconds."""
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(len(args_per_process))
    procs = [ctx.Process(target=target, args=args, kwargs={"start": start})
             for args in args_per_process]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    assert [p.exitcode for p in procs] == [0] * len(procs)


def return_every_part(url: str, prefix: str, chords: list, seed: int, start) -> None:
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
    app = make_app(any_url, prefix)
    backend = app.backend
    chords = []
    for _ in range(CHORDS):
        gid = str(uuid.uuid4())
        part_ids = [str(uuid.uuid4()) for _ in range(PARTS)]
        body = app.signature("chords.body", options={"queue": BODY_QUEUE})
        body.freeze()
        header = app.GroupResult(gid, [app.AsyncResult(t) for t in part_ids])
        backend.apply_chord((gid, header.results), body)
        backend.set_chord_size(gid, PARTS)
        for index, tid in enumerate(part_ids):
            backend.store_result(tid, index, states.SUCCESS)
        chords.append((gid, part_ids, dict(body)))

    run_forked_together(return_every_part, [(any_url, prefix, chords, seed) for seed in (1, 2)], 120)

    sent = bodies_sent(prefix)
    sent_ids = sorted(m["headers"]["id"] for m in sent)
    assert sent_ids == sorted(body["options"]["task_id"] for _, _, body in chords)
    assert [m["headers"]["task"] for m in sent] == ["chords.body"] * CHORDS
    # The body got the header results in header order.
    assert all(json.loads(base64.b64decode(m["body"]))[0] == [[0, 1, 2, 3, 4]] for m in sent)
    for gid, _, _ in chords:
        state = backend.ledger.chord(gid)
        assert state.returned == PARTS and state.fired_position is not None


def _frozen_chord(app, size: int):
    """A chord's group id, header task ids and frozen body (sent to BODY_QUEUE)."""
    gid, part_ids = str(uuid.uuid4()), [str(uuid.uuid4()) for _ in range(size)]
    body = app.signature("chords.body", options={"queue": BODY_QUEUE})
    body.freeze()
    return gid, part_ids, body


def _apply(app, gid: str, part_ids: list[str], body) -> None:
    """What Celery's chord.run does to the backend before and while sending the header."""
    app.backend.apply_chord((gid, [app.AsyncResult(t) for t in part_ids]), body)
    app.backend.set_chord_size(gid, len(part_ids))


def _three_part_chord_with_two_returned(url: str, returns: int = 1):
    """A chord of 3 parts whose first two stored SUCCESS and returned ``returns`` times each.

    Its body goes to a queue no worker consumes, so the queue holds exactly the
    bodies sent.
    """
    prefix = f"chords-{RUN_ID}-{uuid.uuid4().hex[:6]}:"
    app = make_app(url, prefix)
    backend = app.backend
    gid, part_ids, body = _frozen_chord(app, 3)
    _apply(app, gid, part_ids, body)
    for index, tid in enumerate(part_ids[:2]):
        backend.store_result(tid, index, states.SUCCESS)
        for _ in range(returns):  # a redelivered part must not count twice
            backend.on_chord_part_return(Context(id=tid, group=gid, chord=dict(body)),
                                         states.SUCCESS, index)
    return prefix, backend, gid, part_ids, body


@pytest.mark.parametrize("returns", [1, 2])
def test_chord_fires_only_when_every_distinct_part_returned(any_url, returns):
    prefix, backend, gid, _, _ = _three_part_chord_with_two_returned(any_url, returns)
    state = backend.ledger.chord(gid)
    r = redis.Redis.from_url(REDIS)
    try:
        assert (state.returned, state.fired_position) == (2, None)
        assert r.llen(f"{prefix}{BODY_QUEUE}") == 0
    finally:
        keys = list(r.scan_iter(f"{prefix}*"))
        if keys:
            r.delete(*keys)


def test_a_chord_applied_again_fires_once_per_life_however_often_parts_return(any_url):
    """A frozen chord applied twice (same group id, same part ids) sends its body once
    per apply, each part returning twice in each life."""
    prefix = f"chords-{RUN_ID}-{uuid.uuid4().hex[:6]}:"
    app = make_app(any_url, prefix)
    backend = app.backend
    gid, part_ids, body = _frozen_chord(app, 3)
    for _ in range(2):
        _apply(app, gid, part_ids, body)
        for index, tid in enumerate(part_ids):
            backend.store_result(tid, index * 10, states.SUCCESS)
            for _ in range(2):
                backend.on_chord_part_return(
                    Context(id=tid, group=gid, group_index=index, chord=dict(body)),
                    states.SUCCESS, index * 10,
                )
    sent = bodies_sent(prefix)
    assert [json.loads(base64.b64decode(m["body"]))[0] for m in sent] == [[[0, 10, 20]]] * 2
    stream = [e.type for e in backend.ledger.read_stream(f"chord:{gid}")]
    assert (stream.count("chord.applied"), stream.count("chord.fired")) == (2, 2)


def test_a_generator_header_is_never_unrolled_and_reaches_the_body_in_header_order(any_url):
    """apply_chord leaves a generator header alone (Celery sends its parts as it makes
    them); parts returning in reverse order reach the body in header order."""
    prefix = f"chords-{RUN_ID}-{uuid.uuid4().hex[:6]}:"
    app = make_app(any_url, prefix)
    backend = app.backend
    gid, part_ids, body = _frozen_chord(app, 3)
    made = []

    def header():
        for tid in part_ids:
            made.append(tid)
            yield app.AsyncResult(tid)

    backend.apply_chord((gid, _regen(header())), body)
    assert made == []
    backend.set_chord_size(gid, len(part_ids))
    for index in reversed(range(len(part_ids))):
        backend.store_result(part_ids[index], index * 10, states.SUCCESS)
        backend.on_chord_part_return(
            Context(id=part_ids[index], group=gid, group_index=index, chord=dict(body)),
            states.SUCCESS, index * 10,
        )
    sent = bodies_sent(prefix)
    assert [json.loads(base64.b64decode(m["body"]))[0] for m in sent] == [[[0, 10, 20]]]


def _chord_run(app, parts: list, *, returns: list[str] | None = None):
    """Apply a chord of ``len(parts)`` header tasks; ``parts[i]`` is the stored result of
    part ``i`` (an exception is stored as a FAILURE, ``None`` stores nothing); then every
    part in ``returns`` (default: all, in header order) returns to the chord."""
    backend = app.backend
    gid, part_ids, body = _frozen_chord(app, len(parts))
    _apply(app, gid, part_ids, body)
    for tid, value in zip(part_ids, parts, strict=True):
        if value is not None:
            state = states.FAILURE if isinstance(value, Exception) else states.SUCCESS
            backend.store_result(tid, value, state)
    for index, tid in enumerate(part_ids):
        if returns is None or tid in returns:
            state = states.FAILURE if isinstance(parts[index], Exception) else states.SUCCESS
            backend.on_chord_part_return(
                Context(id=tid, group=gid, group_index=index, chord=dict(body)), state, parts[index]
            )
    return body, part_ids


def bodies_sent(prefix: str) -> list:
    """The chord bodies sent to ``BODY_QUEUE`` under ``prefix``; then every key of ``prefix`` is removed."""
    r = redis.Redis.from_url(REDIS)
    try:
        return [json.loads(m) for m in r.lrange(f"{prefix}{BODY_QUEUE}", 0, -1)]
    finally:
        keys = list(r.scan_iter(f"{prefix}*"))
        if keys:
            r.delete(*keys)


def test_a_failing_part_fails_the_body_with_the_same_chord_error_as_redis(any_url):
    """The first failed part in header order is named, in the Redis backend's words."""
    parts = [1, ValueError("first"), 3, KeyError("second")]
    messages = {}
    for name, url in (("ledger", f"ledger+{any_url}"), ("redis", REDIS)):
        prefix = f"chords-{RUN_ID}-{uuid.uuid4().hex[:6]}:"
        app = Celery("chords", broker=REDIS, backend=url, set_as_current=False)
        app.conf.broker_transport_options = {"global_keyprefix": prefix}
        app.conf.result_expires = 60  # the Redis backend's keys (uuids) go by themselves
        body, part_ids = _chord_run(app, parts)
        assert bodies_sent(prefix) == []
        meta = app.backend.get_task_meta(body.id)
        assert meta["status"] == states.FAILURE
        assert isinstance(meta["result"], ChordError)
        messages[name] = str(meta["result"]).replace(part_ids[1], "<part 1>")
    assert messages["ledger"] == messages["redis"] == "Dependency <part 1> raised ValueError('first')"


def test_a_part_with_no_stored_result_is_waited_for_up_to_the_chord_join_timeout(any_url):
    """Chord parts must store results (Celery's rule); one that did not fails the chord
    after ``result_chord_join_timeout`` instead of firing the body without its value."""
    prefix = f"chords-{RUN_ID}-{uuid.uuid4().hex[:6]}:"
    app = make_app(any_url, prefix)
    app.conf.result_chord_join_timeout = 0.5
    body, _ = _chord_run(app, [1, None, 3])
    assert bodies_sent(prefix) == []
    meta = app.backend.get_task_meta(body.id)
    assert meta["status"] == states.FAILURE
    assert isinstance(meta["result"], ChordError)
    assert "TimeoutError" in str(meta["result"])


def test_a_part_result_stored_after_the_chord_completed_still_reaches_the_body(any_url):
    prefix, backend, gid, part_ids, body = _three_part_chord_with_two_returned(any_url)
    last = threading.Thread(target=backend.on_chord_part_return, args=(
        Context(id=part_ids[2], group=gid, chord=dict(body)), states.SUCCESS, 2))
    last.start()
    deadline = time.monotonic() + 60  # hang guard, not a timing assertion
    while (backend.ledger.chord(gid).fired_position is None and last.is_alive()
           and time.monotonic() < deadline):
        time.sleep(0.01)
    backend.store_result(part_ids[2], 2, states.SUCCESS)
    last.join(60)
    sent = bodies_sent(prefix)
    assert [json.loads(base64.b64decode(m["body"]))[0] for m in sent] == [[[0, 1, 2]]]


def test_parts_stored_by_mark_as_done_fire_the_body_once_each_with_its_result(any_url):
    """A worker stores a part's result and returns it to the chord in one call
    (``mark_as_done``), twice for a redelivered part: the body is sent once, with
    every result, and on PostgreSQL each part's result and return are one transaction."""
    prefix = f"chords-{RUN_ID}-{uuid.uuid4().hex[:6]}:"
    app = make_app(any_url, prefix)
    backend = app.backend
    gid, part_ids, body = _frozen_chord(app, 3)
    _apply(app, gid, part_ids, body)
    for index, tid in [(0, part_ids[0]), (1, part_ids[1]), (1, part_ids[1]), (2, part_ids[2])]:
        request = Context(id=tid, group=gid, group_index=index, chord=dict(body))
        backend.mark_as_done(tid, index * 10, request=request)
    sent = bodies_sent(prefix)
    assert [json.loads(base64.b64decode(m["body"]))[0] for m in sent] == [[[0, 10, 20]]]
    ledger = backend.ledger
    returns = {e.data.task_id: e for e in ledger.chord_events(gid) if e.type == "chord.part_returned"}
    assert sorted(returns) == sorted(part_ids)
    if ledger.engine.dialect.name == "postgresql":
        for tid in part_ids:
            first_success = next(e for e in ledger.history(tid) if e.type == "task.state")
            assert first_success.tx_id == returns[tid].tx_id


def test_parts_stored_after_deallocate_all_prepare_their_statements_again_and_fire_once(pg_url):
    """A chord part's round trip runs statements prepared under the ledger's own
    names on the kept connection (postgres._pipelined); a session that dropped
    them (``DEALLOCATE ALL``, as a pooler's reset does) has them prepared again and
    the part stored once, its transaction resent whole."""
    from ledger.store.postgres import _KEPT

    prefix = f"chords-{RUN_ID}-{uuid.uuid4().hex[:6]}:"
    app = make_app(pg_url, prefix)
    backend = app.backend
    gid, part_ids, body = _frozen_chord(app, 3)
    _apply(app, gid, part_ids, body)
    for index, tid in enumerate(part_ids):
        if index:
            _KEPT[backend.ledger.engine][2].driver_connection.execute("DEALLOCATE ALL")
        backend.mark_as_done(tid, index * 10, request=Context(id=tid, group=gid, group_index=index, chord=dict(body)))
    sent = bodies_sent(prefix)
    assert [json.loads(base64.b64decode(m["body"]))[0] for m in sent] == [[[0, 10, 20]]]
    for tid in part_ids:
        assert [e.type for e in backend.ledger.history(tid)] == ["task.state"]
    assert len([e for e in backend.ledger.chord_events(gid) if e.type == "chord.part_returned"]) == 3


def test_a_completing_part_whose_header_read_was_deallocated_sends_the_body_once(pg_url):
    """The completing part's transaction (its result, its return, the claim)
    commits before the read of the chord's inputs runs; if that read's prepared
    statement is gone from the session, the read alone goes again -- never the
    committed transaction, which would find its events in the log and claim nothing."""
    from ledger.store.postgres import _KEPT, _NAMED

    prefix = f"chords-{RUN_ID}-{uuid.uuid4().hex[:6]}:"
    app = make_app(pg_url, prefix)
    backend = app.backend
    gid, part_ids, body = _frozen_chord(app, 3)
    _apply(app, gid, part_ids, body)

    def store(index: int) -> None:
        tid = part_ids[index]
        backend.mark_as_done(tid, index * 10, request=Context(id=tid, group=gid, group_index=index, chord=dict(body)))

    store(0)
    store(1)
    fairy = _KEPT[backend.ledger.engine][2]
    read = backend.ledger.store._claimed_header_sql
    names = [name for (sql, _), name in fairy.info[_NAMED].items() if sql == read]
    assert names, "the header read was prepared by the parts before"
    for name in names:
        fairy.driver_connection.execute(f"DEALLOCATE {name.decode()}")
    store(2)
    sent = bodies_sent(prefix)
    assert [json.loads(base64.b64decode(m["body"]))[0] for m in sent] == [[[0, 10, 20]]]


def test_a_part_stored_with_its_return_wakes_its_waiters(pg_url):
    """A chord part's result stored by mark_as_done (with the part and claim, one
    pipeline) still NOTIFYs its task's stream: AsyncResult.get() waits on that."""
    import psycopg

    from ledger.store.postgres import NOTIFY_CHANNEL
    from tests.conftest import _libpq

    prefix = f"chords-{RUN_ID}-{uuid.uuid4().hex[:6]}:"
    app = make_app(pg_url, prefix)
    gid, part_ids, body = _frozen_chord(app, 2)
    _apply(app, gid, part_ids, body)
    with psycopg.connect(_libpq(pg_url), autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        request = Context(id=part_ids[0], group=gid, group_index=0, chord=dict(body))
        app.backend.mark_as_done(part_ids[0], "done", request=request)
        woken = next((n.payload for n in listener.notifies(timeout=30)
                      if n.payload == f"task:{part_ids[0]}"), None)
    assert woken == f"task:{part_ids[0]}"
