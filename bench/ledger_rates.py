"""Rates of the ledger alone: bulk append, rebuild, relay to Kafka (Tansu).

Rebuild and relay are measured by the functions their authors offer
(``bench.rebuild_log.measure_rebuild(url, n)``: tops the log up to ``n`` events
set-based, then runs ``ledger.rebuild.rebuild``; ``bench.relay.measure_relay(url,
bootstrap, n)``: appends ``n`` events, then relays the whole log once), so the
bench times exactly the code operators run; if a function is missing the row
says so instead of guessing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from bench.processes import Job, Slice, timed_ops
from bench.stats import Run

BATCH = 500


def bulk_append(url: str, prefix: str) -> Job:
    """One child appends batches of ``BATCH`` task.state events until the deadline."""

    def job(child: int, deadline: float) -> Slice:
        from ledger.api import Ledger
        from ledger.events import Encoded, TaskState, utcnow

        ledger = Ledger.open(url)
        result = Encoded(content_type="application/json", data=b'{"n": 1, "ok": true}')

        def op(k: int) -> None:
            n = k * BATCH
            ledger.append([
                TaskState(task_id=f"{prefix}-{child}-{n + i}", status="SUCCESS", result=result, date_done=utcnow())
                for i in range(BATCH)
            ])

        s = timed_ops(deadline, op)
        s.ops *= BATCH  # events, not batches
        return s

    return job


def find(name: str, modules: tuple[str, ...]) -> Callable[..., Any] | None:
    """The first ``modules[i].name`` that imports; None while nobody offers it."""
    for module in modules:
        try:
            fn = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if callable(fn):
            return fn
    return None


REBUILD_MODULES = ("bench.rebuild_log", "ledger.rebuild")
RELAY_MODULES = ("bench.relay", "ledger.relay")


def _as_run(value: Any, n: int) -> Run:
    """Read what a measure_* function returns: ``{"events", "seconds"}`` or a rate in events/s."""
    if isinstance(value, dict) and "seconds" in value:
        return Run(ops=int(value.get("events", n)), seconds=float(value["seconds"]))
    if isinstance(value, (int, float)) and value > 0:
        return Run(ops=n, seconds=n / float(value))
    raise TypeError(f"cannot read a rate from {value!r}")


def rebuild(url: str, n: int) -> Run:
    fn = find("measure_rebuild", REBUILD_MODULES)
    if fn is None:
        return Run(0, 0, ok=False, note="no measure_rebuild(url, n) offered yet")
    return _as_run(fn(url, n), n)


def relay(url: str, bootstrap: str, n: int) -> Run:
    fn = find("measure_relay", RELAY_MODULES)
    if fn is None:
        return Run(0, 0, ok=False, note="no measure_relay(url, bootstrap, n) offered yet")
    return _as_run(fn(url, bootstrap, n), n)
