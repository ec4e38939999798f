"""Event models: what the log records, one pydantic model per event type.

Every model is the *payload* of one log row. The envelope (position, event_id,
stream, version, time) is :class:`RecordedEvent`. Payloads are validated on the
way in, so an invalid event is rejected with an error naming the field before
anything is written.

This module is pure: it imports neither SQLAlchemy nor Kafka.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from ledger import codec
from ledger.errors import CorruptEvent, InvalidEvent

#: Longest task/group/chord id the projection tables accept (column limit).
MAX_ID_LENGTH = 255
#: Longest state name (Celery's own states are at most 8; custom states may be longer).
MAX_STATE_LENGTH = 50
#: Lifecycle states the ledger records before Celery's own (never reported to Celery).
SENT = "SENT"
RECEIVED = "RECEIVED"

#: A task, group or chord id: 1 to :data:`MAX_ID_LENGTH` characters (the column's
#: limit), checked by pydantic-core itself; an id with a lone surrogate is refused
#: here too, naming the field (no database can store it).
Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]
#: pydantic's error types for an id out of those bounds, as :func:`_describe` words them.
_ID_ERRORS = {"string_too_short", "string_too_long", "string_unicode"}

#: Stream kinds: what a stream id's prefix says its events are about. A chord's
#: returned parts are each in a stream of their own (``part:<task id>``), not in
#: the chord's: parts returned at once by different workers then never wait for
#: each other (see :class:`ChordPartReturned`).
TASK, GROUP, CHORD, PART, MAINTENANCE = "task", "group", "chord", "part", "ledger"


def stream_id(kind: str, key: str) -> str:
    """The stream of ``key`` (a task, group or chord id): ``task:<id>``, ``group:<id>``..."""
    return f"{kind}:{key}"


def stream_key(stream: str) -> str:
    """The id a stream is about (``task:t1`` -> ``t1``)."""
    return stream.split(":", 1)[1]


def stream_kind(stream: str) -> str:
    """The kind of a stream (``task:t1`` -> ``task``)."""
    return stream.split(":", 1)[0]


class Encoded(BaseModel):
    """A value serialized with the Celery app's result serializer.

    Results, args and kwargs are stored exactly as the app encoded them, with the
    content type, so that reading them back honours the app's ``accept_content``
    (a pickle payload is never unpickled by an app that did not accept pickle).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    content_type: str
    content_encoding: str = "utf-8"
    data: bytes


