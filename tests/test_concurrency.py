"""Many writer processes append while a follower reads: nothing skipped, nothing twice."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
import uuid

import pytest
import sqlalchemy as sa

from ledger.api import Ledger
from ledger.events import NewEvent, TaskState
from ledger.store.base import Checkpoint
from ledger.store.schema import events as events_table

pytestmark = pytest.mark.postgres

SHARED_IDS = [uuid.uuid5(uuid.NAMESPACE_URL, f"dup-{i}") for i in range(50)]


def _writer(url: str, n: int, appends: int, with_duplicates: bool, start: mp.Event) -> None:
    ledger = Ledger.open(url)
    start.wait()
    for i in range(appends):
        batch = [NewEvent(TaskState(task_id=f"w{n}-{i}", status="STARTED"))]
        if i % 25 == 0:
            # a hot stream every writer appends to: version conflicts are retried
            batch = [NewEvent(TaskState(task_id="shared", status="STARTED"))]
        if with_duplicates and i % 10 == 0:
            # every writer appends the same event ids: one row each must result
            dup = SHARED_IDS[(i // 10) % len(SHARED_IDS)]
            batch.append(NewEvent(TaskState(task_id=f"dup-{dup}", status="STARTED"), dup))
        ledger.append(batch)


def _follow_until(ledger: Ledger, expected: int, done: threading.Event, out: list) -> None:
    cp = Checkpoint(0, 0)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        batch = ledger.read_from(cp, limit=500)
        out.extend(batch)
        if batch:
            cp = Checkpoint(batch[-1].tx_id, batch[-1].position)
        elif done.is_set() and len(out) >= expected:
            return
        else:
            time.sleep(0.005)


def append_while_following(
    url: str, writers: int, appends: int, with_duplicates: bool
) -> tuple[list, set[int]]:
    """``writers`` processes append ``appends`` batches each while a follower reads.

    The follower reads in follow order, ``(tx_id, position)``, from its last
    checkpoint. Asserts its guarantees and returns the events it saw and the
    positions stored: every stored event exactly once, none skipped, follow
    order never going backwards, each stream's versions in order without gaps,
    one row per duplicated event id.
    """
    ledger = Ledger.open(url)
    ctx = mp.get_context("fork")
    start = ctx.Event()
    procs = [
        ctx.Process(target=_writer, args=(url, n, appends, with_duplicates, start))
        for n in range(writers)
    ]
    for p in procs:
        p.start()
    shared = len({(i // 10) % len(SHARED_IDS) for i in range(0, appends, 10)})
    expected = writers * appends + (shared if with_duplicates else 0)
    seen: list = []
    done = threading.Event()
    follower = threading.Thread(target=_follow_until, args=(ledger, expected, done, seen))
    follower.start()
    start.set()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    done.set()
    follower.join(timeout=300)

    with ledger.engine.connect() as conn:
        stored = {p for (p,) in conn.execute(sa.select(events_table.c.position))}
        dup_rows = conn.execute(
            sa.select(sa.func.count()).where(events_table.c.event_id.in_(SHARED_IDS))
        ).scalar_one()
    assert len(stored) == expected
    assert dup_rows == (shared if with_duplicates else 0), "a duplicate event id was stored twice"
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
    assert len(versions["task:shared"]) == writers * len(range(0, appends, 25))
    return seen, stored


@pytest.mark.parametrize("with_duplicates", [False, True], ids=["unique", "with-duplicates"])
def test_follower_sees_every_event_exactly_once_while_8_processes_append(pg_url, with_duplicates):
    append_while_following(pg_url, writers=8, appends=500, with_duplicates=with_duplicates)
