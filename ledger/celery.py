"""LedgerBackend: Celery's result backend contract on top of the event log.

Select it by URL; nothing else in the app changes::

    result_backend = "ledger+postgresql+psycopg://user@host/db"
    result_backend = "ledger+sqlite:///results.db"

Every state Celery stores (STARTED, RETRY, SUCCESS, FAILURE, REVOKED, custom
states) is a ``task.state`` event; ``get_task_meta`` reads the task-meta
projection written in the same transaction, so a writer always reads its own
writes. ``forget`` and result expiry are tombstone events: the history stays.

Chords are native: every returning header part appends a ``chord.part_returned``
event whose id is derived from (chord, task), the projection counts distinct
task ids, and the part that completes the chord claims the body with a
``chord.fired`` event in the same transaction (:meth:`ledger.api.Ledger.return_chord_part`).
The body is therefore sent once however often parts are redelivered, and
``celery.chord_unlock`` is never scheduled. ``apply_chord`` appends
``chord.applied`` first: each apply is a life of the chord, so a frozen chord
applied again fires its body again, once.

``AsyncResult.get()`` / ``GroupResult.join()`` wait on PostgreSQL
LISTEN/NOTIFY (an append notifies its stream id at commit) and re-read only
when a stream they wait for changed; on SQLite they poll every ``interval``.

The ``ledger_*`` Celery settings it reads are listed in :mod:`ledger.settings`.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta, timezone
from functools import cached_property
from typing import Any

import sqlalchemy as sa
from celery import states
from celery.backends.base import BaseBackend
from celery.exceptions import (
    BackendGetMetaError,
    BackendStoreError,
    ChordError,
    ImproperlyConfigured,
    TimeoutError,
)
from celery.result import GroupResult, ResultSet, allow_join_result, result_from_tuple
from celery.utils.functional import _regen
from celery.utils.log import get_logger
from kombu.serialization import loads, registry
from kombu.utils import json as kombu_json
from kombu.utils.encoding import ensure_bytes

from ledger import lifecycle
from ledger.api import ChordInputs, Ledger, RetryPolicy
from ledger.errors import (
    CodecError,
    CorruptEvent,
    EventTooLarge,
    LedgerError,
    SchemaMissing,
    SettingError,
)
from ledger.events import (
    CHORD,
    TASK,
    TOMBSTONE_TYPES,
    ChordApplied,
    ChordPartAdded,
    ChordPartReturned,
    ChordStarted,
    Encoded,
    EventData,
    GroupForgotten,
    GroupSaved,
    InvalidEvent,
    NewEvent,
    TaskForgotten,
    TaskState,
    exception_summary,
    fit_extras,
    result_node,
    stream_id,
)
from ledger.redaction import redact, signature_of
from ledger.settings import BackendSettings
from ledger.store.base import Listener
from ledger.store.engine import engine_for, is_disconnect, normalize_url, safe_url
from projections.task_meta import TaskMeta

logger = get_logger(__name__)

#: On PostgreSQL a waiter re-reads at least this often even without a
#: notification: NOTIFY is only a wake-up, and one may be lost while the
#: LISTEN connection reconnects.
SAFETY_NET_SECONDS = 5.0
#: Expired results are tombstoned this many per transaction.
EXPIRY_BATCH = 500

#: Default of ``ledger_max_payload_bytes``.

_upgraded: set[str] = set()
_upgrade_lock = threading.Lock()


class PayloadTooLarge(LedgerError, BackendStoreError):
    """An event (result, traceback, args, kwargs) is larger than ``ledger_max_payload_bytes``."""


class LedgerBackend(BaseBackend, lifecycle.Recorder):
    """Celery result backend storing every state transition as an event."""

    supports_native_join = True
    supports_autoexpire = False
    persistent = True

    def __init__(self, app=None, url: str | None = None, **kwargs: Any) -> None:
        super().__init__(app, url=url, **kwargs)
        conf = self.app.conf
        if not url:
            raise ImproperlyConfigured(
                "the ledger backend needs a database URL: set result_backend to "
                "'ledger+postgresql+psycopg://user@host/db' or 'ledger+sqlite:///path.db'"
            )
        # Validates the URL now (a clear error at configuration time), connects later.
        self._db_url = normalize_url(url)
        try:
            settings = BackendSettings.from_conf(conf)
        except SettingError as exc:
            raise ImproperlyConfigured(str(exc)) from None
        self.auto_upgrade = settings.auto_upgrade
        self.redact_kwargs = settings.redact_kwargs
        self.redact_args = settings.redact_args
        self.max_payload_bytes = settings.max_payload_bytes
        self.notify = settings.notify
        self.extended = bool(conf.find_value_for_key("extended", "result"))
        self.track_sent = settings.track_sent
        self.track_received = settings.track_received
        if self.track_sent or self.track_received:
            lifecycle.track(self.app)

    # -- connection ---------------------------------------------------------------------

    @cached_property
    def ledger(self) -> Ledger:
        """The ledger on the backend's database (the engine is shared per process)."""
        # Ledger's own retry covers a transient disconnect within one unit of
        # work; result_backend_always_retry adds Celery's outer retry loop.
        retry = RetryPolicy(
            attempts=3,
            base_sleep=self.base_sleep_between_retries_ms / 1000,
            max_sleep=self.max_sleep_between_retries_ms / 1000,
        )
        # The size limit bounds the whole event (result, traceback, args, kwargs):
        # Ledger.append refuses a larger one before anything is written.
        ledger = Ledger(engine_for(self._db_url), retry=retry, notify=self.notify,
                        max_payload_bytes=self.max_payload_bytes)
        if self.auto_upgrade:
            key = ledger.url
            with _upgrade_lock:
                if key not in _upgraded:
                    ledger.upgrade()
                    _upgraded.add(key)
        return ledger

    def as_uri(self, include_password: bool = False) -> str:
        if include_password:
            return f"ledger+{self.url}"
        return f"ledger+{safe_url(self._db_url)}"

    def __reduce__(self, args=(), kwargs=None):
        # The base class does not pass the URL on; prefork children need it.
        kwargs = kwargs or {}
        return super().__reduce__(args, dict(kwargs, expires=self.expires, url=self.url))

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        cause = exc.__cause__ if isinstance(exc, BackendStoreError | BackendGetMetaError) else exc
        return cause is not None and is_disconnect(cause)

    # -- storing ------------------------------------------------------------------------

    def store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        # Celery's retry loop (result_backend_always_retry) calls _store_result
        # again after a lost connection. If the lost reply was that of a COMMIT
        # that landed, a fresh event id would store the state twice; one id per
        # store_result call makes the retry a no-op duplicate instead.
        self._store_ids.event_id = uuid.uuid4()
        try:
            return super().store_result(task_id, result, state, traceback, request, **kwargs)
        finally:
            self._store_ids.event_id = None

    @cached_property
    def _store_ids(self) -> threading.local:
        return threading.local()

    def _store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request, format_date=False
        )
        try:
            event = TaskState(
                task_id=task_id,
                status=state,
                result=self.encoded(result),
                traceback=traceback,
                children=meta["children"],
                date_done=meta["date_done"],
                parent_id=meta.get("parent_id"),
                group_id=meta.get("group_id"),
                root_id=getattr(request, "root_id", None) if request else None,
                **self._exception_summary(result, state),
                **self._extended_fields(meta) if "name" in meta else _request_fields(request),
            )
        except InvalidEvent as exc:
            # e.g. a task id over the column limit: refused before anything is written
            raise BackendStoreError(str(exc), state=state, task_id=task_id) from exc
        event = fit_extras(event, self.max_payload_bytes)
        # One event id per store_result call (kept across Celery's retries of it):
        # a retry after a lost COMMIT reply is then a duplicate, not a second store.
        event_id = getattr(self._store_ids, "event_id", None) or uuid.uuid4()
        new = NewEvent(event, event_id)
        part = getattr(self._chord_part, "pending", None)
        if part is not None and part.id == task_id:
            with self._storing(BackendStoreError, TaskState.type, state=state, task_id=task_id):
                returned = self.ledger.return_chord_part_read(
                    part.group, task_id, state, part.group_index,
                    body_task_id=_body_id(part), result=new,
                )
            self._chord_part.returned = (part, returned)
            return result
        self._append(new, BackendStoreError, state=state, task_id=task_id)
        # SUCCESS is sticky in the projection: a late FAILURE of a redelivered
        # message is recorded in the log but does not replace the result.
        return result

    def mark_as_done(self, task_id, result, request=None, store_result=True, state=states.SUCCESS):
        # A chord part's result and its return to the chord are one transaction where
        # the store can (PostgreSQL: one round trip and one WAL flush, not two):
        # _store_result returns the part, on_chord_part_return takes its outcome.
        if (store_result and request is not None and request.chord and request.group
                and request.id == task_id and not request.ignore_result):
            self._chord_part.pending = request
        try:
            return super().mark_as_done(task_id, result, request, store_result, state)
        finally:
            self._chord_part.pending = self._chord_part.returned = None

    @cached_property
    def _chord_part(self) -> threading.local:
        return threading.local()

    def encoded(self, value: Any) -> Encoded:
        return Encoded(
            content_type=self.content_type,
            content_encoding=self.content_encoding,
            data=ensure_bytes(self.encode(value)),
        )

    def redacted(self, name: str | None, args: Any, kwargs: Any) -> tuple[Any, Any]:
        """Task ``name``'s arguments as the ledger stores them (:mod:`ledger.redaction`)."""
        return redact(
            args, kwargs, names=self.redact_kwargs, indexes=self.redact_args,
            # Only looked up when there are names to find (the cost of a store otherwise).
            signature=signature_of(getattr(self.app.tasks.get(name), "run", None))
            if self.redact_kwargs else None,
        )

    def _extended_fields(self, meta: dict) -> dict:
        args, kwargs = self.redacted(meta["name"], meta["args"], meta["kwargs"])
        return {
            "name": meta["name"],
            "args": self.encoded(list(args) if args is not None else None),
            "kwargs": self.encoded(kwargs),
            "worker": meta["worker"],
            "retries": meta["retries"],
            "queue": meta["queue"],
        }

    def _exception_summary(self, result: Any, state: str) -> dict:
        if state not in self.EXCEPTION_STATES:
            return {}
        if isinstance(result, BaseException):
            return {"exc_type": type(result).__name__, "exc_message": str(result)}
        exc_type, exc_message = exception_summary(result)
        return {} if exc_type is None else {"exc_type": exc_type, "exc_message": exc_message}

    def _forget(self, task_id):
        with _refused_as(BackendStoreError, task_id=task_id):
            event = TaskForgotten(task_id=task_id)
        self._append(event, BackendStoreError, task_id=task_id)

    def _save_group(self, group_id, result):
        with _refused_as(BackendStoreError, task_id=group_id):
            event = GroupSaved(group_id=group_id, result=result.as_tuple())
        self._append(event, BackendStoreError, task_id=group_id)
        return result

    def _delete_group(self, group_id):
        with _refused_as(BackendStoreError, task_id=group_id):
            event = GroupForgotten(group_id=group_id)
        self._append(event, BackendStoreError, task_id=group_id)

    def _append(
        self, event: EventData | NewEvent | list[EventData], error: type[Exception], **info: Any
    ) -> None:
        """Append one event (or several, in one transaction); ``error`` if that fails."""
        events = event if isinstance(event, list) else [event]
        data = events[-1].data if isinstance(events[-1], NewEvent) else events[-1]
        with self._storing(error, data.type, **info):
            self.ledger.append(events)

    @staticmethod
    @contextlib.contextmanager
    def _storing(error: type[Exception], event_type: str, **info: Any) -> Iterator[None]:
        """What an append of an ``event_type`` event raises, as Celery's ``error``."""
        try:
            yield
        except EventTooLarge as exc:
            raise PayloadTooLarge(str(exc), **info) from None
        except (InvalidEvent, CodecError) as exc:  # as _refused_as, after its EventTooLarge case
            raise error(str(exc), **info) from exc
        except SchemaMissing as exc:  # one line naming the fix, without the SQL traceback
            raise error(str(exc), **info) from None
        except sa.exc.SQLAlchemyError as exc:
            raise error(f"ledger {event_type} failed: {type(exc).__name__}", **info) from exc

    def cleanup(self) -> None:
        """Tombstone results older than ``result_expires`` (the log keeps their history)."""
        if not self.expires:
            return
        try:
            cutoff = datetime.now(timezone.utc) - timedelta(seconds=self.expires)
        except OverflowError:  # before the year 1 (result_expires = 10**12): nothing is that old
            return
        # Each round expires what it found unless it changed meanwhile (a new life
        # started: Ledger.expire_finished); until a round finds nothing old.
        while self.ledger.expire_finished(cutoff, EXPIRY_BATCH)[0]:
            pass

    # -- reading ------------------------------------------------------------------------

    def _get_task_meta_for(self, task_id):
        try:
            row = self.ledger.task_meta(task_id)
        except SchemaMissing as exc:
            raise BackendGetMetaError(str(exc), task_id=task_id) from None
        except (sa.exc.SQLAlchemyError, UnicodeEncodeError) as exc:  # a lone surrogate in the id
            raise BackendGetMetaError(
                f"failed to get meta: {type(exc).__name__}", task_id=task_id
            ) from exc
        if row is None:
            # The Redis backend's answer for an unknown id, key for key.
            return {"status": states.PENDING, "result": None}
        try:
            return self._meta(row)
        except CorruptEvent as exc:  # the message names the log position
            raise BackendGetMetaError(str(exc), task_id=task_id) from None

    def _meta(self, row: TaskMeta) -> dict:
        ev = row.fields()
        date_done = ev.get("date_done")
        meta = {
            "status": ev["status"],
            "result": self._decode(ev.get("result")),
            "traceback": ev.get("traceback"),
            "children": ev.get("children"),
            "date_done": date_done.astimezone(self.app.timezone).isoformat() if date_done else None,
        }
        if ev.get("group_id"):
            meta["group_id"] = ev["group_id"]
        if ev.get("parent_id"):
            meta["parent_id"] = ev["parent_id"]
        if ev.get("args") is not None or ev.get("kwargs") is not None:
            meta.update(
                name=ev.get("name"),
                args=self._decode(ev.get("args")),
                kwargs=self._decode(ev.get("kwargs")),
                worker=ev.get("worker"),
                retries=ev.get("retries"),
                queue=ev.get("queue"),
            )
        meta["task_id"] = row.task_id
        # Exceptions are rebuilt by Celery's exception_to_python: it never
        # imports a module and refuses a non-exception type (SecurityError).
        return self.meta_from_decoded(meta)

    def _decode(self, value: dict | None) -> Any:
        """A stored :class:`~ledger.events.Encoded` value (as a map) decoded by its content type."""
        if value is None:
            return None
        # The stored content type decides, checked against this app's accept
        # list: a pickle payload is refused (ContentDisallowed) unless accepted.
        data = value["data"]
        if (
            type(data) is bytes
            and value["content_type"] == _JSON
            and value.get("content_encoding", "utf-8") == "utf-8"
            and self.accept is not None and _JSON in self.accept
            and registry._decoders.get(_JSON) is kombu_json.loads
        ):
            # What kombu's loads would do for it (its own JSON decoder), without
            # building a JSONDecoder per value: ~3 us of the ~5 us a result took,
            # which a chord of 100 parts pays 100 times on its completing part.
            # Anything the decoder refuses goes through kombu's loads, which
            # raises its DecodeError.
            with contextlib.suppress(ValueError):
                return _json_decode(data.decode())
        return loads(
            data,
            content_type=value["content_type"],
            content_encoding=value.get("content_encoding", "utf-8"),
            accept=self.accept,
        )

    def _restore_group(self, group_id):
        try:
            group = self.ledger.group(group_id)
        except (sa.exc.SQLAlchemyError, UnicodeEncodeError) as exc:  # a lone surrogate in the id
            raise BackendGetMetaError(
                f"failed to restore group: {type(exc).__name__}", task_id=group_id
            ) from exc
        if group is None:
            return None
        return {"result": result_from_tuple(group.result, self.app)}

    # -- waiting ------------------------------------------------------------------------

    def wait_for_pending(self, result, timeout=None, interval=0.5, no_ack=True, on_message=None,
                         on_interval=None, callback=None, propagate=True):
        """``AsyncResult.get()``; with ``on_message``, as on Celery's Redis backend: called
        with the meta of each state the task reaches (``update_state``'s progress,
        STARTED, RETRY), then of its ready state. Celery's base class refuses it
        (``ImproperlyConfigured``). Here each state is read from the log, so none is
        missed however quickly the next follows (see :meth:`get_many`)."""
        if on_message is None:
            return super().wait_for_pending(
                result, timeout=timeout, interval=interval, no_ack=no_ack, on_interval=on_interval,
                callback=callback, propagate=propagate,
            )
        self._ensure_not_eager()
        for _, meta in self.get_many([result.id], timeout=timeout, interval=interval,
                                     on_message=on_message, on_interval=on_interval):
            result._maybe_set_cache(meta)
            return result.maybe_throw(propagate=propagate, callback=callback)
        raise TimeoutError("The operation timed out.")

    def wait_for(self, task_id, timeout=None, interval=0.5, no_ack=True, on_interval=None):
        """The task's meta once it is ready; raises Celery's ``TimeoutError`` after ``timeout``."""
        self._ensure_not_eager()
        for _, meta in self.get_many([task_id], timeout=timeout, interval=interval,
                                     on_interval=on_interval):
            return meta
        raise TimeoutError("The operation timed out.")

    def get_many(self, task_ids, timeout=None, interval=0.5, no_ack=True, on_message=None,
                 on_interval=None, max_iterations=None, READY_STATES=states.READY_STATES):
        """Yield ``(task_id, meta)`` for each task as it becomes ready.

        One query per pass for all ids still waited for. Between passes it
        waits for a NOTIFY on one of their streams (PostgreSQL) or ``interval``
        seconds (SQLite).

        ``on_message(meta)`` is called for each state a task reaches before its
        ready one, in the order of the log, then for the ready one. Only ready
        states NOTIFY (``ledger_notify``), so with ``on_message`` a pass runs at
        least every ``interval`` seconds; a state stored and overwritten between
        two passes is still delivered: it is read from the task's history.
        """
        interval = 0.5 if interval is None else interval
        ids = {str(t) for t in task_ids}
        for task_id in list(ids):
            cached = self._cache.get(task_id)
            if cached is not None and cached["status"] in READY_STATES:
                ids.discard(task_id)
                yield task_id, cached
        if not ids:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        delivered: dict[str, int] = {}  # with on_message: the last position handed over per task
        with self._wake_ups(enabled=max_iterations != 1) as listener:
            iterations = 0
            while ids:
                rows = self._while_waiting(ids, lambda: self.ledger.task_metas(ids)) or {}
                ready = list(self._ready(rows, READY_STATES))
                if on_message is not None:
                    # After the read of the ready ones: their states before it are
                    # then all in the log, and handed over first.
                    self._deliver_states(ids, rows, delivered, on_message, READY_STATES)
                if ready and on_interval:
                    # Celery's drain loop calls it between a wake-up and handing over
                    # what came (see below), so AsyncResult.get() re-raises a failed
                    # parent's own exception even when the first read finds the result
                    # ready. After the read: a chord's header part stores its failure
                    # before the body's ChordError is stored, so when this read found
                    # the ChordError the parent check finds the part's error.
                    on_interval()
                for task_id, meta in ready:
                    ids.discard(task_id)
                    if meta["status"] == states.SUCCESS:
                        self._cache[task_id] = meta
                    if on_message is not None:
                        on_message(meta)
                    yield task_id, meta
                if not ids:
                    return
                iterations += 1
                if max_iterations and iterations >= max_iterations:
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError("The operation timed out.")  # Celery's own words
                nap_until = deadline
                if on_message is not None:  # the states before the ready one do not NOTIFY
                    nap_until = min(deadline or math.inf, time.monotonic() + interval)
                self._nap(listener, ids, nap_until, interval)
                # After every wake-up and before reading what woke us, as Celery's
                # drain loop (Drainer.drain_events_until) does: AsyncResult.get()
                # re-raises a failed parent's own exception from here, so a chord
                # whose header part failed raises that part's error, not the
                # body's ChordError that the same wake-up may bring.
                if on_interval:
                    on_interval()

    def iter_native(self, result, timeout=None, interval=0.5, no_ack=True, on_message=None,
                    on_interval=None):
        """``GroupResult.join_native``: each member's meta as it becomes ready.

        Also watches the group's own id: when a chain fails before the group in it
        runs, Celery stores the error under the group's id (``_fail_chain``) and
        none of its members ever runs. That error is raised here, where joining
        would otherwise wait for members that never come (Celery #6437; on the
        Redis backend such a join times out).
        """
        self._ensure_not_eager()
        members = result.results
        if not members:
            return
        ids = set()
        for member in members:
            if isinstance(member, ResultSet):
                yield member.id, member.results
            else:
                ids.add(member.id)
        if not ids:
            return
        group_id = result.id if isinstance(result, GroupResult) and result.id not in ids else None
        waiting = set(ids)
        for task_id, meta in self.get_many(
            ids if group_id is None else ids | {group_id}, timeout=timeout, interval=interval,
            no_ack=no_ack, on_message=on_message, on_interval=on_interval,
        ):
            if task_id == group_id:
                if meta["status"] in states.PROPAGATE_STATES:
                    raise meta["result"]
                continue
            waiting.discard(task_id)
            yield task_id, meta
            if not waiting:  # the group's own id need not be ready
                return

    def _deliver_states(self, ids: set[str], rows: dict[str, TaskMeta], delivered: dict[str, int],
                        on_message, ready_states) -> None:
        """``on_message`` for each not-ready state of ``ids`` stored since the last call,
        from the log: a task whose meta row (``rows``, this pass's) moved past what was
        delivered has its current life's ``task.state`` events read (those after its
        last tombstone)."""
        moved = [task_id for task_id, row in rows.items() if row.position > delivered.get(task_id, 0)]
        histories = self._while_waiting(ids, lambda: {task_id: self.ledger.history(task_id) for task_id in moved})
        for task_id, events in (histories or {}).items():
            life = [e for e in events if e.position > delivered.get(task_id, 0)]
            ends = [i for i, e in enumerate(life) if e.type in TOMBSTONE_TYPES]
            for event in life[ends[-1] + 1 if ends else 0:]:
                if event.type != TaskState.type:
                    continue
                status = event.data.status  # type: ignore[attr-defined]
                if status in ready_states:
                    break  # handed over with the ready meta, by get_many
                try:
                    meta = self._meta(TaskMeta(task_id, status, event.position, None, event.payload))
                except CorruptEvent as exc:
                    raise BackendGetMetaError(str(exc), task_id=task_id) from None
                on_message(meta)
                delivered[task_id] = event.position

    def _while_waiting(self, ids: Iterable[str], read: Callable[[], Any]) -> Any:
        """``read()`` for a waiter on ``ids``: None after a lost connection (the next pass
        reads again: a waiter outlives a database restart), Celery's
        ``BackendGetMetaError`` for any other failure."""
        try:
            return read()
        except SchemaMissing as exc:
            raise BackendGetMetaError(str(exc), task_id=next(iter(ids))) from None
        except sa.exc.SQLAlchemyError as exc:
            if not is_disconnect(exc):
                raise BackendGetMetaError(
                    f"failed to get meta: {type(exc).__name__}", task_id=next(iter(ids))
                ) from exc
            logger.warning("ledger read failed while waiting (%s); retrying", type(exc).__name__)
            return None

    def _ready(self, rows: dict[str, TaskMeta], ready_states) -> Iterator[tuple[str, dict]]:
        for task_id, row in rows.items():
            if row.status in ready_states:
                try:
                    meta = self._meta(row)
                except CorruptEvent as exc:
                    raise BackendGetMetaError(str(exc), task_id=task_id) from None
                yield task_id, meta

    def _wake_ups(self, *, enabled: bool) -> Listener:
        # Entering a listener that wakes LISTENs (one connection), before the first
        # read: a commit between that read and the wait still wakes us.
        return self.ledger.store.listener() if enabled else Listener()

    def _nap(self, listener: Listener, ids: set[str], deadline: float | None, interval: float):
        if not listener.wakes:
            left = interval if deadline is None else min(interval, deadline - time.monotonic())
            if left > 0:
                listener.wait(left)
            return
        wanted = {stream_id(TASK, task_id) for task_id in ids}
        while True:
            left = SAFETY_NET_SECONDS if deadline is None else min(
                SAFETY_NET_SECONDS, deadline - time.monotonic()
            )
            if left <= 0:
                return
            notified = listener.wait(left)
            if not notified or wanted.intersection(notified):
                return

    # -- chords -------------------------------------------------------------------------

    def set_chord_size(self, group_id, chord_size):
        # Built inside: an id or size refused as the event is built is Celery's error too.
        with self._storing(BackendStoreError, ChordStarted.type, task_id=group_id):
            self.ledger.append([ChordStarted(chord_id=group_id, size=chord_size)])

    def apply_chord(self, header_result_args, body, **kwargs):
        """Begin a life of the chord and save its header group, in one transaction.

        Called before any header task is sent, so every part of this apply returns
        into this life: a frozen chord applied again counts afresh and fires its
        body again. The parts' returns fire the body (no chord_unlock).

        A generator header (``_regen``) is not saved: saving would unroll it
        before its first task is sent (Celery #3021). Its parts carry their
        ``group_index``, which orders the body's input instead.
        """
        self.ensure_chords_allowed()
        group_id, results = header_result_args[0], header_result_args[1]
        with self._storing(BackendStoreError, ChordApplied.type, task_id=group_id):
            events: list[EventData] = [ChordApplied(chord_id=group_id)]
            if not isinstance(results, _regen):
                header_result = self.app.GroupResult(*header_result_args)
                events.insert(0, GroupSaved(group_id=group_id, result=header_result.as_tuple()))
            self.ledger.append(events)

    def add_to_chord(self, chord_id, result):
        with self._storing(BackendStoreError, ChordPartAdded.type, task_id=chord_id):
            self.ledger.append([ChordPartAdded(chord_id=chord_id, task_id=result.id)])

    def on_chord_part_return(self, request, state, result, **kwargs):
        """Count this header part; the one part that completes the chord sends the body."""
        gid, tid = request.group, request.id
        if not gid or not tid:
            return None
        done = getattr(self._chord_part, "returned", None)
        if done is not None and done[0] is request:  # returned with its result (mark_as_done)
            self._chord_part.returned = None
            claimed, inputs = done[1]
        else:
            claimed, inputs = self.ledger.return_chord_part_read(
                gid, tid, state, request.group_index, body_task_id=_body_id(request)
            )
        if not claimed:
            return None
        app = self.app
        callback = app.signature(request.chord)
        try:
            ret = self._chord_results(gid, inputs)
        except ChordError as exc:
            logger.error("Chord %r raised: %s", gid, exc)
            return self.chord_error_from_stack(callback, exc)
        try:
            app.amqp._retry_publish(callback.delay, ret)
        except Exception as exc:
            logger.exception("Chord %r raised: %r", gid, exc)
            error = ChordError(f"Callback error: {exc!r}")
            error.__cause__ = exc
            return self.chord_error_from_stack(callback, error)
        return None

    def _chord_results(self, gid: str, inputs: ChordInputs | None = None) -> list:
        """The header's results in header order; ChordError (as Redis words it) if one failed.

        Every part stores its own result before it returns to the chord
        (``mark_as_done``/``mark_as_failure``), so when the chord completes the
        results are normally all there: one read fetches the saved header and
        the returned parts' rows (``inputs``, when the claim brought them back),
        without LISTEN or a wait. Anything else -- a
        part whose result is not stored (yet), parts added by ``add_to_chord``,
        a group nested in the header -- takes Celery's join with
        ``result_chord_join_timeout``.
        """
        try:
            group, parts = inputs if inputs is not None else self.ledger.chord_header(gid)
            ids = self._returned_ids(gid) if group is None else _plain_ids(group.result)
        except Exception as exc:
            logger.exception("Chord %r raised: %r", gid, exc)
            raise ChordError(f"Cannot restore group: {exc!r}") from exc
        rows = [parts.get(task_id) for task_id in ids or ()]
        if ids is None or len(parts) != len(ids) or any(
            row is None or row.status not in states.READY_STATES for row in rows
        ):
            return self._join_header(gid)
        values = []
        for row in rows:
            if row.status in states.PROPAGATE_STATES:
                exc = self._meta(row)["result"]
                error = ChordError(f"Dependency {row.task_id} raised {exc!r}")
                error.__cause__ = exc
                raise error
            values.append(self._result_of(row))
        return values

    def _result_of(self, row: TaskMeta) -> Any:
        # The stored map, shape-checked (TaskMeta.fields): validating the whole
        # task.state event (row.data) would double each part's decoding cost.
        return self._decode(row.fields().get("result"))

    def _join_header(self, gid: str) -> list:
        """Celery's way: restore the header and join it, waiting for results not yet stored."""
        try:
            deps = self._chord_header(gid)
        except Exception as exc:
            logger.exception("Chord %r raised: %r", gid, exc)
            raise ChordError(f"Cannot restore group: {exc!r}") from exc
        if deps is None:
            raise ChordError(f"GroupResult {gid} no longer exists")
        try:
            with allow_join_result():
                return deps.join_native(timeout=self.app.conf.result_chord_join_timeout, propagate=True)
        except Exception as exc:
            culprit = next(
                (r for r in deps.results if r.state in states.PROPAGATE_STATES), None
            )
            reason = f"Dependency {culprit.id} raised {exc!r}" if culprit else repr(exc)
            raise ChordError(reason) from exc

    def _returned_ids(self, gid: str) -> list[str]:
        """A header that was not saved (a generator): the current life's returned parts,
        in header order (``group_index``, then order of return)."""
        parts: dict[str, tuple[float, int]] = {}
        for event in self.ledger.chord_events(gid):
            if event.type == ChordApplied.type:
                parts.clear()
            elif event.type == ChordPartReturned.type and event.data.task_id not in parts:
                index = event.data.group_index
                parts[event.data.task_id] = (float("inf") if index is None else index, event.position)
        return sorted(parts, key=parts.__getitem__)

    def _chord_header(self, gid: str) -> GroupResult | None:
        """The header as saved by apply_chord, plus parts added by add_to_chord, in order;
        for a header that was not saved (a generator), the parts that returned."""
        deps = self.app.GroupResult.restore(gid, backend=self)
        if deps is None:
            ids = self._returned_ids(gid)
            if not ids:
                return None
            deps = self.app.GroupResult(gid, [self.app.AsyncResult(t, backend=self) for t in ids])
        known = {r.id for r in deps.results}
        for event in self.ledger.read_stream(stream_id(CHORD, gid)):
            if event.type == ChordPartAdded.type and event.data.task_id not in known:
                known.add(event.data.task_id)
                deps.results.append(self.app.AsyncResult(event.data.task_id, backend=self))
        return deps


