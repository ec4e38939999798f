"""Times as people type them: ISO 8601 (``Z`` included), ``-1h``, ``yesterday``; ``@N`` for a log position.

Pure (dateutil only), so that every supported Python parses the same way:
``datetime.fromisoformat`` refuses ``...Z`` before Python 3.11.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from dateutil.parser import isoparse

_RELATIVE = re.compile(r"^-(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
#: ledger.store.base.MAX_SQL_INT, not imported (this module stays free of SQLAlchemy):
#: ``@N`` past it is shown, and read, as the whole log.
MAX_POSITION = 2**63 - 1
EXAMPLES = "ISO 8601 (2026-01-31T12:00:00Z, 2026-01-31), -30m, -1h, -2d, now, today, yesterday"


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An aware UTC-or-given-zone datetime; a value without a zone is UTC. Raises ValueError."""
    now = now or datetime.now(timezone.utc)
    word = text.strip().lower()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    named = {"now": now, "today": midnight, "yesterday": midnight - timedelta(days=1)}
    if word in named:
        return named[word]
    relative = _RELATIVE.match(word)
    if relative:
        try:
            return now - timedelta(**{_UNITS[relative.group(2)]: int(relative.group(1))})
        except OverflowError:  # before the year 1 (or past what timedelta holds)
            raise ValueError(f"{text!r} is before the year 1: use {EXAMPLES}") from None
    if word.isdigit() and len(word) > 8:
        # Not a date: most likely a Unix timestamp, which isoparse would misread.
        raise ValueError(f"{text!r} is not a time: use {EXAMPLES}")
    try:
        value = isoparse(text.strip())
    except (ValueError, OverflowError):
        raise ValueError(f"{text!r} is not a time: use {EXAMPLES}") from None
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    try:
        # The ledger compares and stores times in UTC: an offset can carry a
        # valid local time past either end of what a datetime holds
        # (0001-01-01T00:00+01:00 is in the year 0, 9999-12-31T23:59-12:00 in 10000).
        value.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError(f"{text!r} is outside the years 1 to 9999 in UTC: use {EXAMPLES}") from None
    return value


def parse_as_of(text: str, now: datetime | None = None) -> datetime | int:
    """``@N``: the log position N; anything else: a time (:func:`parse_time`).

    A bare number is refused: a log position and a Unix timestamp look alike.
    """
    stripped = text.strip()
    if stripped.startswith("@"):
        digits = stripped[1:]
        if not (digits.isascii() and digits.isdigit()):  # not "@²", which isdigit() takes
            raise ValueError(f"{text!r} is not a log position: use @ and a number, e.g. @123")
        # Past the largest position a log can hold (a signed 64-bit integer, which
        # SQLite's driver cannot go beyond): the whole log.
        return min(int(digits), MAX_POSITION)
    if stripped.isdigit():
        raise ValueError(f"{text!r} is ambiguous: write @{stripped} for a log position, or a time")
    return parse_time(text, now)