class EventData(BaseModel):
    """Base of all payload models."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)

    type: ClassVar[str]
    schema_version: ClassVar[int] = 1
    stream_prefix: ClassVar[str]

    def __init__(self, **fields: Any) -> None:
        # Building an event is how callers (the Celery backend, tools) hand data to
        # the ledger: a bad field must be the ledger's own error, naming the field.
        for name in type(self)._escaped_text:
            value = fields.get(name)
            if type(value) is str:
                fields[name] = _utf8_text(value)
        try:
            super().__init__(**fields)
        except ValidationError as exc:
            raise InvalidEvent(_describe(self.type, exc)) from None

    # pydantic calls a model's own __init__ from model_validate too, unless it is
    # marked as its base one: decoding a stored payload (rebuild's check of every
    # task's, verify's of every event, a history) then validates in pydantic-core
    # alone: a task state's payload decoded and validated in 9.3 against 14.8 µs
    # (measured, 20,000 stored SUCCESS payloads). Building still goes through the
    # __init__ above. tests/test_events.py checks that the mark holds.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def model_construct(cls, _fields_set: set[str] | None = None, **values: Any) -> Any:
        made = super().model_construct(_fields_set, **values)
        made._validated = False
        return made

    # False only for instances made with model_construct(), which skips validation.
    _validated: bool = PrivateAttr(default=True)
    #: Text fields escaped by :func:`_utf8_text` when an event is built here. Not on
    #: decode (``model_validate``): msgpack's strict UTF-8 never yields a lone surrogate.
    _escaped_text: ClassVar[tuple[str, ...]] = ()

    @property
    def stream_key(self) -> str:
        """The id this event is about (task, group or chord id)."""
        raise NotImplementedError

    @property
    def stream_id(self) -> str:
        return stream_id(self.stream_prefix, self.stream_key)

    # Columns lifted out of the payload so projections can be rebuilt set-based
    # in SQL without decoding msgpack (see ledger/store/schema.py).
    def index_columns(self) -> dict[str, Any]:
        return {}


#: Fields that become text columns of the log or the catalogue (ids, names, states,
#: node names, queues): PostgreSQL's text cannot hold a NUL character.
_TEXT_COLUMNS = frozenset({
    "task_id", "group_id", "chord_id", "status", "name", "worker", "hostname", "queue",
    "parent_id", "root_id", "exc_type",
})
#: Fields that become 4-byte integer columns (the catalogue's ``retries``, the
#: log's ``chord_size``).
_INT_COLUMNS = frozenset({"retries", "size"})
_INT_RANGE = range(-(2**31), 2**31)


def _check_columns(type_: str, fields: dict[str, Any]) -> None:
    """Refuse, naming the field, a value no database column of the ledger can hold.

    Checked where a new event is encoded for the log (:func:`encode`), not where one
    is built or read back (pydantic runs ``__init__`` on decode too): an event
    stored before this check (SQLite took a NUL) still decodes. The rule is the same on
    every database, so that a log stays movable between them (``export``, a
    rebuild elsewhere); PostgreSQL's own refusal was a bare ``DataError``.
    """
    for name, value in fields.items():
        if name in _TEXT_COLUMNS and isinstance(value, str) and "\x00" in value:
            raise InvalidEvent(
                f"invalid {type_} event: field {name!r}: contains a NUL character (\\x00),"
                " which the ledger's databases cannot store in a text column"
            )
        if name in _INT_COLUMNS and isinstance(value, int) and value not in _INT_RANGE:
            raise InvalidEvent(
                f"invalid {type_} event: field {name!r}: {value} is out of range"
                f" ({_INT_RANGE.start} to {_INT_RANGE.stop - 1})"
            )


def exception_summary(value: Any) -> tuple[str | None, str | None]:
    """Type and message of Celery's exception dict (``{"exc_type", "exc_message", ...}``),
    as a task state's ``exc_type``/``exc_message`` carry them; ``(None, None)`` for
    anything else. The message is Celery's ``exc_message`` (the exception's args)
    as ``str(exc)`` shows a one-argument exception: one argument as itself,
    several joined by ", "."""
    if not isinstance(value, dict) or "exc_type" not in value:
        return None, None
    message = value.get("exc_message")
    if isinstance(message, list | tuple):
        message = ", ".join(str(m) for m in message)
    return str(value["exc_type"]), None if message is None else str(message)


def result_node(node: Any) -> tuple[str, Any] | None:
    """One node of Celery's ``as_tuple()`` form as ``(id, members)``, None if it is none.

    ``AsyncResult.as_tuple()`` is ``((id, parent), None)``; ``GroupResult``'s is
    ``((id, parent), [member nodes])`` (lists after a round trip through the codec).
    """
    if (isinstance(node, list | tuple) and len(node) == 2 and isinstance(node[0], list | tuple)
            and node[0] and isinstance(node[0][0], str)):
        return node[0][0], node[1]
    return None


def _utf8_text(value: str | None) -> str | None:
    r"""Exception text as UTF-8 can hold it: a lone surrogate (a file name decoded with
    ``surrogateescape``, a JSON ``"\ud800"``) becomes its escape, ``\udcff``.

    msgpack, SQLite and PostgreSQL all refuse a lone surrogate: kept raw, the failure
    itself could not be stored (``BackendStoreError`` in place of the task's own
    exception). Only these audit summaries are escaped: the exception ``get()``
    raises is the result, which the app's serializer keeps exactly (JSON escapes it).
    """
    return None if value is None else value.encode("utf-8", "backslashreplace").decode("utf-8")


class _TaskEvent(EventData):
    stream_prefix: ClassVar[str] = TASK
    task_id: Id

    @property
    def stream_key(self) -> str:
        return self.task_id


class TaskState(_TaskEvent):
    """A task reached a state (PENDING, STARTED, RETRY, SUCCESS, FAILURE, REVOKED or custom)."""

    type: ClassVar[str] = "task.state"

    status: str = Field(min_length=1, max_length=MAX_STATE_LENGTH)
    result: Encoded | None = None
    traceback: str | None = None
    children: list[Any] | None = None
    date_done: datetime | None = None
    # Celery's result_extended fields. A worker's store gives name, worker, retries and
    # queue from its request either way; args and kwargs only with result_extended.
    name: str | None = None
    args: Encoded | None = None
    kwargs: Encoded | None = None
    worker: str | None = None
    retries: int | None = None
    queue: str | None = None
    parent_id: str | None = None
    group_id: str | None = None
    root_id: str | None = None
    # Summary of an exception for audit tools that cannot decode ``result``.
    exc_type: str | None = None
    exc_message: str | None = None

    _escaped_text: ClassVar[tuple[str, ...]] = ("traceback", "exc_type", "exc_message")

    def index_columns(self) -> dict[str, Any]:
        # ref_id: the group the task is a member of (indexed), so a timeline finds
        # a group's members -- and the chord body, which carries the header's
        # group id -- without scanning payloads.
        return {"task_state": self.status, "ref_id": self.group_id}


class TaskSent(_TaskEvent):
    """The task's message was handed to the broker (Celery's ``after_task_publish``).

    Appended by the publishing process (``ledger_track_sent``). Never a Celery
    state: ``AsyncResult.state`` stays PENDING until the worker stores one
    (see :mod:`projections.lifecycle`). A retry republishes the task, so a
    task has one SENT per attempt (``retries`` tells them apart).
    """

    type: ClassVar[str] = "task.sent"

    name: str = Field(min_length=1)
    #: the publisher's clock when the message was handed to the broker
    sent_at: datetime
    #: the publisher's node name (Celery's ``origin`` header)
    hostname: str | None = None
    queue: str | None = None
    routing_key: str | None = None
    exchange: str | None = None
    #: when it may run (``countdown`` and ``eta`` both arrive as an ETA)
    eta: datetime | None = None
    expires: datetime | None = None
    retries: int = Field(default=0, ge=0)
    parent_id: str | None = None
    root_id: str | None = None
    group_id: str | None = None
    #: as the extended result stores them: encoded, redacted; None when not encodable
    args: Encoded | None = None
    kwargs: Encoded | None = None

    def index_columns(self) -> dict[str, Any]:
        return {"task_state": SENT}

    @property
    def countdown(self) -> float | None:
        """Seconds from publishing to the ETA (what ``countdown=`` asked for)."""
        return None if self.eta is None else (self.eta - self.sent_at).total_seconds()


class TaskReceived(_TaskEvent):
    """A worker took the task's message from the broker (Celery's ``task_received``).

    Appended by the worker's consumer (``ledger_track_received``); for an ETA
    task that is when it was received, and ``due_at`` is when it became due.
    """

    type: ClassVar[str] = "task.received"

    name: str | None = None
    #: the worker's node name
    hostname: str | None = None
    retries: int = Field(default=0, ge=0)
    due_at: datetime | None = None

    def index_columns(self) -> dict[str, Any]:
        return {"task_state": RECEIVED}


class TaskForgotten(_TaskEvent):
    """``AsyncResult.forget()``: a tombstone. The projection row goes, the history stays."""

    type: ClassVar[str] = "task.forgotten"


class ResultExpired(_TaskEvent):
    """``result_expires`` / ``backend.cleanup()`` dropped this task's result."""

    type: ClassVar[str] = "results.expired"
    expired_before: datetime


