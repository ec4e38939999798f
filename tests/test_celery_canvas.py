"""Canvas behaviours Celery's own integration suite holds every backend to (issue 12).

Each test is a case of ``t/integration/test_canvas.py`` (``make conformance``)
that the ledger once failed, run here with this project's real worker
(tests/test_celery_worker.py) on SQLite and PostgreSQL.
"""

from __future__ import annotations

import time

import pytest
import redis
from celery import chord, group

from tests.test_celery_worker import BROKER, WAIT, db_url, task, worker  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.worker]


@pytest.fixture
def app(worker):  # noqa: F811  (the module's real worker; its client app)
    return worker


def marks(app, key: str) -> list[str]:
    """The values ``workerapp.mark`` appended to ``key``."""
    r = redis.Redis.from_url(BROKER)
    return [v.decode() for v in r.lrange(f"{app.conf.ledger_prefix}{key}", 0, -1)]


def wait_for_marks(app, key: str, count: int) -> list[str]:
    deadline = time.monotonic() + WAIT
    while len(found := marks(app, key)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def test_failing_header_part_raises_its_own_exception(app):
    """``get()`` re-raises the failed part's error, not the body's ChordError
    (test_error_propagates_to_chord_from_simple)."""
    fail_after, tsum = task(app, "fail_after"), task(app, "tsum")
    r = chord([fail_after.s(0.5, "part broke")], tsum.s()).apply_async()
    with pytest.raises(ValueError, match="part broke"):
        r.get(timeout=WAIT)


def test_generator_header_is_sent_while_it_is_consumed(app):
    """A generator header is not unrolled before its first task runs (test_generator)."""
    mark, tsum = task(app, "mark"), task(app, "tsum")
    key = f"generator-{time.monotonic_ns()}"

    def header():
        for i in range(4):
            if i == 3:
                # Celery makes parts a little ahead of sending them, never all: by
                # the last one the first was sent, and runs
                assert wait_for_marks(app, key, 1), "chord header was unrolled too early"
            yield mark.si(key, i)

    r = chord(header(), tsum.s()).apply_async()
    assert r.get(timeout=WAIT) == 0 + 1 + 2 + 3


def test_reapplied_frozen_chord_fires_its_body_again(app):
    """Each apply of a frozen chord is a life of its own, its body sent once per life
    (test_reapplying_frozen_chord_dispatches_body_again)."""
    add, mark = task(app, "add"), task(app, "mark")
    key = f"frozen-{time.monotonic_ns()}"
    c = chord(group(add.s(1, 2), add.s(3, 4)), mark.si(key, "body"))
    c.freeze()
    first = c.apply_async()
    first.get(timeout=WAIT)
    assert wait_for_marks(app, key, 1) == ["body"]
    second = c.apply_async()
    assert second.parent.id == first.parent.id  # the same chord, applied again
    second.get(timeout=WAIT)
    assert wait_for_marks(app, key, 2) == ["body", "body"]
    stream = [e.type for e in app.backend.ledger.read_stream(f"chord:{first.parent.id}")]
    assert stream.count("chord.applied") == 2
    assert stream.count("chord.fired") == 2


def test_failure_before_a_trailing_group_reaches_the_group(app):
    """A chain's failed task fails the group after it; ``get()`` on the group raises it
    (test_error_propagates_from_chord)."""
    add, fail = task(app, "add"), task(app, "fail")
    r = (add.s(1, 1) | fail.s() | group(add.s(1), add.s(1))).delay()
    with pytest.raises(ValueError, match="2"):
        r.get(timeout=WAIT)


@pytest.mark.parametrize("shape", ["simple", "chain tail"])
def test_failed_chord_calls_its_errback_and_raises_the_part_error(app, shape):
    """An errback linked to a chord runs when a header part fails, and ``get()`` raises
    the part's error (test_immutable_errback_called_by_chord_from_simple/_from_chain_tail)."""
    add, fail_after, tsum, mark = (task(app, n) for n in ("add", "fail_after", "tsum", "mark"))
    key = f"errback-{time.monotonic_ns()}"
    c = chord([fail_after.si(0.5, "part broke"), add.si(1, 1)], tsum.s())
    c.link_error(mark.si(key, "errback"))
    r = (c if shape == "simple" else add.si(1, 1) | c).delay()
    with pytest.raises(ValueError, match="part broke"):
        r.get(timeout=WAIT)
    assert wait_for_marks(app, key, 1) == ["errback"]
