"""Reading the log for people: ``history``, ``show --as-of``, ``export``.

Everything here is read-only. Results, args and kwargs are shown only when they
were serialized as JSON or msgpack; any other content type (pickle above all) is
never deserialized and appears as ``<pickle N bytes>``: reading an audit trail
must not execute what a task returned.
"""

from __future__ import annotations

import base64
import csv
import json
import math
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import msgpack
import sqlalchemy as sa

from ledger.errors import UnknownTask
from ledger.events import (
    RECEIVED,
    SENT,
    TASK,
    CorruptEvent,
    Encoded,
    LogPruned,
    RecordedEvent,
    ResultExpired,
    TaskForgotten,
    TaskReceived,
    TaskSent,
    TaskState,
    exception_summary,
    stream_id,
)
from ledger.output import csv_cell, json_text, terminal_safe
from ledger.store.base import SELECT_EVENTS, row_to_event

SUMMARY_WIDTH = 80

#: Content types decoded for display; everything else stays opaque bytes.
_SAFE_DECODERS = {
    "application/json": lambda data, enc: json.loads(data.decode(enc or "utf-8")),
    "application/x-msgpack": lambda data, enc: msgpack.unpackb(data, raw=False),
}
_OPAQUE_NAMES = {
    "application/x-python-serialize": "pickle",
    "application/x-yaml": "yaml",
    "application/data": "binary",
    "application/text": "text",
}


def decode_value(value: Encoded | None) -> tuple[bool, Any]:
    """``(True, value)`` for JSON/msgpack values, ``(False, "<pickle N bytes>")`` otherwise."""
    if value is None:
        return True, None
    decoder = _SAFE_DECODERS.get(value.content_type)
    if decoder is not None:
        try:
            return True, decoder(value.data, value.content_encoding)
        except (ValueError, UnicodeDecodeError, msgpack.UnpackException):
            return False, f"<undecodable {value.content_type} {len(value.data)} bytes>"
    kind = _OPAQUE_NAMES.get(value.content_type, value.content_type)
    return False, f"<{kind} {len(value.data)} bytes>"


def summarize(value: Encoded | None, width: int = SUMMARY_WIDTH) -> str:
    """A one-line, length-limited rendering of a stored value (never unpickled)."""
    if value is None:
        return ""
    decoded, shown = decode_value(value)
    if not decoded:
        return shown
    text = json.dumps(shown, default=str, ensure_ascii=False, separators=(",", ":"))
    return text if len(text) <= width else text[: width - 3] + "..."


def _exception(data: TaskState) -> tuple[str | None, str | None]:
    """Exception type and message: the event's summary fields, else Celery's exception dict."""
    if data.exc_type or data.exc_message:
        return data.exc_type, data.exc_message
    if data.status in ("FAILURE", "RETRY") and data.result is not None:
        decoded, value = decode_value(data.result)
        if decoded:
            return exception_summary(value)
    return None, None


def describe(event: RecordedEvent) -> dict[str, Any]:
    """One event of a task stream as a flat record (the row of ``history``)."""
    row: dict[str, Any] = {
        "position": event.position,
        "version": event.stream_version,
        "time": event.recorded_at.astimezone(timezone.utc).isoformat(),
        "event": event.type,
        "state": None,
        "name": None,
        "worker": None,
        "retries": None,
        "exc_type": None,
        "exc_message": None,
        "result": None,
        "args": None,
        "kwargs": None,
        "detail": None,  # SENT / RECEIVED: routing, countdown, due time
    }
    try:
        data = event.data
    except CorruptEvent as exc:
        row["state"] = "CORRUPT"
        row["exc_message"] = str(exc)
        return row
    if isinstance(data, TaskState):
        exc_type, exc_message = _exception(data)
        row.update(
            state=data.status,
            name=data.name,
            worker=data.worker,
            retries=data.retries,
            exc_type=exc_type,
            exc_message=exc_message,
            result=None if exc_type else (summarize(data.result) or None),
            args=_compact(data.args),
            kwargs=_compact(data.kwargs),
        )
    elif isinstance(data, TaskSent):
        row.update(state=SENT, name=data.name, retries=data.retries, detail=_sent_detail(data))
    elif isinstance(data, TaskReceived):
        row.update(state=RECEIVED, name=data.name, worker=data.hostname, retries=data.retries,
                   detail=f"due {data.due_at.isoformat()}" if data.due_at else None)
    elif isinstance(data, TaskForgotten):
        row["state"] = "FORGOTTEN"
    elif isinstance(data, ResultExpired):
        row["state"] = "EXPIRED"
        row["result"] = f"expired before {data.expired_before.isoformat()}"
    return row


