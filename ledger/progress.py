"""A one-line progress bar with rate and ETA, drawn only for a person at a terminal.

It writes to stderr, so that ``celery-ledger export > file`` keeps stdout clean,
and it draws nothing when stderr is not a TTY (pipes, CI logs, tests).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class Progress:
    """Counts work done out of ``total`` and redraws at most every ``interval`` seconds."""

    def __init__(
        self,
        label: str,
        total: int | None,
        *,
        unit: str = "events",
        stream: TextIO | None = None,
        interval: float = 0.2,
    ) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _isatty(self.stream)
        self.interval = interval
        self.done = 0
        self.started = time.monotonic()
        self._drawn = 0.0
        self._lock = threading.Lock()  # rebuild workers advance from several threads

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if self.enabled and now - self._drawn >= self.interval:
                self._drawn = now
                self._draw(now)

    def set(self, done: int) -> None:
        self.advance(done - self.done)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        """Units per second so far."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def _draw(self, now: float) -> None:
        rate = self.rate
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            line = (
                f"\r{self.label} [{bar:<30}] {frac:6.1%} {self.done:,}/{self.total:,} {self.unit}"
                f"  {rate:,.0f}/s  ETA {_clock(eta)}"
            )
        else:
            line = f"\r{self.label} {self.done:,} {self.unit}  {rate:,.0f}/s  {_clock(now - self.started)}"
        self.stream.write(line.ljust(100)[:120])
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line (nothing when not on a TTY)."""
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "--:--"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
