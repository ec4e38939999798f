"""Payload encoding for the log: msgpack with exact round-trips.

* ``datetime`` travels as msgpack's timestamp extension and always comes back
  timezone-aware in UTC (a naive datetime is refused: the log has one clock).
* ``uuid.UUID`` travels as extension type 1 (16 raw bytes).
* ``bytes`` stay bytes, ``str`` stays str (``use_bin_type``), tuples become lists.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import msgpack

from ledger.errors import CodecError

_UUID_EXT = 1


def _default(obj: Any) -> Any:
    if isinstance(obj, uuid.UUID):
        return msgpack.ExtType(_UUID_EXT, obj.bytes)
    if isinstance(obj, datetime):
        if obj.tzinfo is None:
            raise CodecError(f"naive datetime {obj.isoformat()} has no timezone; use UTC")
        return msgpack.Timestamp.from_datetime(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise CodecError(f"cannot encode {type(obj).__name__} value {obj!r:.80}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _UUID_EXT:
        return uuid.UUID(bytes=data)
    return msgpack.ExtType(code, data)


def dumps(value: Any) -> bytes:
    try:
        # datetime=False so that _default sees every datetime and can refuse naive ones.
        return msgpack.packb(value, default=_default, use_bin_type=True, datetime=False)
    except (TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, CodecError):
            raise
        raise CodecError(str(exc)) from exc


def loads(data: bytes) -> Any:
    try:
        value = msgpack.unpackb(
            data, raw=False, ext_hook=_ext_hook, timestamp=3, strict_map_key=False
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise CodecError(f"corrupt msgpack payload ({len(data)} bytes): {exc}") from exc
    # timestamp=3: every timestamp comes back as a timezone-aware UTC datetime.
    return value
