"""A large synthetic log built set-based, and the rebuild rate measured on it.

``generate_log(url, n)`` appends ``n`` events in seconds with one
``INSERT ... SELECT`` from ``generate_series`` (PostgreSQL) or a recursive CTE
(SQLite), bypassing the append path on purpose: it is a fixture, not a writer.
Every 10 events are one small workflow, so all projections get work:

* task ``a``: STARTED, SUCCESS
* task ``b``: STARTED, RETRY, STARTED, FAILURE
* group ``g`` saved
* chord ``c`` of size 2: started, part ``a`` returned, part ``b`` returned

Only the index columns the rebuild reads are real; payloads are one valid
encoded event per template (their inner ids do not match the stream's).

``python -m bench.rebuild_log URL N`` prints the measured rate and keeps it in
``bench/results/rebuild_log-<dialect>-<N>.json``.
"""

from __future__ import annotations

import sys
import time
import uuid

import sqlalchemy as sa

from ledger.events import ChordPartReturned, ChordStarted, GroupSaved, TaskState, encode

UNIT = 10

_TEMPLATES = [
    # (stream kind, stream suffix, version, type, task_state, ref suffix, chord_size, payload)
    ("task", "a", 1, "task.state", "STARTED", None, None, TaskState(task_id="x", status="STARTED")),
    ("task", "a", 2, "task.state", "SUCCESS", None, None, TaskState(task_id="x", status="SUCCESS")),
    ("task", "b", 1, "task.state", "STARTED", None, None, TaskState(task_id="x", status="STARTED")),
    ("task", "b", 2, "task.state", "RETRY", None, None, TaskState(task_id="x", status="RETRY")),
    ("task", "b", 3, "task.state", "STARTED", None, None, TaskState(task_id="x", status="STARTED")),
    ("task", "b", 4, "task.state", "FAILURE", None, None, TaskState(task_id="x", status="FAILURE")),
    ("group", "g", 1, "group.saved", None, None, None, GroupSaved(group_id="x", result=[["x", None], []])),
    ("chord", "c", 1, "chord.started", None, None, 2, ChordStarted(chord_id="x", size=2)),
    # a returned part is in its own stream (part:<task id>), its chord in ref_id
    ("part", "a", 1, "chord.part_returned", "SUCCESS", "c", None,
     ChordPartReturned(chord_id="x", task_id="x", status="SUCCESS")),
    ("part", "b", 1, "chord.part_returned", "FAILURE", "c", None,
     ChordPartReturned(chord_id="x", task_id="x", status="FAILURE")),
]
assert len(_TEMPLATES) == UNIT


def _template_rows() -> str:
    rows = []
    for i, (kind, suffix, version, type_, state, ref, size, _) in enumerate(_TEMPLATES):
        rows.append(
            f"({i}, '{kind}', '{suffix}', {version}, '{type_}', "
            f"{'NULL' if state is None else repr(state)}, {'NULL' if ref is None else repr(ref)}, "
            f"{'NULL' if size is None else size})"
        )
    return ", ".join(rows)


def _variant(data, v: int):
    """Template ``data`` as workflow ``v`` of a varied log: task payloads get one of 7
    names, 5 workers, 2 queues and 50 roots (what the task catalogue indexes)."""
    if not isinstance(data, TaskState):
        return data
    return data.model_copy(update={
        "name": f"bench.task{v % 7}", "worker": f"celery@w{v % 5}",
        "queue": ("celery", "slow")[v % 2], "root_id": f"root-{v}", "retries": v % 3,
        "exc_type": "ValueError" if data.status == "FAILURE" else None,
    })


