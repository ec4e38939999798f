"""Recording SENT and RECEIVED from Celery's signals, in apps whose results go to the ledger.

* ``before_task_publish`` appends ``task.sent`` with the task's name, routing,
  ETA/expires, workflow ids, publisher and arguments (encoded and redacted as the
  extended result stores them). Before the publish, not after it
  (``after_task_publish``): the SENT then commits before any worker can receive
  the message, so a history reads in the order things happened (measured with
  ``after_task_publish``: RECEIVED, even STARTED and SUCCESS, often committed
  before the publisher's SENT). The price: a publish that fails after its
  retries (the caller gets the exception) leaves a SENT that no RECEIVED
  follows, listed with the lost tasks.
* ``task_received`` (in the worker's consumer, before the pool runs the task)
  appends ``task.received`` with the worker's name and, for an ETA task, when
  it becomes due.

Celery's signals are process-wide; the receivers are connected once, by the
first :class:`ledger.celery.LedgerBackend` built in the process with tracking
on (:func:`track`), and act only for apps whose backend is a LedgerBackend
with ``ledger_track_sent`` / ``ledger_track_received`` on. Recording never
fails a publish or a delivery: a failed append is logged and the task goes on.
"""

from __future__ import annotations

import threading
import weakref
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from celery import signals
from celery._state import _get_active_apps, get_current_app
from celery.utils.log import get_logger
from celery.utils.time import maybe_iso8601

from ledger.events import Encoded, TaskReceived, TaskSent

if TYPE_CHECKING:
    from celery import Celery

    from ledger.api import Ledger

logger = get_logger(__name__)


class Recorder:
    """A backend that records its app's SENT and RECEIVED: :class:`ledger.celery.LedgerBackend`
    subclasses it, so this module knows it without importing the backend's module."""

    ledger: Ledger
    serializer: str
    max_payload_bytes: int
    track_sent: bool
    track_received: bool

    def encoded(self, value: Any) -> Encoded:
        raise NotImplementedError

    def redacted(self, name: str | None, args: Any, kwargs: Any) -> tuple[Any, Any]:
        raise NotImplementedError

_connected = False
_connect_lock = threading.Lock()
#: Apps that built a LedgerBackend with tracking on, in this process.
_apps: weakref.WeakSet[Celery] = weakref.WeakSet()


def track(app: Celery) -> None:
    """Record SENT/RECEIVED for ``app`` (its backend is a LedgerBackend); connects the
    receivers the first time (once per process: never two appends per signal)."""
    global _connected
    with _connect_lock:
        _apps.add(app)
        if _connected:
            return
        # weak=False: the receivers are module functions, but say it; dispatch_uid
        # makes a second connect (module reloaded in tests) a no-op, not a double append.
        signals.before_task_publish.connect(_before_publish, weak=False, dispatch_uid="ledger.sent")
        signals.task_received.connect(_received, weak=False, dispatch_uid="ledger.received")
        _connected = True


def watch_workers() -> None:
    """Build a ledger app's backend when a worker starts (``worker_init``).

    RECEIVED is appended in the worker's main process, whose receivers exist once
    a LedgerBackend was built there. ``celery worker`` builds it for its banner,
    but ``celery -q worker`` prints none, and nothing else in the main process
    touches the backend before the first message. Connected by the ``celery``
    command's ledger plugin (ledger/cli/plugin.py), which every ``celery`` run imports.
    """
    signals.worker_init.connect(_worker_init, weak=False, dispatch_uid="ledger.worker_init")