def _compact(value: Encoded | None) -> str | None:
    """A stored value as one line of JSON (as stored: redacted), or its opaque marker."""
    if value is None:
        return None
    decoded, shown = decode_value(value)
    return json.dumps(shown, default=str, ensure_ascii=False, separators=(",", ":")) if decoded else shown


def _sent_detail(data: TaskSent) -> str:
    """Where a SENT message went and when it may run: queue, countdown/ETA, expiry, publisher."""
    parts = [f"queue {data.queue}" if data.queue else f"routing key {data.routing_key}"]
    if data.countdown is not None:
        parts.append(f"countdown {data.countdown:.1f}s (eta {data.eta.isoformat()})")  # type: ignore[union-attr]
    if data.expires is not None:
        parts.append(f"expires {data.expires.isoformat()}")
    if data.hostname:
        parts.append(f"from {data.hostname}")
    return ", ".join(parts)


def task_history(ledger, task_id: str) -> list[dict[str, Any]]:
    """Every event of ``task_id`` described, oldest first; raises :class:`UnknownTask`."""
    events = ledger.history(task_id)
    if not events:
        raise UnknownTask(task_id)
    rows: list[dict[str, Any]] = []
    expected = 1
    for event in events:
        if event.stream_version > expected:
            rows.append(_gap(ledger, task_id, expected, event.stream_version - 1))
        rows.append(describe(event))
        expected = event.stream_version + 1
    return rows


def _gap(ledger, task_id: str, first: int, last: int) -> dict[str, Any]:
    """A row for stream versions missing from the log: pruned, or deleted behind its back."""
    pruned = bool(prunes_of(ledger, stream_id(TASK, task_id)))
    row = dict.fromkeys(("position", "time", "event", "name", "worker", "retries", "exc_type", "exc_message"))
    row.update(
        version=str(first) if first == last else f"{first}..{last}",
        state="PRUNED" if pruned else "MISSING",
        result="removed by celery-ledger prune" if pruned else "deleted from the log outside prune",
    )
    return row


# -- rendering ------------------------------------------------------------------------

_HISTORY_COLUMNS = ("version", "time", "state", "worker", "retries", "detail")


def _detail(row: dict[str, Any]) -> str:
    if row.get("detail"):  # gap rows (MISSING/PRUNED) carry none
        return row["detail"]
    if row["exc_type"] or row["exc_message"]:
        return f"{row['exc_type'] or 'Exception'}: {row['exc_message'] or ''}".rstrip()
    return row["result"] or ""


