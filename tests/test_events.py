import pytest

from ledger import events
from ledger.events import ChordPartReturned, TaskState


def test_invalid_event_error_names_the_field():
    with pytest.raises(events.InvalidEvent, match=r"field 'status'"):
        events.make("task.state", task_id="t", status="")


def test_unknown_field_is_rejected():
    with pytest.raises(events.InvalidEvent, match=r"field 'colour'"):
        events.make("task.state", task_id="t", status="SUCCESS", colour="red")


def test_overlong_task_id_names_the_field_and_the_limit():
    with pytest.raises(events.InvalidEvent, match="field 'task_id': .*the limit is 255"):
        TaskState(task_id="x" * 256, status="SUCCESS")


def test_unknown_event_type_is_rejected():
    with pytest.raises(events.InvalidEvent, match="unknown event type 'task.exploded'"):
        events.make("task.exploded", task_id="t")


def test_every_event_type_has_a_schema_version_and_a_stream():
    for name, cls in events.EVENT_TYPES.items():
        assert cls.type == name
        assert cls.schema_version >= 1
        assert cls.stream_prefix in {"task", "group", "chord", "part", "ledger"}


def test_payload_round_trips_through_the_codec():
    e = TaskState(task_id="t1", status="FAILURE", traceback="Traceback...", retries=2,
                  children=[[["c1", None], None]], exc_type="ValueError", exc_message="bad")
    assert events.decode(e.type, e.schema_version, events.encode(e)) == e


def test_decoding_a_newer_schema_version_is_refused():
    e = TaskState(task_id="t1", status="SUCCESS")
    with pytest.raises(events.CorruptEvent, match="newer than this code"):
        events.decode(e.type, 99, events.encode(e))


def test_redelivered_chord_part_has_the_same_event_id():
    a = ChordPartReturned.deterministic_event_id("chord-1", "task-1")
    assert a == ChordPartReturned.deterministic_event_id("chord-1", "task-1")
    assert a != ChordPartReturned.deterministic_event_id("chord-1", "task-2")