def _worker_init(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is not None and str(app.conf.result_backend or "").startswith("ledger+"):
        app.backend  # noqa: B018  (built: a LedgerBackend tracks its app)


def _ledger_backend(app: Celery | None) -> Recorder | None:
    """The app's backend if the app is tracked (never builds another app's backend)."""
    if app is None or app not in _apps:
        return None
    backend = app.backend  # thread-local: this thread's instance
    return backend if isinstance(backend, Recorder) else None


def _publisher(task_name: str | None, declare: Any) -> Celery | None:
    """The tracked app that is publishing ``task_name``: the signal does not say.

    The queue Celery declares with the message is an object of the publishing
    app's ``amqp.queues``, which tells apart apps with the same task names (tests,
    several apps in one process), tracked or on other backends. Without one (an
    explicit exchange, a Queue object of the caller's): the only tracked app that
    has the task, else the current app if tracked.
    """
    queues = [q for q in declare or () if getattr(q, "name", None)]
    for app in list(_get_active_apps()):
        amqp = app.__dict__.get("amqp")  # only apps that publish have one
        if amqp is not None and any(amqp.queues.get(q.name) is q for q in queues):
            return app if app in _apps else None  # not tracked: another backend
    owners = [app for app in list(_apps) if task_name in app.tasks]
    if len(owners) == 1:
        return owners[0]
    current = get_current_app()
    return current if current in _apps else None


def _before_publish(sender: str | None = None, body: Any = None, headers: dict | None = None,
                    exchange: str | None = None, routing_key: str | None = None,
                    declare: Any = None, **_: Any) -> None:
    if headers is None or not headers.get("id"):
        return
    name = headers.get("task") or sender
    backend = _ledger_backend(_publisher(name, declare))
    if backend is None or not backend.track_sent:
        return
    queues = [q.name for q in declare or () if getattr(q, "name", None)]
    try:
        args, kwargs = backend.redacted(name, *_arguments(body))
        event = TaskSent(
            task_id=headers["id"],
            name=name,
            sent_at=datetime.now(timezone.utc),
            hostname=headers.get("origin"),
            queue=queues[0] if len(queues) == 1 else routing_key,
            routing_key=routing_key,
            exchange=exchange,
            eta=_time(headers.get("eta")),
            expires=_time(headers.get("expires")),
            retries=headers.get("retries") or 0,
            parent_id=headers.get("parent_id"),
            root_id=headers.get("root_id"),
            group_id=headers.get("group"),
            args=_encoded(backend, args, list),
            kwargs=_encoded(backend, kwargs, dict),
        )
        backend.ledger.append([event])
    except Exception as exc:  # recording must never keep a task from being sent
        logger.warning("ledger: task.sent of %s not recorded: %s: %s",
                       headers.get("id"), type(exc).__name__, exc)


def _received(sender: Any = None, request: Any = None, **_: Any) -> None:
    if request is None:
        return
    backend = _ledger_backend(getattr(sender, "app", None))
    if backend is None or not backend.track_received:
        return
    try:
        backend.ledger.append([TaskReceived(
            task_id=request.id,
            name=request.name,
            hostname=request.hostname,
            retries=request.request_dict.get("retries") or 0,
            due_at=_time(request.eta),
        )])
    except Exception as exc:  # the worker runs the task whether or not this is recorded
        logger.warning("ledger: task.received of %s not recorded: %s: %s",
                       request.id, type(exc).__name__, exc)


def _arguments(body: Any) -> tuple[Any, Any]:
    if isinstance(body, tuple | list) and len(body) >= 2:  # message protocol 2: (args, kwargs, embed)
        return body[0], body[1]
    if isinstance(body, dict):  # protocol 1
        return body.get("args"), body.get("kwargs")
    return None, None


def _encoded(backend: Recorder, value: Any, kind: type) -> Encoded | None:
    """``value`` encoded as the extended result stores arguments; None if it cannot be
    (not serializable with the result serializer, or over ``ledger_max_payload_bytes``)."""
    if value is None:
        return None
    try:
        encoded = backend.encoded(kind(value))
    except Exception as exc:
        logger.debug("ledger: arguments not encodable with %s: %r", backend.serializer, exc)
        return None
    return encoded if len(encoded.data) <= backend.max_payload_bytes else None


def _time(value: Any) -> datetime | None:
    """An ETA/expires header (ISO 8601 text, or a datetime on the worker) as aware UTC."""
    if value is None:
        return None
    when = maybe_iso8601(value) if isinstance(value, str) else value
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc)
