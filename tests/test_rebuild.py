"""rebuild, verify and prune: projections recomputed from the log equal the live ones."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

from bench.rebuild_log import generate_log
from ledger import migrate
from ledger.api import Ledger
from ledger.audit import read_events
from ledger.cli import main
from ledger.events import (
    ChordPartAdded,
    ChordStarted,
    GroupForgotten,
    GroupSaved,
    LogPruned,
    ResultExpired,
    TaskForgotten,
    TaskState,
)
from ledger.rebuild import RebuildError, rebuild, verify
from ledger.store.postgres import REBUILD_LOCK
from ledger.store.schema import LIVE
from projections.memory import MemoryTarget


def workload(ledger: Ledger, tag: str = "w") -> None:
    """Every kind of projection change: retries, sticky SUCCESS, forget, expiry, groups, chords."""
    for i in range(20):
        t = f"{tag}-t{i}"
        ledger.append([TaskState(task_id=t, status="STARTED", worker="w1")])
        if i % 3 == 0:
            ledger.append([TaskState(task_id=t, status="RETRY", retries=0)])
        ledger.append([TaskState(task_id=t, status="SUCCESS" if i % 4 else "FAILURE")])
        if i % 5 == 0:
            ledger.append([TaskState(task_id=t, status="FAILURE")])  # late: SUCCESS stays
    ledger.append([TaskForgotten(task_id=f"{tag}-t1")])
    ledger.append([ResultExpired(task_id=f"{tag}-t2", expired_before=datetime.now(timezone.utc))])
    ledger.append([TaskState(task_id=f"{tag}-t2", status="STARTED")])  # a new life
    ledger.append([GroupSaved(group_id=f"{tag}-g1", result=[[f"{tag}-g1", None], []])])
    ledger.append([GroupSaved(group_id=f"{tag}-g2", result=[[f"{tag}-g2", None], []])])
    ledger.append([GroupForgotten(group_id=f"{tag}-g2")])
    ledger.append([ChordStarted(chord_id=f"{tag}-c1", size=2)])
    assert not ledger.return_chord_part(f"{tag}-c1", f"{tag}-t3", "SUCCESS")
    assert not ledger.return_chord_part(f"{tag}-c1", f"{tag}-t3", "SUCCESS")  # redelivered
    assert ledger.return_chord_part(f"{tag}-c1", f"{tag}-t4", "FAILURE")
    ledger.append([ChordStarted(chord_id=f"{tag}-c2", size=3)])  # incomplete
    ledger.append([ChordPartAdded(chord_id=f"{tag}-c2", task_id=f"{tag}-t9")])
    assert not ledger.return_chord_part(f"{tag}-c2", f"{tag}-t5", "SUCCESS")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_rebuild_swaps_in_projections_equal_to_the_live_ones(any_url, capsys):
    ledger = Ledger.open(any_url)
    workload(ledger)
    before = ledger.snapshot()
    memory = MemoryTarget()
    memory.apply(read_events(ledger))  # position order, no follower horizon
    assert memory.state.differences(before) == []  # the live path agrees with the folds

    code, out, _ = run(capsys, "rebuild", "--db", any_url)
    assert code == 0, out
    assert "rebuilt task_meta, groups, chords, catalogue from" in out
    after = ledger.snapshot()
    assert before.differences(after) == []
    assert len(after.task_meta) == 20 - 1 and len(after.groups) == 1 and len(after.chords) == 2
    migrate.check(ledger.engine)  # names of keys and indexes match the Alembic model
    assert verify(ledger) == []
    # The swapped-in tables keep working for the live path.
    ledger.append([TaskState(task_id="w-t1", status="STARTED")])
    assert ledger.return_chord_part("w-c2", "w-t6", "SUCCESS") is False
    assert ledger.return_chord_part("w-c2", "w-t9", "SUCCESS") is False
    assert ledger.return_chord_part("w-c2", "w-t10", "SUCCESS") is True  # size 3 + 1 added
    assert verify(ledger) == []


def test_rebuild_of_one_projection_leaves_the_others_alone(any_url):
    ledger = Ledger.open(any_url)
    workload(ledger)
    with ledger.engine.begin() as conn:
        conn.execute(sa.update(LIVE.groups).values(saved_at=datetime(2000, 1, 1, tzinfo=timezone.utc)))
        conn.execute(sa.update(LIVE.task_meta).where(LIVE.task_meta.c.task_id == "w-t0").values(status="BOGUS"))
    report = rebuild(ledger, ["task_meta"])
    assert report.projections == ["task_meta"] and list(report.rows) == ["ledger_task_meta"]
    assert ledger.task_meta("w-t0").status == "FAILURE"
    assert [d.split("[")[0] for d in verify(ledger)] == ["groups"]  # still the hand-made change
    with pytest.raises(ValueError, match="unknown projection 'tasks'; choose from task_meta, groups, chords"):
        rebuild(ledger, ["tasks"])


def test_verify_reports_each_projection_row_changed_by_hand(any_url, capsys):
    ledger = Ledger.open(any_url)
    workload(ledger)
    code, out, _ = run(capsys, "verify", "--db", any_url)
    assert (code, out) == (0, "projections match the log\n")
    m, g, c, p = LIVE.task_meta, LIVE.groups, LIVE.chords, LIVE.chord_parts
    with ledger.engine.begin() as conn:
        conn.execute(sa.update(m).where(m.c.task_id == "w-t3").values(status="REVOKED"))
        conn.execute(sa.delete(m).where(m.c.task_id == "w-t5"))
        conn.execute(sa.delete(g).where(g.c.group_id == "w-g1"))
        conn.execute(sa.update(c).where(c.c.chord_id == "w-c1").values(fired_position=None))
        conn.execute(sa.delete(p).where(p.c.chord_id == "w-c2"))
        conn.execute(sa.insert(LIVE.chord_counts).values(chord_id="w-c1", stripe=99, returned=5))
        conn.execute(sa.insert(m).values(task_id="ghost", status="SUCCESS", position=1, done_at=None, payload=b"\x80"))
    code, out, err = run(capsys, "verify", "--db", any_url)
    assert code == 1
    lines = out.splitlines()
    assert len(lines) == 7, out
    assert lines[0].startswith("task_meta['ghost']: expected no row, found TaskMeta(")
    assert lines[1].startswith("task_meta['w-t3']: expected TaskMeta(task_id='w-t3', status='SUCCESS'")
    assert "found TaskMeta(task_id='w-t3', status='REVOKED'" in lines[1]
    assert lines[2].startswith("task_meta['w-t5']: expected TaskMeta(") and lines[2].endswith("found no row")
    assert lines[3].startswith("groups['w-g1']: expected GroupState(") and lines[3].endswith("found no row")
    assert lines[4].startswith("chords['w-c1']:") and "fired_position=None" in lines[4]
    assert lines[5].startswith("chords['w-c2']:") and "parts=frozenset()" in lines[5]
    counted = len(ledger.chord("w-c1").parts)
    assert lines[6] == f"chord_counts['w-c1']: expected {counted} parts, found {counted + 5}"
    assert "7 difference(s)" in err
    # rebuild repairs it
    rebuild(ledger)
    assert verify(ledger) == []


@pytest.mark.postgres
def test_rebuild_while_writers_keep_storing_loses_nothing(pg_url):
    """Writers append and update projections during three rebuilds; nothing is lost or stale."""
    ledger = Ledger.open(pg_url)
    generate_log(pg_url, 40_000)  # enough log that the fill takes a while
    rebuild(ledger)
    stop = threading.Event()
    written: dict[str, list[str]] = {}
    errors: list[BaseException] = []
    fired: dict[str, list[bool]] = {}

    def writer(name: str) -> None:
        mine = written.setdefault(name, [])
        try:
            i = 0
            while not stop.is_set():
                t = f"{name}-{i}"
                ledger.append([TaskState(task_id=t, status="STARTED")])
                # Both orders, so that writers take the projection tables' locks in
                # different orders, as real batches do.
                pair = [TaskState(task_id=t, status="SUCCESS"), GroupSaved(group_id=t, result=[t])]
                ledger.append(pair if i % 2 else pair[::-1])
                if i % 7 == 0:
                    ledger.append([TaskForgotten(task_id=t)])
                ledger.append([ChordStarted(chord_id=t, size=2)])
                fired[t] = [ledger.return_chord_part(t, f"{t}-{p}", "SUCCESS") for p in "ab"]
                mine.append(t)
                i += 1
        except BaseException as exc:  # surfaced below: a writer must never fail
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f"wr{n}",)) for n in range(3)]
    for th in threads:
        th.start()
    try:
        while sum(map(len, written.values())) < 30:
            time.sleep(0.01)
        reports = [rebuild(ledger) for _ in range(3)]
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert errors == []
    assert sum(r.caught_up for r in reports) > 0  # writes did land during rebuilds
    assert verify(ledger) == []
    for tasks in written.values():
        for i, t in enumerate(tasks):
            meta = ledger.task_meta(t)
            if i % 7 == 0:
                assert meta is None, t
            else:
                assert meta is not None and meta.status == "SUCCESS", t
            assert ledger.group(t) is not None, t
            assert fired[t] == [False, True], t
            assert ledger.chord(t).fired_position is not None, t
    migrate.check(ledger.engine)


@pytest.mark.postgres
def test_a_second_concurrent_rebuild_is_refused_with_a_clear_error(pg_url, capsys):
    ledger = Ledger.open(pg_url)
    workload(ledger)
    with ledger.engine.connect() as other:
        other.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": REBUILD_LOCK})
        with pytest.raises(RebuildError, match="another rebuild is running"):
            rebuild(ledger)
        assert main(["rebuild", "--db", pg_url]) == 1
        assert "rebuild failed: another rebuild is running" in capsys.readouterr().err
        other.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": REBUILD_LOCK})
        other.commit()
    assert rebuild(ledger).rows["ledger_task_meta"] == 19
    assert verify(ledger) == []


def test_prune_then_rebuild_then_verify_is_clean(any_url, capsys):
    ledger = Ledger.open(any_url)
    workload(ledger, "old")
    time.sleep(0.05)
    cutoff = datetime.now(timezone.utc)
    time.sleep(0.05)
    workload(ledger, "new")
    ledger.append([TaskState(task_id="old-t7", status="RETRY")])  # an old task still moving
    before = ledger.snapshot()
    old_events = [e for e in list(read_events(ledger)) if e.recorded_at < cutoff]

    code, out, _ = run(capsys, "prune", "--before", cutoff.isoformat(), "--db", any_url)
    assert code == 0, out
    assert "pruned" in out
    remaining = list(read_events(ledger))
    assert all(e.recorded_at >= cutoff or e.stream_id in _kept_streams() or _pinned(before, e)
               for e in remaining)
    assert len(remaining) < len(old_events) + len([e for e in remaining if e.recorded_at >= cutoff])
    # Forgotten: gone entirely. Succeeded: only the event its row points to is left.
    assert ledger.history("old-t1") == []
    assert [e.data.status for e in ledger.history("old-t5")] == ["SUCCESS"]
    assert ledger.history("old-t7")[-1].data.status == "RETRY"
    # The completed chord's counter went with its events; the incomplete one is whole.
    assert ledger.chord("old-c1") is None and ledger.chord_events("old-c1") == []
    assert ledger.chord("old-c2") == before.chords["old-c2"]
    assert [e.stream_id for e in ledger.chord_events("old-c2")][-1] == "part:old-t5"
    record = ledger.read_stream("ledger:maintenance")[-1].data
    assert isinstance(record, LogPruned) and record.events_deleted > 0
    assert "task:old-t1" in record.streams and "chord:old-c1" in record.streams

    code, out, _ = run(capsys, "history", "old-t5", "--db", any_url)
    assert code == 0 and f"recorded before {cutoff.isoformat()} were pruned at" in out
    code, _, err = run(capsys, "history", "old-t1", "--db", any_url)
    assert code == 1 and f"(its events before {cutoff.isoformat()} were pruned)" in err

    after = ledger.snapshot()
    before.chords.pop("old-c1")
    # The catalogue describes what the log keeps: its rows are the remaining events' fold.
    kept = MemoryTarget()
    kept.apply(read_events(ledger))
    assert kept.state.catalogue == after.catalogue and "old-t1" not in after.catalogue
    # only its pinned FAILURE is left: first seen then
    assert after.catalogue["old-t0"].first_seen > before.catalogue["old-t0"].first_seen
    before.catalogue = after.catalogue
    assert before.differences(after) == []
    assert verify(ledger) == []
    rebuild(ledger)
    assert before.differences(ledger.snapshot()) == []
    code, out, _ = run(capsys, "verify", "--db", any_url)
    assert code == 0, out

    # Again, with nothing left to delete: nothing changes, so nothing is recorded
    # (an hourly cron job appended an event an hour, to the log and the topic).
    head = ledger.read(ledger.log.head)
    code, out, _ = run(capsys, "prune", "--before", cutoff.isoformat(), "--db", any_url)
    assert code == 0 and "pruned 0 events" in out, out
    assert ledger.read(ledger.log.head) == head
    assert len(ledger.read_stream("ledger:maintenance")) == 1


def _kept_streams() -> set[str]:
    # the incomplete chord, with its returned part's own stream, and the moving task
    return {"chord:old-c2", "part:old-t5", "task:old-t7"}


def _pinned(snapshot, event) -> bool:
    kind, key = event.stream_id.split(":", 1)
    if kind == "task":
        return key in snapshot.task_meta and snapshot.task_meta[key].position == event.position
    if kind == "group":
        return key in snapshot.groups and snapshot.groups[key].position == event.position
    return kind == "ledger"


def test_a_projection_named_twice_is_rebuilt_and_verified_once(any_url, capsys):
    """Before: rebuild failed (the second swap found ``ledger_tasks__rebuild`` gone)
    and left it behind; verify failed on its scratch table made twice."""
    ledger = Ledger.open(any_url)
    workload(ledger)
    code, out, err = run(capsys, "rebuild", "--projection", "catalogue", "--projection", "catalogue",
                         "--db", any_url)
    assert code == 0, err
    assert "rebuilt catalogue from" in out and out.count("ledger_tasks") == 1
    code, out, err = run(capsys, "verify", "--projection", "catalogue", "--projection", "catalogue",
                         "--db", any_url)
    assert (code, out) == (0, "projections match the log\n"), err
    assert main(["db", "check", "--db", any_url]) == 0


class _Interrupt:
    """A rebuild's progress that stops it as Ctrl-C would, at the fill's first step."""

    total = 0

    def advance(self, n: int) -> None:
        raise KeyboardInterrupt


def test_an_interrupted_rebuild_leaves_no_table_behind(any_url, capsys):
    ledger = Ledger.open(any_url)
    workload(ledger)
    before = ledger.snapshot()
    with pytest.raises(KeyboardInterrupt):
        rebuild(ledger, progress=_Interrupt())
    with ledger.engine.connect() as conn:
        assert [t for t in sa.inspect(conn).get_table_names() if t.endswith("__rebuild")] == []
    assert main(["db", "check", "--db", any_url]) == 0, capsys.readouterr()
    assert before.differences(ledger.snapshot()) == []
    assert rebuild(ledger).rows["ledger_task_meta"] == 19