class _GroupEvent(EventData):
    stream_prefix: ClassVar[str] = GROUP
    group_id: Id

    @property
    def stream_key(self) -> str:
        return self.group_id


class GroupSaved(_GroupEvent):
    """``GroupResult.save()``: the group's membership (Celery's ``as_tuple()`` form)."""

    type: ClassVar[str] = "group.saved"
    result: Any


class GroupForgotten(_GroupEvent):
    type: ClassVar[str] = "group.forgotten"


class GroupExpired(_GroupEvent):
    type: ClassVar[str] = "group.expired"
    expired_before: datetime


class _ChordEvent(EventData):
    stream_prefix: ClassVar[str] = CHORD
    chord_id: Id

    @property
    def stream_key(self) -> str:
        return self.chord_id


class ChordApplied(_ChordEvent):
    """``apply_chord``: the chord was applied, before any header task was sent.

    Each one begins a new life of the chord: a frozen chord applied again reuses
    its group id and its header task ids, and is a new run whose parts count
    afresh and whose body fires again (as a task's new life after ``forget``).
    """

    type: ClassVar[str] = "chord.applied"


class ChordStarted(_ChordEvent):
    """The chord's header was applied with ``size`` parts (``set_chord_size``/``apply_chord``)."""

    type: ClassVar[str] = "chord.started"
    size: int = Field(ge=0)
    body: Any = None

    def index_columns(self) -> dict[str, Any]:
        return {"chord_size": self.size}


