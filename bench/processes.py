"""Prefork-like measurement: N forked processes start together and report their timings.

As in a Celery prefork worker, whatever the parent built (an app, a backend
that has not connected yet) is inherited through ``fork`` and each child opens
its own connections. The children are billiard processes, like the prefork
pool's, so the after-fork hooks that Celery and kombu register run as in a
worker: Celery's database backend, for one, switches from a connection per
session (NullPool) to a pooled engine only in a forked child.
"""

from __future__ import annotations

import contextlib
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import billiard

from bench.stats import Run

_fork = billiard.get_context("fork")


@dataclass
class Slice:
    """What one child measured: its operations, their latencies, its own start and end."""

    ops: int = 0
    started: float = 0.0
    ended: float = 0.0
    latencies: list[float] = field(default_factory=list)
    extra: Any = None


Job = Callable[[int, float], Slice]
"""``job(child_index, deadline)`` runs operations until the deadline and returns a Slice."""


def timed_ops(
    deadline: float,
    op: Callable[[int], Any],
    wrong: Callable[[int, Any], bool] | None = None,
    limit: int | None = None,
) -> Slice:
    """Run ``op(n)`` for n = 0, 1, ... until ``deadline`` (or ``limit`` operations).

    Each call's latency is recorded; ``wrong(n, value)``, when given, checks what
    ``op`` returned after its time is taken, and the count of wrong answers goes
    to ``extra`` (a checked job's result is not ok if it is not 0).
    """
    s = Slice(started=time.monotonic(), extra=None if wrong is None else 0)
    n = 0
    while (limit is None or n < limit) and (t0 := time.monotonic()) < deadline:
        value = op(n)
        s.latencies.append(time.monotonic() - t0)
        if wrong is not None and wrong(n, value):
            s.extra += 1
        n += 1
    s.ended, s.ops = time.monotonic(), n
    return s


class ChildFailed(RuntimeError):
    """A measuring child raised; the message carries its traceback."""


def _child(job: Job, index: int, duration: float, barrier, done, out) -> None:
    try:
        barrier.wait(60)
        # One shared start: the deadline is fixed after everybody is ready.
        deadline = time.monotonic() + duration
        report = ("ok", job(index, deadline))
    except BaseException:  # report everything, the parent decides
        report = ("error", traceback.format_exc())
    try:
        out.send(report)
    finally:
        out.close()
    # Stay until every child has finished, as a worker's pool processes stay
    # between tasks: a child that exits tears down its interpreter and its
    # connections (PostgreSQL ends a backend per connection) on the CPUs the
    # others are still measuring on. Measured, 2 runs of 20 chords of 10 parts
    # per backend: p50 Redis 2.8 and 2.1 ms, ledger 3.7 and 3.0 ms, with chords
    # of 5-10 ms on both, while the first children to finish exited; Redis 2.2
    # and 1.8 ms, ledger 2.3 and 2.3 ms, none over 4.6 ms, once they waited here.
    with contextlib.suppress(threading.BrokenBarrierError):  # the parent gave up on a child
        done.wait(60)


def run_forked(job: Job, processes: int, duration: float, timeout: float = 300) -> list[Slice]:
    """Run ``job`` in ``processes`` forked children for about ``duration`` seconds.

    Every child stays alive until all have reported (``_child``); they exit together.
    """
    barrier, done = _fork.Barrier(processes), _fork.Barrier(processes)
    children, pipes = [], []
    for i in range(processes):
        recv, send = _fork.Pipe(duplex=False)
        p = _fork.Process(target=_child, args=(job, i, duration, barrier, done, send), daemon=True)
        p.start()
        send.close()
        children.append(p)
        pipes.append(recv)
    slices, errors = [], []
    for p, pipe in zip(children, pipes, strict=True):
        if not pipe.poll(timeout):
            errors.append(f"child {p.pid} reported nothing within {timeout}s")
            continue
        try:
            status, value = pipe.recv()
        except EOFError:
            status, value = "error", f"child {p.pid} died (exit code {p.exitcode})"
        (slices if status == "ok" else errors).append(value)
    if errors:
        done.abort()  # a child that reported nothing will never reach the barrier
    for p in children:
        p.join(10)
        if p.is_alive():
            p.kill()
    if errors:
        raise ChildFailed(errors[0])
    return slices


def merge(slices: list[Slice], note: str = "") -> Run:
    """Total operations over the wall time from the first start to the last end."""
    ops = sum(s.ops for s in slices)
    seconds = max(s.ended for s in slices) - min(s.started for s in slices)
    latencies = [x for s in slices for x in s.latencies]
    return Run(ops=ops, seconds=seconds, latencies=latencies, note=note)