def generate_log(url: str, n_events: int, variants: int = 1, span: float | None = None) -> int:
    """Append about ``n_events`` synthetic events (a multiple of 10); returns how many.

    ``variants`` > 1: unit ``i`` uses the payloads of variant ``i % variants``
    (:func:`_variant`), for the catalogue's filters and statistics to have work.
    ``span``: the units' times spread evenly over that many seconds up to now
    (default 1 ms apart), so that time filters select a part of the log.
    """
    from ledger.api import Ledger

    ledger = Ledger.open(url)
    units = max(1, n_events // UNIT)
    tag = uuid.uuid4().hex[:8]
    payloads = {
        f"p{i * variants + v}": encode(t[-1] if variants == 1 else _variant(t[-1], v))
        for i, t in enumerate(_TEMPLATES) for v in range(variants)
    }
    payload_case = f"CASE t.ord * {variants} + s.i % {variants} " + " ".join(
        f"WHEN {k} THEN :p{k}" for k in range(UNIT * variants)
    ) + " END"
    pg = ledger.engine.dialect.name == "postgresql"
    series = (
        "generate_series(1, :units) AS s(i)"
        if pg
        else "(WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r WHERE i < :units) "
        "SELECT i FROM r) AS s"
    )
    # Positions are given explicitly so that per-stream position order is version
    # order whatever order the rows are produced in; the identity is moved past them.
    stream = f"t.kind || ':' || '{tag}-' || s.i || '-' || t.suffix"
    ref = f"CASE WHEN t.ref IS NULL THEN NULL ELSE '{tag}-' || s.i || '-' || t.ref END"
    if pg:
        sql = f"""
        INSERT INTO ledger_events (position, tx_id, event_id, stream_id, stream_version, type,
            schema_version, recorded_at, task_state, ref_id, chord_size, payload)
        SELECT :base + (s.i - 1) * {UNIT} + t.ord + 1, pg_current_xact_id()::text::bigint,
            gen_random_uuid(), {stream}, t.version, t.type, 1,
            now() - (:units - s.i) * :step * interval '1 millisecond', t.state, {ref}, t.size,
            {payload_case}
        FROM {series} CROSS JOIN (VALUES {_template_rows()})
            AS t(ord, kind, suffix, version, type, state, ref, size)
        """
    else:
        sql = f"""
        INSERT INTO ledger_events (position, tx_id, event_id, stream_id, stream_version, type,
            schema_version, recorded_at, task_state, ref_id, chord_size, payload)
        SELECT :base + (s.i - 1) * {UNIT} + t.ord + 1, 0, lower(hex(randomblob(16))),
            {stream}, t.version, t.type, 1,
            strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || ((:units - s.i) * :step / 1000.0) || ' seconds'),
            t.state, {ref}, t.size, {payload_case}
        FROM {series} CROSS JOIN (SELECT column1 AS ord, column2 AS kind, column3 AS suffix,
            column4 AS version, column5 AS type, column6 AS state, column7 AS ref,
            column8 AS size FROM (VALUES {_template_rows()})) AS t
        """
    with ledger.engine.connect() as conn, conn.begin():
        base = conn.execute(sa.text("SELECT COALESCE(MAX(position), 0) FROM ledger_events")).scalar_one()
        step = 1.0 if span is None else span * 1000 / units  # milliseconds between units
        conn.execute(sa.text(sql), {"units": units, "base": base, "step": step, **payloads})
        if pg:
            conn.execute(sa.text(
                "SELECT setval(pg_get_serial_sequence('ledger_events', 'position'), "
                "(SELECT MAX(position) FROM ledger_events))"
            ))
    if pg:
        # As autovacuum would on a real log: without statistics the planner
        # guesses a handful of rows and picks merge joins over unsorted input.
        with ledger.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(sa.text("ANALYZE ledger_events"))
    return units * UNIT


def measure_rebuild(url: str, n_events: int) -> dict:
    """Top the log up to ``n_events`` events, rebuild every projection, return the rate."""
    from ledger.api import Ledger
    from ledger.rebuild import rebuild

    ledger = Ledger.open(url)
    with ledger.engine.connect() as conn:
        have = conn.execute(sa.text("SELECT COUNT(*) FROM ledger_events")).scalar_one()
    if have < n_events:
        generate_log(url, n_events - have)
    report = rebuild(ledger)
    return {
        "events": report.events,
        "seconds": report.seconds,
        "events_per_s": report.rate,
        "fill_seconds": report.fill_seconds,
        "swap_seconds": report.swap_seconds,
        "rows": report.rows,
    }


if __name__ == "__main__":
    from bench.kept import keep
    from ledger.api import Ledger

    url, n = sys.argv[1], int(sys.argv[2])
    Ledger.open(url, upgrade=True)  # a fresh database works as is
    t0 = time.perf_counter()
    result = measure_rebuild(url, n)
    print(result, f"(total with generation {time.perf_counter() - t0:.1f}s)")
    print("kept in", keep(f"rebuild_log-{Ledger.open(url).engine.dialect.name}-{n}", result))
