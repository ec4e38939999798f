"""Every error the ledger raises, in one tree under :class:`LedgerError`.

Catch ``LedgerError`` for anything the ledger itself refuses or cannot do. Each
class also keeps the built-in base that says what kind of mistake it is
(``ValueError`` for bad values, ``LookupError`` for unknown ids), so callers that
catch those keep working. Errors Celery sees are Celery's own
(``BackendStoreError``/``BackendGetMetaError``, raised by :mod:`ledger.celery` with
one of these as the cause). Pure: importing this imports nothing else.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base of every error raised by celery-ledger."""


# -- values that cannot be stored or read ----------------------------------------------


class InvalidEvent(LedgerError, ValueError):
    """An event failed validation; the message names the offending field."""


class EventTooLarge(InvalidEvent):
    """An event's encoded payload is over the ledger's size limit (``ledger_max_payload_bytes``)."""


class CodecError(LedgerError, ValueError):
    """A value cannot be encoded, or bytes are not a valid payload."""


class CorruptEvent(LedgerError, ValueError):
    """A stored payload could not be decoded into its event model."""


class BadRecord(LedgerError, ValueError):
    """A record on the topic is not in the ledger's record format."""


class BadDatabaseURL(LedgerError, ValueError):
    """The database URL cannot be used by the ledger."""


class SettingError(LedgerError, ValueError):
    """A ``ledger_*`` setting has a value the ledger cannot use."""


class BadFilter(LedgerError, ValueError):
    """A task catalogue filter that cannot be applied; the message names it."""


class BadAuth(LedgerError, ValueError):
    """The web console's ``--auth`` value cannot be used."""


class UnsafeBind(LedgerError, ValueError):
    """The web console was asked to listen beyond loopback without credentials."""


# -- concurrency -------------------------------------------------------------------------


class VersionConflict(LedgerError):
    """Optimistic concurrency: the stream was not at the expected version."""

    def __init__(self, stream_id: str, expected: int, actual: int | None) -> None:
        where = (
            f"the stream is at version {actual}"
            if actual is not None
            else "a concurrent append took that version"
        )
        super().__init__(
            f"version conflict on stream {stream_id!r}: expected version {expected}, {where}"
        )
        self.stream_id, self.expected, self.actual = stream_id, expected, actual


class RetryableConflict(LedgerError):
    """Concurrent appenders collided; the unit of work is retried in a new transaction."""


# -- lookups -----------------------------------------------------------------------------


class NotFound(LedgerError, LookupError):
    """The log holds nothing under the id asked for."""


class UnknownTask(NotFound):
    """The log holds no event for this task id."""


class UnknownId(NotFound):
    """No task, group or chord with this id in the log."""


# -- operations --------------------------------------------------------------------------


class SchemaMissing(LedgerError):
    """The database has no ledger schema, or an older one: the message names the command to run."""


class DowngradeRefused(LedgerError):
    """A downgrade would drop tables holding events, and was not confirmed."""


class SchemaError(LedgerError):
    """A migration or schema check could not run (an unknown revision, a differing schema)."""


class RebuildError(LedgerError, RuntimeError):
    """The rebuild could not complete; the live tables are unchanged."""


class DeliveryFailed(LedgerError):
    """The broker did not acknowledge every record of a batch."""


class KafkaUnavailable(LedgerError):
    """``relay --once`` gave up: Kafka failed every attempt in a row."""
