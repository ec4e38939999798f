"""Argument types: times and log positions (ledger/times.py parses them)."""

from __future__ import annotations

from datetime import datetime

import click

from ledger.times import EXAMPLES, parse_as_of, parse_time


class Time(click.ParamType):
    name = "TIME"

    def convert(self, value, param, ctx) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return parse_time(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class TimeOrPosition(click.ParamType):
    name = "TIME|@POSITION"

    def convert(self, value, param, ctx) -> datetime | int:
        if isinstance(value, datetime | int):
            return value
        try:
            return parse_as_of(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


TIME = Time()
TIME_OR_POSITION = TimeOrPosition()
TIME_HELP = f"{EXAMPLES}; no zone means UTC"
