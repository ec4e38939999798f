"""The bench's output: a table (plain and markdown), target checks, and a JSON record.

Ratios are "times as fast" (higher is better) against the database backend on
the same database (``db+postgresql`` for PostgreSQL rows, ``db+sqlite`` for
SQLite rows) and against the Redis backend; for latency rows they compare p50
latencies. ``x raw`` reads a row as a fraction of what PostgreSQL itself does on
one connection: store counts two commits per task against single-row
INSERT+COMMIT with the same number of processes; get_task_meta against a
primary-key SELECT.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from bench.run import OPERATIONS, RAW, Results
from bench.stats import Summary


@dataclass
class Row:
    op: str
    operation: str
    backend: str
    unit: str
    rate: float | None
    p50_ms: float | None
    p99_ms: float | None
    x_db: float | None
    x_redis: float | None
    x_raw: float | None
    rounds: int
    ok: bool
    note: str


RAW_WHAT = {
    "store1": "single-row INSERT+COMMIT/s, psycopg",
    "store4": "single-row INSERT+COMMIT/s, psycopg",
    "get": "primary-key SELECT/s, psycopg",
}


def _db_for(backend: str) -> str | None:
    if backend.endswith("postgresql"):
        return "db+postgresql"
    if backend.endswith("sqlite"):
        return "db+sqlite"
    return None


def _ratio(op: str, mine: Summary | None, other: Summary | None) -> float | None:
    if mine is None or other is None or mine is other:
        return None
    if OPERATIONS[op][1] == "latency":
        return other.p50 / mine.p50 if mine.p50 and other.p50 else None
    return mine.rate / other.rate if mine.rate and other.rate else None


def rows(results: Results) -> list[Row]:
    summaries = results.summaries()
    order = ["ledger+postgresql", "ledger+sqlite", "db+postgresql", "db+sqlite", "redis", RAW]
    out = []
    for op, (label, unit) in OPERATIONS.items():
        names = sorted({n for (o, n) in summaries if o == op}, key=lambda n: order.index(n) if n in order else 99)
        for name in names:
            s = summaries[(op, name)]
            raw_row = name == RAW
            db = None if raw_row else _db_for(name)
            x_raw = None
            raw = summaries.get((op, RAW))
            if name.endswith("postgresql") and not raw_row and raw is not None and raw.rate and s.rate:
                x_raw = (2 * s.rate if op.startswith("store") else s.rate) / raw.rate
                x_raw = x_raw if op in ("store1", "store4", "get") else None
            out.append(
                Row(
                    op=op,
                    operation=label,
                    backend=name,
                    unit="ops/s" if raw_row else unit,
                    rate=None if unit == "latency" else s.rate,
                    p50_ms=s.p50 * 1000 if s.p50 is not None else None,
                    p99_ms=s.p99 * 1000 if s.p99 is not None else None,
                    x_db=_ratio(op, s, summaries.get((op, db))) if db and name != db else None,
                    x_redis=None if raw_row or name == "redis" else _ratio(op, s, summaries.get((op, "redis"))),
                    x_raw=x_raw,
                    rounds=s.rounds,
                    ok=s.ok,
                    note=s.note or (RAW_WHAT.get(op, "") if raw_row else ""),
                )
            )
    return out


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "rate":
        return f"{value:,.0f}"
    if kind == "ms":
        return f"{value:.2f}" if value < 10 else f"{value:.1f}"
    return f"{value:.2f}x"


def _cells(r: Row) -> list[str]:
    rate = _fmt(r.rate, "rate") + (f" {r.unit}" if r.rate is not None else "")
    if not r.ok and r.rate is None and r.p50_ms is None:
        rate = "FAILED"
    return [
        r.operation,
        r.backend,
        rate,
        _fmt(r.p50_ms, "ms"),
        _fmt(r.p99_ms, "ms"),
        _fmt(r.x_db, "x"),
        _fmt(r.x_redis, "x"),
        _fmt(r.x_raw, "x"),
        ("" if r.ok else "NOT OK: ") + r.note,
    ]


HEADER = ["operation", "backend", "rate (median)", "p50 ms", "p99 ms", "x db", "x redis", "x raw PG", "note"]


def table(rs: list[Row]) -> str:
    lines = [HEADER] + [_cells(r) for r in rs]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown(rs: list[Row]) -> str:
    out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rs:
        out.append("| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |")
    return "\n".join(out)


@dataclass
class Target:
    name: str
    holds: bool | None
    figures: str


def targets(rs: list[Row]) -> list[Target]:
    by = {(r.op, r.backend): r for r in rs}
    out: list[Target] = []

    def get(op: str, backend: str) -> Row | None:
        return by.get((op, backend))

    for op in ("store1", "store4"):
        r = get(op, "ledger+postgresql")
        if r is None or r.x_db is None or r.x_redis is None:
            out.append(Target(f"{op}: ledger+postgresql >= 2x db+postgresql and >= 0.5x redis", None, "not measured"))
            continue
        out.append(Target(
            f"{op}: ledger+postgresql >= 2x db+postgresql and >= 0.5x redis",
            r.x_db >= 2 and r.x_redis >= 0.5,
            f"{r.x_db:.2f}x db, {r.x_redis:.2f}x redis",
        ))
    # get_task_meta against a raw primary-key SELECT: 0.7x is issue 19's target.
    name = "get_task_meta: ledger+postgresql >= db+postgresql and >= 0.7x raw PK SELECT"
    r = get("get", "ledger+postgresql")
    if r is None or r.x_db is None or r.x_raw is None:
        out.append(Target(name, None, "not measured"))
    else:
        out.append(Target(name, r.x_db >= 1 and r.x_raw >= 0.7, f"{r.x_db:.2f}x db, {r.x_raw:.2f}x raw"))
    for op, parts in (("chord10", 10), ("chord100", 100)):
        name = f"chord {parts}: fires exactly once, p50 latency <= redis"
        r, redis = get(op, "ledger+postgresql"), get(op, "redis")
        if r is None or r.x_redis is None or redis is None:
            out.append(Target(name, None, "not measured"))
        else:
            out.append(Target(
                name, r.ok and r.x_redis >= 1, f"{r.note}; p50 {r.p50_ms:.1f} ms vs redis {redis.p50_ms:.1f} ms"
            ))
    for op, floor in (("rebuild", 100_000), ("relay", 10_000)):
        r = get(op, "ledger+postgresql")
        if r is None or r.rate is None:
            out.append(Target(f"{op} >= {floor:,} events/s", None, r.note if r else "not measured"))
        else:
            out.append(Target(f"{op} >= {floor:,} events/s", r.rate >= floor, f"{r.rate:,.0f} events/s"))
    return out


def targets_text(ts: list[Target]) -> str:
    mark = {True: "MET   ", False: "MISSED", None: "n/a   "}
    return "\n".join(f"  {mark[t.holds]} {t.name}: {t.figures}" for t in ts)


def machine(pg_url: str) -> dict:
    info = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
        with open("/proc/meminfo") as f:
            info["memory_gb"] = round(int(f.readline().split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        import psycopg

        with psycopg.connect(pg_url) as conn:
            info["postgresql"] = conn.execute("SHOW server_version").fetchone()[0]
            info["synchronous_commit"] = conn.execute("SHOW synchronous_commit").fetchone()[0]
            info["fsync"] = conn.execute("SHOW fsync").fetchone()[0]
        info["redis"] = subprocess.run(
            ["redis-cli", "INFO", "server"], capture_output=True, text=True, timeout=5
        ).stdout.split("redis_version:", 1)[1].split()[0]
    except Exception:  # machine facts are best effort
        pass
    return info


def write_json(path: Path, rs: list[Row], ts: list[Target], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        **meta,
        "rows": [asdict(r) for r in rs],
        "targets": [asdict(t) for t in ts],
    }
    path.write_text(json.dumps(record, indent=2) + "\n")


#: Single-measurement runs too long for ``make bench`` (a 5,000,000-event log), shown
#: beside its table from the files they kept: (file, label).
KEPT_RUNS = (
    ("catalogue-postgresql-1000000", "python -m bench.catalogue URL 1000000"),
    ("web-postgresql-1000000", "python -m bench.web --db URL --tasks 1000000"),
    ("ceiling", "python -m bench.ceiling --processes 1,4"),
)


def kept_rows(results_dir: Path) -> list[list[str]]:
    """[figure, value, target, command, date, load average] from each kept run present."""
    out = []
    for name, command in KEPT_RUNS:
        path = results_dir / f"{name}.json"
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        m, when = record["measured"], record["date"]
        load = "/".join(str(x) for x in record["load_average"])
        for figure, value, target in _kept_figures(name, m):
            out.append([figure, value, target, command, when, load])
    return out


def _kept_figures(name: str, m: dict) -> list[tuple[str, str, str]]:
    def verdict(ok: bool, target: str) -> str:
        return f"{'MET' if ok else 'MISSED'} ({target})"

    figures = []
    if name.startswith("catalogue"):
        for key in ("back-fill", "rebuild"):
            if key in m:
                rate = m[key]["events_per_s"]
                figures.append((f"catalogue {key} (5,000,000 events)", f"{rate:,} events/s",
                                verdict(rate >= 100_000, ">= 100,000")))
        for question, q in m.get("questions", {}).items():
            limit = 2000 if question.startswith("stats") else 50
            target = verdict(q["p50_ms"] < limit, f"< {limit:,} ms") if "slowest" not in question \
                and "worker" not in question else "-"
            figures.append((question, f"p50 {q['p50_ms']} ms, max {q['max_ms']} ms, {q['rows']} rows", target))
        cost = m.get("store cost")
        if cost:
            w, wo = cost["with indexes"], cost["without indexes"]
            figures.append(("store STARTED+SUCCESS, with / without the catalogue's indexes",
                            f"{w['median']} / {wo['median']} tasks/s (runs {w['min']}-{w['max']} / "
                            f"{wo['min']}-{wo['max']})", "within noise" if w["min"] <= wo["max"]
                            and wo["min"] <= w["max"] else "outside noise"))
    elif name == "ceiling":
        for row in m["rows"]:
            figures.append((
                f"store STARTED+SUCCESS, {row['processes']} process(es): {row['case']}",
                f"{row['rate']:,.0f} tasks/s, x redis per round {row['x_redis_per_round']}; per task "
                f"server {row['server_us']:.0f} us, clients {row['client_us']:.0f} us; "
                f"{row['busy']:.2f} cores busy",
                "-",
            ))
    else:
        for path, p in m.get("pages", {}).items():
            target = verdict(p["p50_ms"] < 100, "< 100 ms") if path.startswith(("/?", "/api/tasks?")) \
                or path in ("/", "/api/tasks") else "-"
            figures.append((f"web GET {path[:60]}", f"p50 {p['p50_ms']} ms, p99 {p['p99_ms']} ms", target))
        for sse in m.get("sse", []):
            what = "append -> Ledger.follow()" if "clients" not in sse else f"append -> {sse['clients']} SSE clients"
            target = verdict(sse["p99_ms"] < 100, "p99 < 100 ms") if sse.get("clients") == 1 else "-"
            figures.append((what, f"p50 {sse['p50_ms']} ms, p99 {sse['p99_ms']} ms "
                                  f"({sse['received']} of {sse.get('expected', sse['events'])})", target))
        stores = m.get("stores_per_s", {})
        if len(stores) == 2:
            (a, x), (b, y) = stores.items()
            # issue 18: clients may not slow stores by more than noise, i.e. the runs with
            # them may not all be slower than every run without them
            figures.append((f"stores/s, {a} / {b}", f"{x['median']:.0f} / {y['median']:.0f} "
                                                    f"(runs {x['runs']} / {y['runs']})",
                            verdict(max(y["runs"]) >= min(x["runs"]), "not slower beyond noise")))
    return figures


def kept_markdown(rows: list[list[str]]) -> str:
    head = ["figure", "value", "target", "command", "date", "load average"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
