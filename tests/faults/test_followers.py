"""16 writer processes append (with duplicate event ids and a hot stream) while a
follower reads by position: it never skips or repeats an event.

The writers and the follower are the ones of tests/test_concurrency.py (8 writers);
this is the same proof at twice the concurrency.
"""

from __future__ import annotations

import multiprocessing as mp
import threading

import sqlalchemy as sa

from ledger.api import Ledger
from ledger.schema import events as events_table
from tests import test_concurrency
from tests.test_concurrency import SHARED_IDS, _follow_until, _writer

WRITERS = 16
#: appends per writer (the 8-writer test does 500); keeps the suite's runtime modest
APPENDS = 250


def test_follower_by_position_never_skips_or_repeats_while_16_processes_append(pg_url, monkeypatch):
    monkeypatch.setattr(test_concurrency, "APPENDS", APPENDS)  # read by the forked writers
    shared = len({(i // 10) % len(SHARED_IDS) for i in range(0, APPENDS, 10)})
    ledger = Ledger.open(pg_url)
    ctx = mp.get_context("fork")
    start = ctx.Event()
    writers = [ctx.Process(target=_writer, args=(pg_url, n, True, start)) for n in range(WRITERS)]
    for w in writers:
        w.start()
    seen: list = []
    done = threading.Event()
    expected = WRITERS * APPENDS + shared
    follower = threading.Thread(target=_follow_until, args=(ledger, expected, done, seen))
    follower.start()
    start.set()
    for w in writers:
        w.join(timeout=300)
        assert w.exitcode == 0
    done.set()
    follower.join(timeout=300)

    with ledger.engine.connect() as conn:
        stored = {p for (p,) in conn.execute(sa.select(events_table.c.position))}
        dup_rows = conn.execute(
            sa.select(sa.func.count()).where(events_table.c.event_id.in_(SHARED_IDS))
        ).scalar_one()
    assert len(stored) == expected
    assert dup_rows == shared, "a duplicate event id was stored twice"
    positions = [e.position for e in seen]
    assert len(positions) == len(set(positions)), "an event was delivered twice"
    assert set(positions) == stored, "an event was skipped"
    keys = [(e.tx_id, e.position) for e in seen]
    assert keys == sorted(keys), "follow order went backwards"
    versions: dict[str, list[int]] = {}
    for e in seen:
        versions.setdefault(e.stream_id, []).append(e.stream_version)
    for stream, got in versions.items():
        assert got == list(range(1, len(got) + 1)), stream
    print(f"\nFAULTS writers={WRITERS} events={expected} followed={len(seen)} skipped=0 repeated=0")