def render_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    """Left-aligned columns separated by two spaces; None shows as empty, control
    characters as their escapes (the widths are those of the escaped text)."""
    cells = [[("" if r.get(c) is None else terminal_safe(str(r.get(c)))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    for row in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def format_history(task_id: str, rows: list[dict[str, Any]]) -> str:
    name = next((r["name"] for r in rows if r["name"]), None)
    head = f"task {task_id}" + (f"  {name}" if name else "") + f"  ({len(rows)} events)"
    table = [{**r, "detail": _detail(r)} for r in rows]
    return head + "\n" + render_table(table, _HISTORY_COLUMNS)


# -- commands ----------------------------------------------------------------------------


def prunes_of(ledger, stream_id: str) -> list[dict[str, Any]]:
    """The ``celery-ledger prune`` runs that deleted events of ``stream_id``."""
    out = []
    for event in ledger.read_stream(f"{LogPruned.stream_prefix}:maintenance"):
        data = event.data
        if isinstance(data, LogPruned) and stream_id in data.streams:
            out.append({"pruned_at": event.recorded_at.isoformat(), "before": data.before.isoformat()})
    return out


def _why_no_state(ledger, task_id: str, as_of: datetime | int | None) -> dict[str, Any]:
    events = [
        e for e in ledger.history(task_id)
        if as_of is None
        or (e.position <= as_of if isinstance(as_of, int) else e.recorded_at <= as_of)
    ]
    if events and events[-1].type in (TaskForgotten.type, ResultExpired.type):
        last = events[-1]
        state = "FORGOTTEN" if last.type == TaskForgotten.type else "EXPIRED"
        return {"state": state, "position": last.position, "date_done": last.recorded_at}
    pruned = prunes_of(ledger, stream_id(TASK, task_id))
    if pruned and not events and as_of is not None:
        return {
            "state": "PRUNED",
            "position": None,
            "note": f"the history at that time was pruned (events recorded before "
                    f"{pruned[-1]['before']}, at {pruned[-1]['pruned_at']}): its state then is unknown",
        }
    return {"state": "PENDING", "position": None}


def show_record(ledger, task_id: str, as_of: datetime | int | None) -> dict[str, Any]:
    """The task's projection (now or ``as_of``) as a record.

    Without a projection row it says why, as ``history`` does: FORGOTTEN or
    EXPIRED (the tombstone's position and time), PRUNED when ``as_of`` falls in
    history that ``prune`` deleted (the state then is unknown), else PENDING.
    """
    meta = ledger.task_meta(task_id, as_of=as_of)
    record: dict[str, Any] = {"task_id": task_id, "as_of": as_of}
    if meta is None:
        record.update(_why_no_state(ledger, task_id, as_of))
        return record
    data = meta.data
    exc_type, exc_message = _exception(data)
    decoded, result = decode_value(data.result)
    record.update(
        state=meta.status,
        position=meta.position,
        date_done=meta.done_at,
        name=data.name,
        worker=data.worker,
        retries=data.retries,
        parent_id=data.parent_id,
        group_id=data.group_id,
        root_id=data.root_id,
        exc_type=exc_type,
        exc_message=exc_message,
        result=result,
        traceback=data.traceback,
    )
    return record


# -- export -------------------------------------------------------------------------------

EXPORT_BATCH = 5000
_CSV_COLUMNS = (
    "position", "recorded_at", "stream_id", "stream_version", "type", "event_id",
    "state", "name", "worker", "retries", "exc_type", "exc_message", "result", "args", "kwargs",
)


def jsonable(value: Any) -> Any:
    """Payload fields for JSON: stored values decoded when safe, else base64 with their type."""
    if isinstance(value, dict) and {"content_type", "data"} <= value.keys():
        encoded = Encoded(**value)
        decoded, shown = decode_value(encoded)
        if decoded:
            return {"content_type": encoded.content_type, "value": shown}
        return {
            "content_type": encoded.content_type,
            "content_encoding": encoded.content_encoding,
            "data_base64": base64.b64encode(encoded.data).decode(),
        }
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def read_events(
    ledger,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    task_id: str | None = None,
    batch: int = EXPORT_BATCH,
) -> Iterator[RecordedEvent]:
    """Events recorded in ``[since, until)`` (optionally of one task), in position order.

    Reads in keyset-paginated batches, each its own short query, so an export of
    a large log neither holds a long transaction (which would hold followers
    back on PostgreSQL) nor loads the log into memory.
    """
    t = ledger.log.table
    q = SELECT_EVENTS
    if since is not None:
        q = q.where(t.c.recorded_at >= since)
    if until is not None:
        q = q.where(t.c.recorded_at < until)
    if task_id is not None:
        q = q.where(t.c.stream_id == stream_id(TASK, task_id))
    after = 0
    while True:
        page = q.where(t.c.position > after).order_by(t.c.position).limit(batch)
        rows = ledger.read(lambda c, page=page: c.execute(page).all())
        for row in rows:
            yield row_to_event(row)
        if len(rows) < batch:
            return
        after = rows[-1].position


def count_events(ledger, *, since=None, until=None, task_id=None) -> int:
    t = ledger.log.table
    q = sa.select(sa.func.count()).select_from(t)
    if since is not None:
        q = q.where(t.c.recorded_at >= since)
    if until is not None:
        q = q.where(t.c.recorded_at < until)
    if task_id is not None:
        q = q.where(t.c.stream_id == stream_id(TASK, task_id))
    return ledger.read(lambda c: c.execute(q).scalar_one())


#: The summary fields ``history`` shows, in every JSON shape and CSV row of an event.
SUMMARY_FIELDS = ("state", "name", "worker", "retries", "exc_type", "exc_message")


def event_json(event: RecordedEvent) -> dict[str, Any]:
    """The one JSON shape of an event, in ``history``, ``show``, ``tail`` and ``export``.

    The envelope, the summary ``history`` shows (None where it does not apply),
    and the payload with its stored values (result, args, kwargs: as stored, so
    redacted) decoded when JSON or msgpack, else base64 with their content type.
    """
    try:
        data = jsonable(event.data.model_dump(mode="python"))
    except CorruptEvent as exc:
        data = {"corrupt": str(exc), "payload_base64": base64.b64encode(event.payload).decode()}
    summary = describe(event)
    return {
        "position": event.position,
        "tx_id": event.tx_id,
        "event_id": str(event.event_id),
        "stream_id": event.stream_id,
        "stream_version": event.stream_version,
        "type": event.type,
        "schema_version": event.schema_version,
        "recorded_at": event.recorded_at.isoformat(),
        **{k: summary[k] for k in SUMMARY_FIELDS},
        "data": data,
    }


def event_line(event: RecordedEvent) -> str:
    """One line of text for an event (``tail``, ``export --format text``)."""
    row = describe(event)
    # A corrupt event does not stop tail: its line says so and why, and the next follows.
    state = f"CORRUPT: {row['exc_message']}" if row["state"] == "CORRUPT" else row["state"] or ""
    return (
        f"{event.recorded_at.isoformat(timespec='milliseconds')}  {event.position:>8}  "
        f"{event.stream_id}  {event.type}  {state}".rstrip()
    )


def export_row(event: RecordedEvent) -> dict[str, Any]:
    """The flat CSV row: envelope, the summary ``history`` shows, and args/kwargs as JSON.

    A result that is a number is the number, not its JSON text: :func:`csv_cell`
    leaves numbers alone, and ``-5`` is no formula (a text ``-5`` would get its ``'``).
    """
    row = describe(event)
    number = _number_result(event) if row["result"] is not None else None
    if number is not None:
        row["result"] = number
    return {
        "position": event.position,
        "recorded_at": event.recorded_at.isoformat(),
        "stream_id": event.stream_id,
        "stream_version": event.stream_version,
        "type": event.type,
        "event_id": str(event.event_id),
        **{k: row[k] for k in (*SUMMARY_FIELDS, "result", "args", "kwargs")},
    }


def _number_result(event: RecordedEvent) -> int | float | None:
    """The stored result of a task state when it is a finite number (not a bool), else None."""
    try:
        data = event.data
    except CorruptEvent:
        return None
    if not isinstance(data, TaskState) or data.result is None:
        return None
    decoded, value = decode_value(data.result)
    if not decoded or isinstance(value, bool):
        return None
    # -inf is written "-Infinity", text starting with "-" to a spreadsheet: it keeps its quote.
    if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        return value
    return None


#: ``export --format`` choices: JSON lines, one JSON array, CSV, text lines.
EXPORT_FORMATS = ("jsonl", "json", "csv", "text")


def export(
    ledger, out, *, fmt: str, since=None, until=None, task_id=None, progress=None,
    batch: int = EXPORT_BATCH,
) -> int:
    """Write events to ``out`` in one of :data:`EXPORT_FORMATS`; returns how many were written."""
    writer = None
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=_CSV_COLUMNS, extrasaction="raise")
        writer.writeheader()
    elif fmt == "json":
        out.write("[")
    n = 0
    for event in read_events(ledger, since=since, until=until, task_id=task_id, batch=batch):
        if writer is not None:
            writer.writerow({k: csv_cell(v) for k, v in export_row(event).items()})
        elif fmt == "text":
            out.write(terminal_safe(event_line(event)) + "\n")
        else:
            record = json_text(event_json(event), default=str)
            out.write((",\n" if n and fmt == "json" else "") + record + ("\n" if fmt == "jsonl" else ""))
        n += 1
        if progress is not None:
            progress.advance()
    if fmt == "json":
        out.write("]\n")
    return n
