"""Argument types: times and log positions (ledger/times.py parses them), seconds."""

from __future__ import annotations

import math
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


class Seconds(click.FloatRange):
    """Seconds in (0, ``max``]; NaN refused too (click's FloatRange lets it through:
    every comparison with NaN is false)."""

    def __init__(self, max: float) -> None:
        super().__init__(min=0, min_open=True, max=max)

    def convert(self, value, param, ctx) -> float:
        seconds = super().convert(value, param, ctx)
        if math.isnan(seconds):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return seconds


TIME = Time()
TIME_OR_POSITION = TimeOrPosition()
TIME_HELP = f"{EXAMPLES}; no zone means UTC"
