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


def test_decoding_validates_in_pydantic_core_without_the_builders_init(monkeypatch):
    """A stored payload is validated by pydantic-core alone: the models' __init__
    (which words a builder's errors and escapes exception text) is not called,
    ~5 µs a payload (rebuild checks one per task). A pydantic that stops honouring
    the mark on __init__ fails here, not silently in the benchmark."""
    payload = events.encode(TaskState(task_id="t", status="SUCCESS", name="n"))
    calls = []
    monkeypatch.setattr(events.EventData, "__init__", lambda self, **kw: calls.append(kw))
    for cls in events.EVENT_TYPES.values():
        assert not cls.__pydantic_custom_init__, cls
    decoded = events.decode("task.state", 1, payload)
    assert (decoded.task_id, decoded.status, decoded.name, calls) == ("t", "SUCCESS", "n", [])
    assert decoded._validated  # appended again as is: not validated a second time


def test_a_corrupt_payload_names_the_field_and_an_id_its_problem():
    from ledger import codec

    with pytest.raises(events.CorruptEvent, match="cannot decode task.state payload: .*field 'status': Field required"):
        events.decode("task.state", 1, codec.dumps({"task_id": "t"}))
    with pytest.raises(events.CorruptEvent, match="field 'task_id': must not be empty"):
        events.decode("task.state", 1, codec.dumps({"task_id": "", "status": "SUCCESS"}))
    with pytest.raises(events.InvalidEvent, match="field 'group_id': is not valid Unicode text"):
        events.GroupSaved(group_id="g\udcff", result=[])


def test_exception_text_with_a_lone_surrogate_is_escaped_when_an_event_is_built():
    state = TaskState(task_id="t", status="FAILURE", exc_type="E\udcff", exc_message="m\ud800", traceback="tb")
    assert (state.exc_type, state.exc_message) == ("E\\udcff", "m\\ud800")
    assert events.decode("task.state", 1, events.encode(state)).exc_type == "E\\udcff"
