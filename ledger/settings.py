"""Configuration in one place: the environment variable, the Celery ``ledger_*``
settings, and their defaults.

The backend's options are Celery settings (``app.conf.ledger_notify = "all"``),
as Celery users expect, read beside Celery's own ``result_*`` settings:

* ``ledger_auto_upgrade`` (default False): run the schema migrations when the
  backend first touches the database in this process.
* ``ledger_redact_kwargs`` / ``ledger_redact_args``: parameter and dict key names /
  positions stored as ``"[redacted]"`` with ``result_extended`` (see :mod:`ledger.redaction`).
* ``ledger_max_payload_bytes`` (default 64 MiB): the largest encoded event stored
  (result, traceback, args, kwargs together); args, kwargs and the traceback are
  cut to fit (:func:`ledger.events.fit_extras`), a larger result is refused and
  nothing is written.
* ``ledger_track_sent`` (default True): append ``task.sent`` when a task is
  published (one ledger write per ``.delay()``; see the README's trade-off) and
  ``ledger_track_received`` (default True): ``task.received`` when a worker takes
  the message (:mod:`ledger.lifecycle`). Celery's own states are unchanged.
* ``ledger_notify`` (default ``"ready"``): which stores send a PostgreSQL NOTIFY.
  ``"ready"``: all but STARTED, RETRY and custom progress states, which no
  ``get()`` waits for; followers find those by polling (0.1 s). ``"all"``: every
  store, for followers that need non-ready states at once, at the cost of
  notifying commits queueing behind each other (see :mod:`ledger.store.postgres`).

Environment: commands without a Celery app read the database URL from
``$LEDGER_DATABASE_URL``; ``$LEDGER_POOL_SIZE`` (default 8) sizes each process's
PostgreSQL connection pool; ``$LEDGER_WEB_AUTH`` holds the web console's
credentials (so they stay out of the process list and shell history).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ledger.errors import SettingError

#: The environment variable commands read the database URL from.
DATABASE_URL_ENV = "LEDGER_DATABASE_URL"
#: The database commands use when neither ``--db`` nor the environment names one.
DEFAULT_DATABASE_URL = "sqlite:///celery-ledger.db"
#: ``ledger_max_payload_bytes`` when unset.
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
#: The values ``ledger_notify`` accepts; the first is the default.
NOTIFY_MODES = ("ready", "all")


#: The web console's address and port when not given (loopback: see ledger.web.security).
WEB_HOST, WEB_PORT = "127.0.0.1", 5580
#: The environment variable holding the web console's ``--auth`` credentials.
WEB_AUTH_ENV = "LEDGER_WEB_AUTH"


#: The environment variable sizing a process's PostgreSQL pool, and its default.
POOL_SIZE_ENV, DEFAULT_POOL_SIZE = "LEDGER_POOL_SIZE", 8


def pool_size_from_env() -> int:
    """``$LEDGER_POOL_SIZE`` or 8: connections kept open per process and database."""
    text = os.environ.get(POOL_SIZE_ENV) or str(DEFAULT_POOL_SIZE)
    size = _whole_number(text.strip())
    if size is None or not 1 <= size <= 1000:
        raise SettingError(f"${POOL_SIZE_ENV} must be a whole number from 1 to 1000, not {text!r}")
    return size


def database_url_from_env() -> str:
    """``$LEDGER_DATABASE_URL``, or the default SQLite file in the current directory."""
    return os.environ.get(DATABASE_URL_ENV) or DEFAULT_DATABASE_URL


@dataclass(frozen=True)
class BackendSettings:
    """The ``ledger_*`` Celery settings of one app, validated."""

    auto_upgrade: bool = False
    redact_kwargs: frozenset[str] = frozenset()
    redact_args: frozenset[int] = frozenset()
    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    notify: str = NOTIFY_MODES[0]
    track_sent: bool = True
    track_received: bool = True

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any]) -> BackendSettings:
        """Read from a Celery ``app.conf``; :class:`SettingError` names a bad value."""
        notify = conf.get("ledger_notify") or NOTIFY_MODES[0]
        if notify not in NOTIFY_MODES:
            raise SettingError(
                f"ledger_notify must be one of {', '.join(map(repr, NOTIFY_MODES))}, not {notify!r}"
            )
        return cls(
            auto_upgrade=_flag(conf, "ledger_auto_upgrade", False),
            redact_kwargs=frozenset(_names(conf, "ledger_redact_kwargs")),
            redact_args=frozenset(_indexes(conf, "ledger_redact_args")),
            max_payload_bytes=_byte_count(conf, "ledger_max_payload_bytes"),
            notify=notify,
            track_sent=_flag(conf, "ledger_track_sent", True),
            track_received=_flag(conf, "ledger_track_received", True),
        )


#: The strings a flag setting takes (as Celery reads its own from the environment).
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _flag(conf: Mapping[str, Any], key: str, default: bool) -> bool:
    """A bool, or one of :data:`_TRUE`/:data:`_FALSE`: ``bool("no")`` is True, and a
    ``ledger_track_sent = "false"`` from a config file turned tracking on."""
    value = conf.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or (type(value) is int and value in (0, 1)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise SettingError(f"{key} must be True or False, not {value!r}")


def _items(conf: Mapping[str, Any], key: str) -> list[Any]:
    """A list setting: a list, tuple or set, or a string of comma-separated items (as
    Celery's list settings; ``frozenset("card")`` made the names c, a, r and d)."""
    value = conf.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, list | tuple | set | frozenset):
        return list(value)
    raise SettingError(f"{key} must be a list (or a comma-separated string), not {value!r}")


def _names(conf: Mapping[str, Any], key: str) -> list[str]:
    names = _items(conf, key)
    if not all(isinstance(n, str) and n for n in names):
        raise SettingError(f"{key} must list names (strings), not {conf.get(key)!r}")
    return names


def _indexes(conf: Mapping[str, Any], key: str) -> list[int]:
    indexes = []
    for item in _items(conf, key):
        text = str(item).strip()
        index = _whole_number(text.removeprefix("-"))  # -1: the last (ledger.redaction)
        if isinstance(item, bool | float) or index is None:
            raise SettingError(f"{key} must list argument positions (0, 1, ..., or -1 for the last), "
                               f"not {conf.get(key)!r}")
        indexes.append(-index if text.startswith("-") else index)
    return indexes


def _byte_count(conf: Mapping[str, Any], key: str) -> int:
    value = conf.get(key)
    if value is None:
        return MAX_PAYLOAD_BYTES
    size = _whole_number(str(value).strip())
    if isinstance(value, bool) or size is None or size < 1024:
        raise SettingError(f"{key} must be a whole number of bytes, at least 1024, not {value!r}")
    return size


def _whole_number(text: str) -> int | None:
    """``text`` as a whole number of ASCII digits only, else None: not ``int()``, which
    takes " 5", "1_000", "-5", "+5" and digits of other scripts."""
    return int(text) if text.isascii() and text.isdigit() else None
