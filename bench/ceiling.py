"""Where a store's CPU goes, and how far the ledger is from the Redis backend even without durability.

    .venv/bin/python -m bench.ceiling [--rounds 3] [--seconds 4] [--processes 1,4]
        [--broker redis://127.0.0.1:6379/13]   (default: $LEDGER_BENCH_REDIS) [--out DIR]

Each case stores STARTED then SUCCESS through Celery's backend API from forked
children (``make bench``'s store runs, ``bench.backend_ops.store``) and reports
tasks/s with the CPU each task cost:

* *clients*: the storing children's own CPU time (``RUSAGE_CHILDREN``);
* *server*: the rest of the machine's busy time over the run (``/proc/stat``):
  PostgreSQL's processes (or Redis's) and the kernel's work for them, such as
  the WAL's writes -- and anything else running, so run it on a quiet machine;
* *busy*: the machine's busy time over the wall time, in cores (it has
  ``os.cpu_count()``).

The cases, in an order that rotates every round:

* ``ledger``: ``ledger+postgresql`` as it ships (each store waits for its WAL flush);
* ``ledger, synchronous_commit=off``: the same with every commit acknowledged
  before its flush (``PGOPTIONS``, checked on a connection before the run).
  Not a mode the ledger offers -- a store could then be lost after ``get()``
  returned it -- but the ceiling of this design here: what is left of the gap
  to Redis when the flush costs nothing;
* ``redis``: Celery's Redis backend, which never fsyncs on this machine;
* ``postgresql (raw), 2 commits per task``: no Celery, no ledger -- each task is
  two single-row ``INSERT`` s of 200 bytes, each its own durable commit, from
  psycopg (``bench.raw_pg``). The floor of any store that commits STARTED and
  SUCCESS durably on this server: what is left of a ledger task's cost above it
  is the ledger's and Celery's own work.
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from celery import Celery

from bench import raw_pg
from bench.args import measuring_parser
from bench.backend_ops import store
from bench.contenders import redis_cleanup, scratch_database
from bench.kept import RESULTS, keep
from bench.processes import merge, run_forked
from ledger.api import Ledger
from ledger.store import engine as database

LEDGER, RELAXED, REDIS_CASE = "ledger", "ledger, synchronous_commit=off", "redis"
RAW = "postgresql (raw), 2 commits per task"


@dataclass
class Sample:
    rate: float
    server_us: float
    client_us: float
    busy: float


def machine_cpu() -> float:
    """CPU seconds the whole machine has spent busy (``/proc/stat``: user, nice,
    system, irq and softirq time of every core; not idle, I/O wait or steal)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def pgoptions(value: str | None) -> Iterator[None]:
    """``PGOPTIONS`` for the connections opened inside (libpq reads it at connect)."""
    before = os.environ.get("PGOPTIONS")
    if value is not None:
        os.environ["PGOPTIONS"] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PGOPTIONS", None)
        else:
            os.environ["PGOPTIONS"] = before


def make_app(backend: str, broker: str) -> Celery:
    app = Celery("bench_ceiling", broker=broker, backend=backend, set_as_current=False)
    app.conf.update(result_serializer="json", accept_content=["json"], result_expires=3600)
    return app


def measure_once(case: str, backend: str, broker: str, processes: int, seconds: float, run_id: str) -> Sample:
    database._engines.clear()  # children build their own engines after fork
    prefix = f"{run_id}-{uuid.uuid4().hex[:8]}"
    job = raw_pg.insert(backend, prefix, per_op=2) if case == RAW else store(make_app(backend, broker), prefix)
    with pgoptions("-c synchronous_commit=off" if case == RELAXED else None):
        cpu0, children0, wall0 = machine_cpu(), resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
        run = merge(run_forked(job, processes, seconds))
        wall, children1, busy = time.monotonic() - wall0, resource.getrusage(resource.RUSAGE_CHILDREN), machine_cpu() - cpu0
    clients = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    return Sample(run.rate or 0.0, 1e6 * (busy - clients) / run.ops, 1e6 * clients / run.ops, busy / wall)


def check_relaxed(url: str) -> None:
    """The ceiling's label must be true: a connection opened with its PGOPTIONS runs without the flush."""
    with pgoptions("-c synchronous_commit=off"), psycopg.connect(url) as conn:
        setting = conn.execute("SHOW synchronous_commit").fetchone()[0]
    if setting != "off":
        raise SystemExit(f"PGOPTIONS did not reach the server: synchronous_commit is {setting!r}")


def main(argv: list[str] | None = None) -> int:
    p = measuring_parser("python -m bench.ceiling", __doc__, rounds=3, seconds=4.0, processes="4", who="storing",
                         broker_help="Redis URL, broker and Redis backend (default: LEDGER_BENCH_REDIS)")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for ceiling.json (default bench/results)")
    a = p.parse_args(argv)
    run_id = f"ceiling-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    cases = [(case, n) for n in a.processes for case in (LEDGER, RELAXED, REDIS_CASE, RAW)]
    samples: dict[tuple[str, int], list[Sample]] = {c: [] for c in cases}
    try:
        with scratch_database(f"ledger_bench_ceiling_{os.getpid()}") as pg_url:
            ledger_url = "ledger+" + pg_url.replace("postgresql://", "postgresql+psycopg://", 1)
            backends = {LEDGER: ledger_url, RELAXED: ledger_url, REDIS_CASE: a.broker, RAW: pg_url}
            try:
                Ledger.open(ledger_url, upgrade=True).engine.dispose()
                raw_pg.create_table(pg_url)
                check_relaxed(pg_url)
                for r in range(a.rounds):
                    for case, procs in cases[r % len(cases):] + cases[: r % len(cases)]:
                        s = measure_once(case, backends[case], a.broker, procs, a.seconds, run_id)
                        samples[(case, procs)].append(s)
                        print(f"[round {r + 1}/{a.rounds}] {case:<31} {procs}p {s.rate:,.0f} tasks/s, per "
                              f"task server {s.server_us:.0f} us, clients {s.client_us:.0f} us; busy "
                              f"{s.busy:.2f} cores", file=sys.stderr, flush=True)
            finally:
                database._engines.clear()
    finally:
        redis_cleanup(run_id, a.broker)
    print(f"\nstore STARTED+SUCCESS; {a.rounds} rounds x {a.seconds} s, medians; {os.cpu_count()} cores\n")
    print("| case | processes | tasks/s | x redis (per round) | server us/task | clients us/task | busy cores |")
    print("|---|---|---|---|---|---|---|")
    measured = []
    for case, procs in cases:
        ss, redis_ss = samples[(case, procs)], samples[(REDIS_CASE, procs)]
        ratios = [s.rate / t.rate for s, t in zip(ss, redis_ss, strict=True) if t.rate]
        row = {
            "case": case, "processes": procs,
            "rate": statistics.median(s.rate for s in ss),
            "x_redis_per_round": [round(x, 2) for x in ratios],
            "server_us": statistics.median(s.server_us for s in ss),
            "client_us": statistics.median(s.client_us for s in ss),
            "busy": statistics.median(s.busy for s in ss),
        }
        measured.append(row)
        print(f"| {case} | {procs} | {row['rate']:,.0f} | "
              f"{statistics.median(ratios):.2f}x ({', '.join(f'{x:.2f}' for x in ratios)}) | "
              f"{row['server_us']:.0f} | {row['client_us']:.0f} | {row['busy']:.2f} |")
    print(f"\nkept in {keep('ceiling', {'rows': measured, 'rounds': a.rounds, 'seconds': a.seconds}, a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
