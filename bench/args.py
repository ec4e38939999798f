"""Command-line values the bench tools share, refused by argparse when they make no run.

``--rounds 0`` or ``--seconds 0`` used to run and write a table of nothing, and
``--processes 1,x`` ended in a traceback; each now stops at once with a
one-line usage error naming the value.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from bench.contenders import REDIS


def _positive(kind: Callable[[str], float], name: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a finite number more than 0, got {text!r}")
        return value

    return parse


positive_int = _positive(int, "a whole number")
positive_float = _positive(float, "a number of seconds")


def process_counts(text: str) -> list[int]:
    """``1,4`` -> ``[1, 4]``: each a process count of at least 1."""
    try:
        return [int(positive_int(n)) for n in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected process counts of at least 1 separated by commas (like 1,4), got {text!r}"
        ) from None


def measuring_parser(prog: str, doc: str | None, *, rounds: int, seconds: float, processes: str,
                     who: str, broker_help: str) -> argparse.ArgumentParser:
    """The parser of a tool that measures ``--rounds`` x ``--seconds`` per case and
    ``--processes`` count (``bench.ceiling``, ``bench.delay``)."""
    p = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n")[0])
    p.add_argument("--rounds", type=positive_int, default=rounds)
    p.add_argument("--seconds", type=positive_float, default=seconds, help="seconds per measurement")
    p.add_argument("--processes", type=process_counts, default=process_counts(processes),
                   help=f"{who} processes per case (default {processes})")
    p.add_argument("--broker", default=REDIS, help=broker_help)
    return p
