"""Appends at a steady rate, each timed when its commit returned (for latency runs)."""

from __future__ import annotations

import time
import uuid

from ledger.api import Ledger
from ledger.events import RecordedEvent, TaskState


def paced_appends(ledger: Ledger, n: int, rate: float, prefix: str) -> list[tuple[RecordedEvent, float]]:
    """``n`` single-event transactions at ``rate``/s: each event with its ``perf_counter()``."""
    run = f"{prefix}-{uuid.uuid4().hex[:6]}"
    out = []
    for i in range(n):
        result = ledger.append([TaskState(task_id=f"{run}-{i}", status="SUCCESS")])
        out.append((result.recorded[0], time.perf_counter()))
        time.sleep(1 / rate)
    return out