class ChordPartAdded(_ChordEvent):
    """``add_to_chord``: the header grew by one task."""

    type: ClassVar[str] = "chord.part_added"
    task_id: Id


    def index_columns(self) -> dict[str, Any]:
        return {"ref_id": self.task_id, "chord_size": 1}


class ChordPartReturned(_ChordEvent):
    """A header task returned (any ready state). Counted once per distinct ``task_id``
    in each life of the chord.

    Appended to the part's own stream, ``part:<task id>``, with the chord's id in
    ``ref_id``: each part's transaction writes a stream of its own, so the parts
    of one chord commit side by side, and the only thing serialized per chord is
    the claim (``chord.fired``, in the chord's stream). Logs written before
    revision 0005 hold parts in the chord's stream, with the task id in
    ``ref_id``; both fold alike, by the chord and task ids of the payload.
    """

    stream_prefix: ClassVar[str] = PART
    type: ClassVar[str] = "chord.part_returned"
    task_id: Id
    status: str = Field(min_length=1, max_length=MAX_STATE_LENGTH)
    #: the part's place in the header (Celery's ``group_index``): orders the body's
    #: input when no header group was saved (a generator header is never unrolled)
    group_index: int | None = Field(default=None, ge=0)


    @property
    def stream_key(self) -> str:
        return self.task_id

    def index_columns(self) -> dict[str, Any]:
        return {"ref_id": self.chord_id, "task_state": self.status}

    @staticmethod
    def deterministic_event_id(chord_id: str, task_id: str, life: int | None = None) -> uuid.UUID:
        """The same part returning twice (redelivery) is the same event: a no-op.

        ``life`` (the position of the ``chord.applied`` event that began the
        chord's current life) tells a later life's return of the same task apart;
        None is the chord's first life.
        """
        key = f"{chord_id}\x00{task_id}" + ("" if life is None else f"\x00{life}")
        return uuid.uuid5(_PART_NAMESPACE, key)


