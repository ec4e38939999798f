"""The log and its projections: one suite, run on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

from ledger.api import Ledger
from ledger.errors import VersionConflict
from ledger.events import (
    ChordPartReturned,
    ChordStarted,
    GroupForgotten,
    GroupSaved,
    InvalidEvent,
    NewEvent,
    TaskForgotten,
    TaskState,
)
from ledger.store.base import Checkpoint
from ledger.store.schema import events as events_table
from tests.relay_process import HORIZON_WAIT


def wait_visible(ledger: Ledger, count: int) -> None:
    """Followers see an event once no older transaction is open anywhere on the
    server (PostgreSQL xids are cluster-wide): wait, bounded, for ``count`` events."""
    deadline = time.monotonic() + HORIZON_WAIT
    while len(ledger.read_from(0, limit=count + 1)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} events became visible"
        time.sleep(0.05)


class LogContract:
    """Cases every dialect must pass. Subclasses provide the ``url`` fixture."""

    @pytest.fixture
    def ledger(self, url) -> Ledger:
        return Ledger.open(url)

    def test_append_assigns_positions_and_stream_versions(self, ledger):
        result = ledger.append(
            [TaskState(task_id="a", status="STARTED"), TaskState(task_id="b", status="STARTED"),
             TaskState(task_id="a", status="SUCCESS")]
        )
        got = [(e.stream_id, e.stream_version) for e in result.recorded]
        assert got == [("task:a", 1), ("task:b", 1), ("task:a", 2)]
        positions = [e.position for e in result.recorded]
        assert positions == sorted(positions) and len(set(positions)) == 3

    def test_appending_the_same_event_id_twice_writes_one_row(self, ledger):
        event = NewEvent(TaskState(task_id="a", status="STARTED"), event_id=uuid.uuid4())
        first = ledger.append([event])
        second = ledger.append([event, NewEvent(TaskState(task_id="a", status="SUCCESS"))])
        assert len(first.recorded) == 1
        assert second.duplicates == [event.event_id]
        assert [e.data.status for e in ledger.history("a")] == ["STARTED", "SUCCESS"]
        assert [e.stream_version for e in ledger.history("a")] == [1, 2]

    def test_expected_version_conflict_is_a_clear_error_and_writes_nothing(self, ledger):
        ledger.append([TaskState(task_id="a", status="STARTED")])
        with pytest.raises(VersionConflict, match=r"stream 'task:a': expected version 0, the stream is at version 1"):
            ledger.append(
                [TaskState(task_id="b", status="STARTED"),
                 NewEvent(TaskState(task_id="a", status="SUCCESS"), expected_version=0)]
            )
        assert ledger.history("b") == []  # the whole batch rolled back
        ok = ledger.append([NewEvent(TaskState(task_id="a", status="SUCCESS"), expected_version=1)])
        assert ok.recorded[0].stream_version == 2

    def test_invalid_event_is_rejected_before_anything_is_written(self, ledger):
        bad = TaskState.model_construct(task_id="a", status="")
        with pytest.raises(InvalidEvent, match="field 'status'"):
            ledger.append([TaskState(task_id="ok", status="STARTED"), bad])
        assert ledger.history("ok") == []

    def test_read_from_pages_through_every_event_once_in_order(self, ledger):
        for i in range(25):
            ledger.append([TaskState(task_id=f"t{i}", status="STARTED")])
        wait_visible(ledger, 25)
        seen, cp = [], Checkpoint(0, 0)
        while batch := ledger.read_from(cp, limit=7):
            seen += batch
            cp = Checkpoint(batch[-1].tx_id, batch[-1].position)
        assert [e.stream_id for e in seen] == [f"task:t{i}" for i in range(25)]
        assert ledger.read_from(seen[9].position, limit=3) == seen[10:13]

    def test_a_read_count_past_sqls_largest_integer_reads_all_and_a_count_below_1_is_refused(self, ledger):
        """SQLite's driver raised OverflowError past 2**63 - 1; a negative limit read
        everything on SQLite and was an error on PostgreSQL."""
        ledger.append([TaskState(task_id=f"t{i}", status="STARTED") for i in range(3)])
        wait_visible(ledger, 3)
        assert len(ledger.read_from(0, limit=10**20)) == 3
        for bad in (0, -1, 2.5, True):
            with pytest.raises(ValueError, match=f"limit must be a whole number of at least 1, not {bad!r}"):
                ledger.read_from(0, limit=bad)
        with pytest.raises(ValueError, match="batch must be a whole number of at least 1, not 0"):
            next(ledger.follow(0, batch=0))
        stop = threading.Event()
        got = []
        for event in ledger.follow(0, batch=10**20, stop=stop, idle_timeout=0):
            got.append(event)
        assert len(got) == 3

    def test_state_as_of_a_position_past_sqls_largest_integer_is_the_latest(self, ledger):
        """``task_meta(as_of=10**20)`` was an OverflowError on SQLite (the CLI and web
        clamped it; the Python API did not)."""
        ledger.append([TaskState(task_id="t", status="STARTED")])
        ledger.append([TaskState(task_id="t", status="SUCCESS")])
        assert ledger.task_meta("t", as_of=10**20).status == "SUCCESS"
        assert ledger.task_meta("t", as_of=1).status == "STARTED"

    def test_read_stream_returns_the_stream_in_version_order(self, ledger):
        ledger.append([TaskState(task_id="a", status=s) for s in ("STARTED", "RETRY", "STARTED")])
        ledger.append([TaskState(task_id="z", status="STARTED")])
        assert [e.data.status for e in ledger.read_stream("task:a")] == ["STARTED", "RETRY", "STARTED"]

    def test_read_streams_until_reads_each_stream_up_to_its_own_position(self, ledger):
        a = ledger.append([TaskState(task_id="a", status=s) for s in ("STARTED", "RETRY", "SUCCESS")])
        b = ledger.append([TaskState(task_id="b", status=s) for s in ("STARTED", "SUCCESS")])
        ledger.append([TaskState(task_id="c", status="STARTED")])
        until = {"task:a": a.recorded[1].position, "task:b": b.recorded[1].position, "task:none": 10**9}
        got = ledger.read(lambda c: ledger.log.read_streams_until(c, until, chunk=2))
        assert {k: [e.data.status for e in v] for k, v in got.items()} == {
            "task:a": ["STARTED", "RETRY"], "task:b": ["STARTED", "SUCCESS"], "task:none": []
        }

    def database_clock(self, ledger: Ledger) -> datetime:
        """The clock ``recorded_at`` is read from on this dialect."""
        raise NotImplementedError

    def test_recorded_at_is_database_time_in_utc(self, ledger):
        before = self.database_clock(ledger)
        e = ledger.append([TaskState(task_id="a", status="STARTED")]).recorded[0]
        after = self.database_clock(ledger)
        stored = ledger.history("a")[0]
        assert stored.recorded_at.utcoffset().total_seconds() == 0
        assert stored.recorded_at == e.recorded_at
        assert before <= stored.recorded_at <= after

    def test_writer_reads_its_own_writes(self, ledger):
        for status in ("STARTED", "RETRY", "STARTED", "FAILURE"):
            ledger.append([TaskState(task_id="a", status=status)])
            assert ledger.task_meta("a").status == status

    def test_success_is_sticky_in_the_projection_but_kept_in_the_log(self, ledger):
        ledger.append([TaskState(task_id="a", status="SUCCESS")])
        ledger.append([TaskState(task_id="a", status="FAILURE")])
        assert ledger.task_meta("a").status == "SUCCESS"
        assert [e.data.status for e in ledger.history("a")] == ["SUCCESS", "FAILURE"]

    def test_unknown_task_has_no_projection_row(self, ledger):
        assert ledger.task_meta("never-seen") is None

    def test_forget_is_a_tombstone_and_a_later_store_starts_a_new_life(self, ledger):
        ledger.append([TaskState(task_id="a", status="SUCCESS")])
        ledger.append([TaskForgotten(task_id="a")])
        assert ledger.task_meta("a") is None
        assert [e.type for e in ledger.history("a")] == ["task.state", "task.forgotten"]
        ledger.append([TaskState(task_id="a", status="STARTED")])
        assert ledger.task_meta("a").status == "STARTED"

    def test_ready_states_carry_done_at(self, ledger):
        ledger.append([TaskState(task_id="a", status="STARTED")])
        assert ledger.task_meta("a").done_at is None
        e = ledger.append([TaskState(task_id="a", status="FAILURE")]).recorded[0]
        assert ledger.task_meta("a").done_at == e.recorded_at

    def test_group_saved_twice_is_one_row_and_forget_removes_it(self, ledger):
        members = [["t1", None], ["t2", None]]
        ledger.append([GroupSaved(group_id="g", result=members)])
        ledger.append([GroupSaved(group_id="g", result=members)])
        assert ledger.group("g").result == members
        ledger.append([GroupForgotten(group_id="g")])
        assert ledger.group("g") is None

    def test_redelivered_chord_part_fires_body_once(self, ledger):
        ledger.append([ChordStarted(chord_id="c", size=3)])
        fired = [
            ledger.return_chord_part("c", t, "SUCCESS")
            for t in ("p1", "p1", "p2", "p2", "p1", "p3", "p3", "p2")
        ]
        assert fired == [False, False, False, False, False, True, False, False]
        state = ledger.chord("c")
        assert state.returned == 3 and state.complete and state.fired_position is not None

    def test_chord_part_returned_before_the_chord_started_still_counts(self, ledger):
        assert ledger.return_chord_part("c", "p1", "SUCCESS") is False
        ledger.append([ChordStarted(chord_id="c", size=1)])
        assert ledger.chord("c").complete and ledger.chord("c").fired_position is None
        # the part's redelivery finds the chord complete and unclaimed: it claims
        assert ledger.return_chord_part("c", "p1", "SUCCESS") is True
        assert ledger.return_chord_part("c", "p1", "SUCCESS") is False

    def test_a_part_returning_to_a_complete_unclaimed_chord_claims_the_body_once(self, ledger):
        """The completer died after committing its part but before claiming the body:
        the next part to return (its redelivery, or any other) claims, once."""
        ledger.append([ChordStarted(chord_id="c", size=1)])
        part_id = ChordPartReturned.deterministic_event_id("c", "p1")
        ledger.append([NewEvent(ChordPartReturned(chord_id="c", task_id="p1", status="SUCCESS"), part_id)])
        assert ledger.chord("c").complete and ledger.chord("c").fired_position is None
        assert ledger.return_chord_part("c", "p1", "SUCCESS") is True
        assert ledger.return_chord_part("c", "p1", "SUCCESS") is False
        assert ledger.return_chord_part("c", "p2", "SUCCESS") is False
        fired = [e for e in ledger.chord_events("c") if e.type == "chord.fired"]
        assert len(fired) == 1

    def test_as_of_position_replays_the_stream(self, ledger):
        recorded = [
            ledger.append([TaskState(task_id="a", status=s)]).recorded[0]
            for s in ("STARTED", "RETRY", "SUCCESS")
        ]
        for event in recorded:
            assert ledger.task_meta("a", as_of=event.position).status == event.data.status
        assert ledger.task_meta("a", as_of=recorded[0].position - 1) is None

    def test_as_of_time_replays_the_stream(self, ledger):
        recorded = [
            ledger.append([TaskState(task_id="a", status=s)]).recorded[0]
            for s in ("STARTED", "SUCCESS")
        ]
        assert ledger.task_meta("a", as_of=recorded[0].recorded_at).status == "STARTED"
        assert ledger.task_meta("a", as_of=recorded[1].recorded_at).status == "SUCCESS"

    def test_events_are_never_updated_only_appended(self, ledger):
        ledger.append([TaskState(task_id="a", status="STARTED")])
        before = ledger.history("a")[0]
        ledger.append([TaskState(task_id="a", status="SUCCESS"), TaskForgotten(task_id="a")])
        assert ledger.history("a")[0] == before
        with ledger.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(events_table)).scalar() == 3


class TestLogOnSQLite(LogContract):
    @pytest.fixture
    def url(self, sqlite_url):
        return sqlite_url

    def database_clock(self, ledger: Ledger) -> datetime:
        # SQLite runs inside the writer: its time is the writer's clock, read while
        # the writer holds the database lock (SQLite's own 'now' has only ms).
        return datetime.now(timezone.utc)


@pytest.mark.postgres
class TestLogOnPostgres(LogContract):
    @pytest.fixture
    def url(self, pg_url):
        return pg_url

    def database_clock(self, ledger: Ledger) -> datetime:
        # clock_timestamp(), not now(): the server's clock at this statement
        with ledger.engine.connect() as conn:
            return conn.execute(sa.text("SELECT clock_timestamp()")).scalar_one()

    def test_follow_order_is_transaction_then_position(self, ledger):
        for i in range(5):
            ledger.append([TaskState(task_id=f"t{i}", status="STARTED")])
        wait_visible(ledger, 5)
        events = ledger.read_from(0)
        keys = [(e.tx_id, e.position) for e in events]
        assert keys == sorted(keys) and all(tx > 0 for tx, _ in keys)

    def test_parts_returned_at_once_fire_each_chord_exactly_once(self, ledger):
        """The last parts of a chord returned at the same moment by different workers
        (threads here, each on its own connection): a part's transaction does not see
        another's uncommitted part, so when both complete the chord at once each finds
        it complete only after its own commit. Every chord is claimed exactly once."""
        chords, parts = 60, 3
        ledger.append([ChordStarted(chord_id=f"c{c}", size=parts) for c in range(chords)])
        barrier = threading.Barrier(parts)
        claims: dict[int, list[bool]] = {c: [] for c in range(chords)}
        errors: list[BaseException] = []

        def worker(p: int) -> None:
            try:
                for c in range(chords):
                    barrier.wait(timeout=60)
                    claimed, _ = ledger.return_chord_part_read(
                        f"c{c}", f"c{c}-p{p}", "SUCCESS",
                        result=TaskState(task_id=f"c{c}-p{p}", status="SUCCESS"),
                    )
                    claims[c].append(claimed)
            except BaseException as exc:  # reported below, not lost with the thread
                errors.append(exc)
                barrier.abort()

        threads = [threading.Thread(target=worker, args=(p,)) for p in range(parts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert {c: sum(got) for c, got in claims.items()} == dict.fromkeys(range(chords), 1)
        fired = {c: [e.type for e in ledger.chord_events(f"c{c}")].count("chord.fired") for c in range(chords)}
        assert fired == dict.fromkeys(range(chords), 1)

    def test_an_open_transaction_in_another_database_does_not_hold_followers_back(self, ledger):
        """xids are the server's: a transaction of another database (another
        application's, on a shared server) is in every snapshot, but cannot write
        this log, so the follow horizon passes it by."""
        import psycopg

        from tests.conftest import PG_SERVER, _libpq

        with psycopg.connect(_libpq(PG_SERVER) + "/postgres") as other:
            other.execute("SELECT pg_current_xact_id()")  # an xid, held open until the with ends
            ledger.append([TaskState(task_id="during", status="STARTED")])
            assert [e.stream_id for e in ledger.read_from(0)] == ["task:during"]
            assert ledger.follower_lag()["held_back"] == 0

    def test_an_open_transaction_holds_followers_back_until_it_commits(self, ledger):
        ledger.append([TaskState(task_id="before", status="STARTED")])
        wait_visible(ledger, 1)
        with ledger.engine.connect() as conn:
            tx = conn.begin()
            conn.execute(sa.text("SELECT pg_current_xact_id()"))  # an xid, like any writer
            ledger.append([TaskState(task_id="after", status="STARTED")])
            visible = [e.stream_id for e in ledger.read_from(0)]
            assert "task:after" not in visible
            assert ledger.follower_lag()["held_back"] >= 1
            tx.commit()
        # xids are cluster-wide: a transaction in another database on the same
        # server may hold the horizon a moment longer, so wait for it (bounded).
        deadline = time.monotonic() + HORIZON_WAIT
        while [e.stream_id for e in ledger.read_from(0)] != ["task:before", "task:after"]:
            assert time.monotonic() < deadline, "committed events never became visible"
            time.sleep(0.05)
