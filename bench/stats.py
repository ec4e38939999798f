"""Summaries of timed runs: rates, latency percentiles, medians across rounds."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = math.ceil(q / 100 * len(ordered))
    return ordered[max(0, min(len(ordered), rank) - 1)]


@dataclass
class Run:
    """One measurement of one operation on one contender in one round."""

    ops: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    note: str = ""
    ok: bool = True

    @property
    def rate(self) -> float | None:
        return self.ops / self.seconds if self.seconds > 0 and self.ops else None

    @property
    def p50(self) -> float | None:
        return percentile(self.latencies, 50)

    @property
    def p99(self) -> float | None:
        return percentile(self.latencies, 99)


@dataclass
class Summary:
    """Medians over the rounds of one (operation, contender)."""

    rate: float | None
    p50: float | None
    p99: float | None
    rounds: int
    rates: list[float]
    ok: bool
    note: str

    @classmethod
    def of(cls, runs: Sequence[Run]) -> Summary:
        rates = [r.rate for r in runs if r.rate is not None]
        p50s = [r.p50 for r in runs if r.p50 is not None]
        p99s = [r.p99 for r in runs if r.p99 is not None]
        notes = sorted({r.note for r in runs if r.note})
        return cls(
            rate=statistics.median(rates) if rates else None,
            p50=statistics.median(p50s) if p50s else None,
            p99=statistics.median(p99s) if p99s else None,
            rounds=len(runs),
            rates=rates,
            ok=all(r.ok for r in runs),
            note="; ".join(notes),
        )