class ChordFired(_ChordEvent):
    """The chord's body was sent (after the part that completed the chord returned)."""

    type: ClassVar[str] = "chord.fired"
    body_task_id: str | None = None

    def index_columns(self) -> dict[str, Any]:
        # The body's id, indexed: a body that failed before it ran (a header part
        # failed) has one FAILURE event with no links; this is how timeline finds
        # its chord.
        return {"ref_id": self.body_task_id}

    @staticmethod
    def deterministic_event_id(chord_id: str, completed_by: uuid.UUID) -> uuid.UUID:
        """One claim per completion: the event id of the part that completed the chord
        names the chord's life, so each life's body is claimed once. (The id, not the
        part's position: it is known before the part is appended, so the part and
        its claim go to the database together.)"""
        return uuid.uuid5(_PART_NAMESPACE, f"{chord_id}\x00fired\x00{completed_by}")


class LogPruned(EventData):
    """``celery-ledger prune``: events recorded before ``before`` were physically deleted."""

    stream_prefix: ClassVar[str] = MAINTENANCE
    type: ClassVar[str] = "ledger.pruned"
    before: datetime
    events_deleted: int = Field(ge=0)
    streams: list[str] = Field(default_factory=list)

    @property
    def stream_key(self) -> str:
        return "maintenance"


_PART_NAMESPACE = uuid.UUID("6f1b1c2e-8d1e-4a55-9d0c-0c6b7c3f1a10")

EVENT_TYPES: dict[str, type[EventData]] = {
    cls.type: cls
    for cls in (
        TaskState,
        TaskSent,
        TaskReceived,
        TaskForgotten,
        ResultExpired,
        GroupSaved,
        GroupForgotten,
        GroupExpired,
        ChordApplied,
        ChordStarted,
        ChordPartAdded,
        ChordPartReturned,
        ChordFired,
        LogPruned,
    )
}

#: A task's lifecycle before Celery's states: never a Celery state, never notifying.
LIFECYCLE_TYPES = frozenset({TaskSent.type, TaskReceived.type})

#: Types that end a task's (or group's) current life: the projection row goes.
TOMBSTONE_TYPES = frozenset(
    {TaskForgotten.type, ResultExpired.type, GroupForgotten.type, GroupExpired.type}
)


@dataclass(frozen=True)
class NewEvent:
    """An event to append.

    ``expected_version`` is optimistic concurrency: the stream's version before
    this event must equal it, or the append fails with
    :class:`ledger.errors.VersionConflict`. ``None`` appends at the end.
    """

    data: EventData
    event_id: uuid.UUID = field(default_factory=uuid.uuid4)
    expected_version: int | None = None

    @property
    def stream_id(self) -> str:
        return self.data.stream_id


@dataclass(frozen=True)
class RecordedEvent:
    """An event as the log stores it. ``data`` is decoded from ``payload`` on first use."""

    position: int
    event_id: uuid.UUID
    stream_id: str
    stream_version: int
    type: str
    schema_version: int
    recorded_at: datetime
    payload: bytes
    tx_id: int = 0
    _data: list = field(default_factory=list, repr=False, compare=False)

    @property
    def data(self) -> EventData:
        """The payload's model; :class:`CorruptEvent` naming the log position if it is none."""
        if not self._data:
            try:
                self._data.append(decode(self.type, self.schema_version, self.payload))
            except CorruptEvent as exc:
                raise CorruptEvent(
                    f"corrupt event at log position {self.position} ({self.stream_id}): {exc}"
                ) from None
        return self._data[0]

    @property
    def stream_key(self) -> str:
        return stream_key(self.stream_id)


def validate(data: EventData) -> EventData:
    """The payload, validated: models built with ``model_construct`` are checked now."""
    if data._validated:
        return data
    try:
        return type(data).model_validate(data.model_dump())
    except ValidationError as exc:
        raise InvalidEvent(_describe(type(data).type, exc)) from None


def make(type_: str, **fields: Any) -> EventData:
    """Build a payload by type name; raises :class:`InvalidEvent` naming the bad field."""
    try:
        cls = EVENT_TYPES[type_]
    except KeyError:
        raise InvalidEvent(f"unknown event type {type_!r}") from None
    return cls(**fields)  # the model's __init__ raises InvalidEvent naming the field