_JSON = "application/json"
#: kombu's JSON decoding (kombu.utils.json.loads: the stdlib's decoder with
#: kombu's object hook), one decoder for every value.
_json_decode = json.JSONDecoder(object_hook=kombu_json.object_hook).decode


def _request_fields(request: Any) -> dict:
    """Without ``result_extended``: the task's name, worker, queue and retries from the
    worker's request, as Celery's extended meta takes them, for the catalogue and the
    history. Never its arguments: storing those is what ``result_extended`` opts into.
    Celery's own view is unchanged: :meth:`LedgerBackend._meta` gives these fields
    only with the arguments."""
    if request is None:
        return {}
    delivery = getattr(request, "delivery_info", None) or {}
    retries = getattr(request, "retries", None)
    return {
        "name": getattr(request, "task", None),
        "worker": getattr(request, "hostname", None),
        "retries": retries if type(retries) is int else None,
        "queue": delivery.get("routing_key"),
    }


def _body_id(request: Any) -> str | None:
    """The chord body's task id (named in the claim)."""
    return (request.chord.get("options") or {}).get("task_id")


def _plain_ids(header: Any) -> list[str] | None:
    """Task ids of a saved header (``GroupResult.as_tuple()``), None if a member is a group."""
    _, members = header
    ids = []
    for node in members:
        parsed = result_node(node)
        if parsed is None or parsed[1] is not None:
            return None
        ids.append(parsed[0])
    return ids


@contextlib.contextmanager
def _refused_as(error: type[Exception], **info: Any) -> Iterator[None]:
    """What the ledger refuses (an id over the limit or None, a lone surrogate) raised as
    Celery's ``error`` with the refusal as its cause, as Celery's own backends do."""
    try:
        yield
    except (InvalidEvent, CodecError) as exc:
        raise error(str(exc), **info) from exc
