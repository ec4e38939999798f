"""One interleaved bench run: every operation on every contender, round after round.

Within a round each operation is measured on all contenders back to back, in
an order that rotates every round, so that a noisy minute on this shared
machine hits every contender alike; the report takes medians over rounds.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from bench import backend_ops, chords, ledger_rates, raw_pg, tansu
from bench.contenders import Contender, Environment, ledger_available, make_app
from bench.processes import merge, run_forked
from bench.stats import Run, Summary

RAW = "postgresql (raw)"

#: Operation keys, in table order, with their labels and units.
OPERATIONS = {
    "store1": ("store STARTED+SUCCESS, 1 process", "tasks/s"),
    "store4": ("store STARTED+SUCCESS, 4 processes", "tasks/s"),
    "get": ("get_task_meta (finished task)", "ops/s"),
    "group": ("group save+restore (10 tasks)", "ops/s"),
    "chord10": ("chord 10 parts: last return -> body sent", "latency"),
    "chord100": ("chord 100 parts: last return -> body sent", "latency"),
    "forget": ("forget", "ops/s"),
    "append": ("ledger bulk append (batches of 500)", "events/s"),
    "rebuild": ("ledger rebuild", "events/s"),
    "relay": ("ledger relay to Kafka (Tansu)", "events/s"),
}


@dataclass
class Settings:
    rounds: int = 5
    seconds: float = 2.0
    chords_per_round: int = 3
    rebuild_events: int = 200_000
    #: enough that the relay's start (producer connection, topic metadata) does not
    #: dominate: measured 8,170 events/s at 2,000 events, 15,056 at 5,000 and
    #: 23,753-26,018 at 50,000, on one machine within minutes
    relay_events: int = 50_000
    only: set[str] | None = None
    ops: set[str] | None = None


@dataclass
class Results:
    """Runs per (operation, contender name), in the order measured."""

    runs: dict[tuple[str, str], list[Run]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def add(self, op: str, name: str, run: Run) -> None:
        self.runs.setdefault((op, name), []).append(run)

    def summaries(self) -> dict[tuple[str, str], Summary]:
        return {key: Summary.of(runs) for key, runs in self.runs.items()}


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _guarded(fn: Callable[[], Run]) -> Run:
    """A failing measurement is reported in the table, never the end of the run."""
    try:
        return fn()
    except Exception as exc:
        detail = traceback.format_exc().strip().splitlines()[-1]
        return Run(0, 0, ok=False, note=f"error: {detail or type(exc).__name__}"[:200])


def _describe(op: str, run: Run) -> str:
    if not run.ok and not run.ops:
        return f"FAILED ({run.note})"
    unit = OPERATIONS[op][1]
    if unit == "latency":
        p50 = run.p50
        return f"{len(run.latencies)} chords, p50 {p50 * 1000:.1f} ms" + ("" if run.ok else f" [{run.note}]")
    text = f"{run.rate or 0:,.0f} {unit}"
    return text + (f" [{run.note}]" if run.note else "")


def run_bench(settings: Settings, env: Environment) -> Results:
    """Measure every selected operation on every selected contender, ``settings.rounds`` times."""
    return Bench(settings, env).run()


class Bench:
    def __init__(self, settings: Settings, env: Environment) -> None:
        self.s, self.env, self.results = settings, env, Results()
        self.ops = [op for op in OPERATIONS if settings.ops is None or op in settings.ops]
        all_contenders = {c.name: c for c in env.contenders()}
        self.ledger_pg = all_contenders["ledger+postgresql"]
        self.ledger_sqlite = all_contenders["ledger+sqlite"]
        self.contenders = [c for c in all_contenders.values() if self.wanted(c.name)]
        self.with_raw = self.wanted(RAW)
        self.stored: dict[str, list[str]] = {}
        self.tag = ""
        self.head = ""

    def wanted(self, name: str) -> bool:
        return self.s.only is None or name in self.s.only

    def run(self) -> Results:
        missing = ledger_available()
        if missing:
            for c in self.contenders:
                if c.family == "ledger":
                    self.results.skipped[c.name] = missing
            self.contenders = [c for c in self.contenders if c.family != "ledger"]
        for c in self.contenders:
            progress(f"preparing {c.name}")
            self.env.prepare(c)
        if {"append", "rebuild", "relay"} & set(self.ops):
            for c in (self.ledger_pg, self.ledger_sqlite):
                if self.wanted(c.name) and c not in self.contenders:
                    self.env.prepare(c)
        if self.with_raw:
            raw_pg.create_table(self.env.pg_url)
        with tansu.broker() as bootstrap:
            self.bootstrap = bootstrap
            for r in range(self.s.rounds):
                self.round(r)
        return self.results

    def measure(self, op: str, name: str, fn: Callable[[], Run]) -> None:
        progress(f"{self.head} {op:<9} {name:<20} ...")
        run = _guarded(fn)
        self.results.add(op, name, run)
        progress(f"{self.head} {op:<9} {name:<20} {_describe(op, run)}")

    def round(self, r: int) -> None:
        n = len(self.contenders)
        order = self.contenders[r % n :] + self.contenders[: r % n] if n else []
        apps = {c.name: make_app(c, self.env) for c in order}
        self.stored = {}
        self.tag = f"{self.env.run_id}-r{r}"
        self.head = f"[round {r + 1}/{self.s.rounds}]"
        for op in self.ops:
            for c in order:
                self.backend_op(op, c, apps[c.name])
            if self.with_raw and op in ("store1", "store4", "get"):
                self.raw_op(op)
            if op in ("append", "rebuild", "relay"):
                self.ledger_op(op)

    def backend_op(self, op: str, c: Contender, app) -> None:
        seconds, name = self.s.seconds, c.name
        if op in ("store1", "store4"):
            self.measure(op, name, partial(self.store, op, c, app))
        elif op in ("chord10", "chord100"):
            if not c.native_chords:
                self.results.skipped[name + " chords"] = (
                    "Celery's database backend has no native chords: "
                    "it polls celery.chord_unlock (every 1 s by default)"
                )
                return
            size = 10 if op == "chord10" else 100
            prefix = f"{self.tag}-{op}-{name}"
            self.measure(op, name, partial(_chords, c, self.env, app, size, prefix, self.s.chords_per_round))
        elif not self.stored.get(name):
            return  # nothing stored this round to read, group or forget
        elif op == "get":
            job = backend_ops.get_task_meta(app, self.stored[name])
            self.measure(op, name, partial(_checked, job, seconds, "wrong meta"))
        elif op == "group":
            job = backend_ops.group_save_restore(app, f"{self.tag}-g-{name}", self.stored[name])
            self.measure(op, name, partial(_checked, job, seconds, "group not restored whole"))
        elif op == "forget":
            job = backend_ops.forget(app, self.stored[name])
            self.measure(op, name, partial(_checked, job, seconds, "forgotten task not PENDING"))

    def store(self, op: str, c: Contender, app) -> Run:
        prefix = f"{self.tag}-{op}-{c.name}"
        slices = run_forked(backend_ops.store(app, prefix), 1 if op == "store1" else 4, self.s.seconds)
        self.stored.setdefault(c.name, []).extend(backend_ops.task_ids(prefix, slices))
        return merge(slices)

    def raw_op(self, op: str) -> None:
        if op == "get":
            job = raw_pg.select(self.env.pg_url, self.stored.get(RAW) or ["missing"])
            self.measure(op, RAW, partial(_checked, job, self.s.seconds, "row missing"))
        else:
            self.measure(op, RAW, partial(self.raw_insert, 1 if op == "store1" else 4))

    def raw_insert(self, procs: int) -> Run:
        prefix = f"{self.tag}-raw{procs}"
        slices = run_forked(raw_pg.insert(self.env.pg_url, prefix), procs, self.s.seconds)
        self.stored.setdefault(RAW, []).extend(backend_ops.task_ids(prefix, slices))
        return merge(slices)

    def ledger_op(self, op: str) -> None:
        pg_url = self.ledger_pg.url.removeprefix("ledger+")
        if op == "append":
            for c in (self.ledger_pg, self.ledger_sqlite):
                if self.wanted(c.name):
                    job = ledger_rates.bulk_append(c.url.removeprefix("ledger+"), f"{self.tag}-bulk-{c.name}")
                    self.measure(op, c.name, partial(_timed, job, self.s.seconds))
        elif not self.wanted(self.ledger_pg.name):
            return
        elif op == "rebuild":
            self.measure(op, self.ledger_pg.name, partial(ledger_rates.rebuild, pg_url, self.s.rebuild_events))
        elif self.bootstrap is None:
            self.results.add(op, self.ledger_pg.name, Run(0, 0, ok=False, note="no Kafka broker"))
        else:
            self.measure(
                op, self.ledger_pg.name, partial(ledger_rates.relay, pg_url, self.bootstrap, self.s.relay_events)
            )


def _timed(job, seconds: float) -> Run:
    return merge(run_forked(job, 1, seconds))


def _checked(job, seconds: float, what: str) -> Run:
    """One child runs ``job``; the run is not ok if the job counted wrong answers."""
    slices = run_forked(job, 1, seconds)
    bad = sum(s.extra or 0 for s in slices)
    run = merge(slices)
    if bad:
        run.ok, run.note = False, f"{bad} x {what}"
    return run


def _chords(c: Contender, env: Environment, worker_app, size: int, prefix: str, count: int) -> Run:
    setup_app = make_app(c, env)
    runs = [chords.measure_chord(setup_app, worker_app, size, f"{prefix}-{i}") for i in range(count)]
    latencies = [x for r in runs for x in r.latencies]
    fired = sum(r.ok for r in runs)
    note = "; ".join(sorted({r.note for r in runs if r.note}))
    return Run(
        ops=fired,
        seconds=sum(latencies),
        latencies=latencies,
        ok=fired == count,
        note=f"fired exactly once {fired}/{count}" + (f"; {note}" if note else ""),
    )