def _id_message(err: Any) -> str | None:
    """An id's length error as the ledger words it (the limit is the database column's)."""
    field = err["loc"][-1] if err["loc"] else None
    if err["type"] not in _ID_ERRORS or field not in ("task_id", "group_id", "chord_id"):
        return None
    if err["type"] == "string_unicode":
        return "is not valid Unicode text (it holds a lone surrogate)"
    if not err["input"]:
        return "must not be empty"
    return f"is {len(err['input'])} characters long; the limit is {MAX_ID_LENGTH}"


def _describe(type_: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(event)"
        parts.append(f"field {where!r}: {_id_message(err) or err['msg']}")
    return f"invalid {type_} event: " + "; ".join(parts)


def encode(data: EventData) -> bytes:
    """A new event's payload (refused, naming the field, if a column could not hold it)."""
    fields = data.model_dump(mode="python")
    _check_columns(data.type, fields)
    return codec.dumps(fields)


def decode(type_: str, schema_version: int, payload: bytes) -> EventData:
    cls = EVENT_TYPES.get(type_)
    if cls is None:
        raise CorruptEvent(f"unknown event type {type_!r}")
    if schema_version > cls.schema_version:
        raise CorruptEvent(
            f"{type_} schema version {schema_version} is newer than this code ({cls.schema_version})"
        )
    try:
        return cls.model_validate(codec.loads(payload))
    except ValidationError as exc:
        raise CorruptEvent(f"cannot decode {type_} payload: {_describe(type_, exc)}") from None
    except codec.CodecError as exc:
        raise CorruptEvent(f"cannot decode {type_} payload: {exc}") from exc


def event_problem(type_: str, schema_version: int, payload: bytes) -> str | None:
    """Why a stored payload is not a valid ``type_`` event, or None if it is.

    The same check as the live path: the payload must decode into its pydantic
    model (valid msgpack is not enough: ``{"task_id": ...}`` without a state is
    no event). ~9 µs a task state, msgpack decode included.
    """
    try:
        decode(type_, schema_version, payload)
    except CorruptEvent as exc:
        return str(exc)
    return None


def fit_extras(event: TaskState, limit: int) -> TaskState:
    """``event`` with its audit extras cut until the whole is at most ``limit`` bytes encoded.

    Args and kwargs (result_extended) and the traceback are what the audit shows,
    not what ``get()`` returns: over the limit they are replaced by a marker
    naming their size (args/kwargs) or cut to their last lines (traceback), so a
    task with huge arguments still runs and its failure is still recorded. The
    result is never cut: an event still over the limit is refused by the append
    (:class:`EventTooLarge`).
    """
    extras = [v.data for v in (event.args, event.kwargs) if v is not None]
    cheap = sum(map(len, extras)) + len(event.traceback or "") + (
        len(event.result.data) if event.result is not None else 0
    )
    if cheap < limit // 2:  # the encoded whole cannot be over: skip encoding twice
        return event
    size = len(encode(event))
    if size <= limit:
        return event
    changes: dict[str, Any] = {}
    for name, empty in (("args", []), ("kwargs", {})):
        value = getattr(event, name)
        if value is not None and len(value.data) > 64:
            note = f"[{len(value.data)} bytes omitted: over ledger_max_payload_bytes]"
            marked = [note] if isinstance(empty, list) else {"omitted": note}
            changes[name] = Encoded(content_type="application/json", data=json.dumps(marked).encode())
    if event.traceback:
        over = size - limit + sum(len(getattr(event, n).data) for n in changes)
        keep = max(0, len(event.traceback.encode()) - over - 200)
        tail = event.traceback.encode()[-keep:].decode(errors="ignore") if keep else ""
        changes["traceback"] = (
            f"[traceback cut to its last {len(tail)} characters: over ledger_max_payload_bytes]\n{tail}"
        )
    return event.model_copy(update=changes) if changes else event


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
