"""Argument types: times and log positions, parsed where the arguments are."""

from __future__ import annotations

from datetime import datetime, timezone

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


TIME = Time()
TIME_OR_POSITION = TimeOrPosition()
