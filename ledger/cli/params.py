"""Argument types: times and log positions, parsed where the arguments are."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import click


class Time(click.ParamType):
    """ISO 8601 date or datetime; a value without a zone is taken as UTC."""

    name = "TIME"

    def convert(self, value, param, ctx) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 time (e.g. 2026-01-31T12:00:00+00:00)", param, ctx)
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=timezone.utc)


class TimeOrPosition(Time):
    """A log position (an integer) or an ISO 8601 time."""

    name = "TIME|POSITION"

    def convert(self, value, param, ctx) -> datetime | int:
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        return super().convert(value, param, ctx)


class RecentTime(Time):
    """An ISO 8601 time, or a time before now: ``-90s``, ``-10m``, ``-1h``, ``-7d``."""

    name = "TIME|-AGE"
    _AGE = re.compile(r"-(\d+(?:\.\d+)?)([smhd])")
    _UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}

    def convert(self, value, param, ctx) -> datetime:
        if isinstance(value, str) and (age := self._AGE.fullmatch(value.strip())):
            amount, unit = age.groups()
            return datetime.now(timezone.utc) - timedelta(**{self._UNITS[unit]: float(amount)})
        if isinstance(value, str) and value.strip().startswith("-"):
            self.fail(f"{value!r} is not an age: -N followed by s, m, h or d (e.g. -1h)", param, ctx)
        return super().convert(value, param, ctx)


TIME = Time()
TIME_OR_POSITION = TimeOrPosition()
RECENT_TIME = RecentTime()
