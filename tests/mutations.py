"""Break each core guarantee in one line and check that its tests fail (``make mutations``).

A test proves a guarantee only if breaking the code makes it fail. Each
:class:`Mutation` below replaces one line (found by its exact text, which must
occur once) of a file, runs the tests that should catch it (targeted test ids,
so a run takes minutes, not hours), and restores the file's bytes and mtime in
a ``finally`` -- also on Ctrl-C, SIGTERM or a crashed test run. The tests run in
a child pytest with ``PYTHONDONTWRITEBYTECODE=1``, so no compiled mutant
outlives the run.

Before mutating, the targeted tests run once on the real code (skip with
``--no-baseline``): a mutation counts as caught only if they passed there and a
test *failed* under it (pytest exit status 1; a collection error is reported,
not counted). The report goes to stdout and to ``tests/mutations.txt``.

Not part of ``make test`` or CI: it runs worker, fault and Kafka tests once per
mutation. ``python -m tests.mutations --list`` lists the mutations,
``python -m tests.mutations NAME...`` runs some of them.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_suffix(".txt")
#: a mutant that hangs a test is reported, not waited for forever
TIMEOUT = 900


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository, or "module:<dotted name>" for an installed module
    old: str  # exact text, found once; it may include a neighbouring line as an anchor
    new: str
    tests: tuple[str, ...]  # fastest first: the run stops at the first failure

    def file(self) -> Path:
        if self.path.startswith("module:"):
            spec = importlib.util.find_spec(self.path.removeprefix("module:"))
            assert spec is not None and spec.origin is not None, self.path
            return Path(spec.origin)
        return ROOT / self.path

    def where(self) -> str:
        text = self.file().read_text()
        line = text[: text.index(self.old)].count("\n") + 1
        return f"{self.path}:{line}"


BACKEND = "tests/test_celery_backend.py"
LOG_PG = "tests/test_log.py::TestLogOnPostgres"
LOG_SQLITE = "tests/test_log.py::TestLogOnSQLite"
CATALOGUE = "tests/test_catalogue.py"
WEB_BROWSER = "tests/test_web_browser.py"
LIFECYCLE = "tests/test_lifecycle.py"
STREAM_INTEGRITY = "tests/test_integrity_stream.py"

MUTATIONS = [
    Mutation(
        "NOTIFY: a ready task state does not notify",
        "ledger/store/postgres.py",
        '            return item.columns.get("task_state") in READY_STATES\n',
        "            return False\n",
        (f"{BACKEND}::test_get_is_woken_by_notify_not_by_polling",),
    ),
    Mutation(
        "xmin visibility: followers read rows of transactions still running",
        "ledger/store/postgres.py",
        "          AND tx_id < {VISIBLE_HORIZON}\n",
        "          AND TRUE\n",
        (f"{LOG_PG}::test_an_open_transaction_holds_followers_back_until_it_commits",
         "tests/faults/test_followers.py"),
    ),
    Mutation(
        "follow order: a follower resumes after its position alone, not (tx_id, position)",
        "ledger/store/postgres.py",
        "        WHERE (tx_id, position) > (:tx_id, :position)\n",
        "        WHERE position > :position\n",
        ("tests/faults/test_followers.py",),
    ),
    Mutation(
        "follow: no poll for the events that do not notify",
        "ledger/api.py",
        "                wait = 0.02 if listener.wait(wait) else min(poll_interval, wait * 2)\n",
        "                wait = 0.02 if listener.wait(wait) else 3600\n",
        ("tests/test_follow.py::test_a_follower_still_gets_events_that_do_not_notify",),
    ),
    Mutation(
        "chord claim: a part claims the body without the chord being complete and unclaimed "
        "(SQLite, and PostgreSQL's general path)",
        "ledger/store/target.py",
        '            f" WHERE stream_id = CAST(:stream AS varchar) HAVING {claimable_sql(self.t)}"\n',
        '            f" WHERE stream_id = CAST(:stream AS varchar) HAVING 1 = 1"\n',
        (f"{LOG_SQLITE}::test_redelivered_chord_part_fires_body_once",
         f"{LOG_PG}::test_redelivered_chord_part_fires_body_once"),
    ),
    Mutation(
        "chord claim: a chord already claimed is claimable again",
        "ledger/store/target.py",
        '        " AND c.fired_position IS NULL AND c.size IS NOT NULL"\n',
        '        " AND c.size IS NOT NULL"\n',
        (f"{LOG_SQLITE}::test_redelivered_chord_part_fires_body_once",
         f"{LOG_PG}::test_redelivered_chord_part_fires_body_once",
         f"{LOG_SQLITE}::test_a_part_returning_to_a_complete_unclaimed_chord_claims_the_body_once",
         "tests/test_celery_chords.py"),
    ),
    Mutation(
        "chord claim: a returned part claims the body without completing the chord",
        "ledger/store/target.py",
        '        f" AND (SELECT COALESCE(sum(returned), 0) FROM {n} n"\n',
        '        f" AND (SELECT COALESCE(sum(returned), 0) + 1000 FROM {n} n"\n',
        (f"{LOG_PG}::test_redelivered_chord_part_fires_body_once",
         f"{LOG_SQLITE}::test_redelivered_chord_part_fires_body_once"),
    ),
    Mutation(
        "chord claim on PostgreSQL: parts that complete a chord at once, neither seeing the other's, "
        "do not claim after their commits",
        "ledger/store/postgres.py",
        "        if not claimed and read_rows and read_rows[-1][:2] == (None, CLAIMABLE):\n",
        "        if False:\n",
        (f"{LOG_PG}::test_parts_returned_at_once_fire_each_chord_exactly_once",),
    ),
    Mutation(
        "prune: a returned part's own stream goes although its chord is incomplete",
        "ledger/rebuild.py",
        '                sa.and_(e.c.stream_id.like("part:%"), ~chord_alive(e.c.ref_id)),\n',
        '                sa.and_(e.c.stream_id.like("part:%"), sa.true()),\n',
        ("tests/test_rebuild.py::test_prune_then_rebuild_then_verify_is_clean",),
    ),
    Mutation(
        "chord part: a part returned with its result (mark_as_done) is returned again",
        "ledger/celery.py",
        "            self._chord_part.returned = (part, returned)\n",
        "            pass\n",
        ("tests/test_celery_chords.py::test_parts_stored_by_mark_as_done_fire_the_body_once_each_with_its_result",),
    ),
    Mutation(
        "NOTIFY: a chord part stored with its result wakes nobody after its commit",
        "ledger/store/postgres.py",
        "        return (self._notify_sql, {\"streams\": streams}) if streams else None\n",
        "        return None\n",
        ("tests/test_celery_chords.py::test_a_part_stored_with_its_return_wakes_its_waiters",),
    ),
    Mutation(
        "get_task_meta: a stored map of the wrong shape is read as if it were valid",
        "projections/task_meta.py",
        '            and type(value.get("status")) is str\n',
        "",
        ("tests/faults/test_bad_input.py"
         "::test_corrupt_task_meta_row_raises_a_clear_error_and_other_reads_are_fine",),
    ),
    Mutation(
        "idempotent event id: SQLite appends a known event id again",
        "ledger/store/sqlite.py",
        "        ON CONFLICT (event_id) DO NOTHING\n"
        "        RETURNING position, tx_id, stream_version, recorded_at\n",
        "        RETURNING position, tx_id, stream_version, recorded_at\n",
        (f"{LOG_SQLITE}::test_appending_the_same_event_id_twice_writes_one_row",),
    ),
    Mutation(
        "idempotent event id: PostgreSQL appends a known event id again",
        "ledger/store/postgres.py",
        '        ON CONFLICT (event_id) DO NOTHING\n    """\n',
        '    """\n',
        (f"{LOG_PG}::test_appending_the_same_event_id_twice_writes_one_row",),
    ),
    Mutation(
        "idempotent store: a new event id on every Celery retry of one store",
        "ledger/celery.py",
        '        event_id = getattr(self._store_ids, "event_id", None) or uuid.uuid4()\n',
        "        event_id = uuid.uuid4()\n",
        ("tests/faults/test_database_faults.py"
         "::test_a_commit_whose_reply_is_lost_is_retried_without_storing_twice",),
    ),
    Mutation(
        "redaction: named kwargs are kept",
        "ledger/redaction.py",
        "        key: REDACTED if key in names else _nested(value, names) for key, value in kwargs.items()\n",
        "        key: value for key, value in kwargs.items()\n",
        ("tests/test_redaction.py::test_redaction_rules",),
    ),
    Mutation(
        "redaction: the backend stores kwargs unredacted",
        "ledger/celery.py",
        '        args, kwargs = self.redacted(meta["name"], meta["args"], meta["kwargs"])\n',
        '        args, kwargs = meta["args"], meta["kwargs"]\n',
        ("tests/test_celery_worker.py::test_redacted_arguments_never_reach_the_log",),
    ),
    Mutation(
        "payload limit: an oversized event is stored",
        "ledger/api.py",
        "        if limit is not None and size > limit:\n",
        "        if False:\n",
        ("tests/faults/test_bad_input.py"
         "::test_payload_over_the_limit_is_refused_naming_size_and_limit_and_nothing_is_written",),
    ),
    Mutation(
        "password masking: safe_url shows the password",
        "ledger/store/engine.py",
        "    text = url.update_query_dict(hidden).render_as_string(hide_password=True)\n",
        "    text = url.update_query_dict(hidden).render_as_string(hide_password=False)\n",
        (f"{BACKEND}::test_construction_is_cheap_and_uri_hides_the_password",),
    ),
    Mutation(
        "prune's checkpoint floor: prune deletes events the relay has not sent",
        "ledger/rebuild.py",
        "        if unread is not None and unread < cutoff:\n",
        "        if False:\n",
        ("tests/test_integrity_stream.py::test_prune_never_deletes_what_the_relay_has_not_sent",),
    ),
    Mutation(
        "stored exception: Celery imports the module a stored exception names",
        "module:celery.backends.base",
        "                cls = sys.modules[exc_module]\n",
        '                cls = __import__(exc_module, fromlist=["_"])\n',
        ("tests/faults/test_bad_input.py"
         "::test_stored_exception_is_refused_or_rebuilt_as_a_stand_in_never_imported",),
    ),
    Mutation(
        "stored exception: a non-exception type is not refused",
        "module:celery.backends.base",
        "        if not isinstance(cls, type) or not issubclass(cls, BaseException):\n",
        "        if False:\n",
        ("tests/faults/test_bad_input.py"
         "::test_stored_exception_is_refused_or_rebuilt_as_a_stand_in_never_imported",),
    ),
    Mutation(
        "recorded_at: PostgreSQL stores a time other than the server's",
        "ledger/store/postgres.py",
        "            CAST(:schema_version AS smallint), now(), CAST(:task_state AS varchar),\n",
        "            CAST(:schema_version AS smallint), now() - interval '1 day',"
        " CAST(:task_state AS varchar),\n",
        (f"{LOG_PG}::test_recorded_at_is_database_time_in_utc",),
    ),
    Mutation(
        "recorded_at: SQLite stores a time other than the writer's clock",
        "ledger/store/sqlite.py",
        '        params["recorded_at"] = datetime.now(timezone.utc)\n',
        '        params["recorded_at"] = datetime.now(timezone.utc).replace(year=2000)\n',
        (f"{LOG_SQLITE}::test_recorded_at_is_database_time_in_utc",),
    ),
    Mutation(
        "relay: a partition's share of a flush outgrows one record batch",
        "ledger/relay.py",
        "        room = self._batch_bytes - _BATCH_OVERHEAD\n",
        "        room = self._batch_bytes * 5 // 4\n",
        ("tests/test_stream_relay.py::test_a_partition_gets_at_most_one_record_batch_per_flush",),
    ),
    Mutation(
        "retries: the ledger's retried writes are not logged",
        "ledger/api.py",
        '                        log.warning(\n                            "ledger write failed',
        '                        log.debug(\n                            "ledger write failed',
        ("tests/faults/test_database_faults.py"
         "::test_2000_results_stored_exactly_once_while_every_connection_is_cut",),
    ),
    Mutation(
        "catalogue rebuild: events after the sticky SUCCESS count (a STARTED moves started_at)",
        "ledger/store/target.py",
        "        .where(sa.or_(life.c.first_success.is_(None), life.c.position <= life.c.first_success))\n",
        "        .where(sa.true())\n",
        (f"{CATALOGUE}::test_a_redelivery_after_success_changes_nothing_live_or_rebuilt",
         "tests/test_projection_equivalence.py::test_memory_fold_live_sql_and_rebuild_agree"),
    ),
    Mutation(
        "catalogue live (fused): a new life after forget keeps the forgotten flag",
        "ledger/store/postgres.py",
        '" forgotten = false, expired = false, "',
        '" "',
        (f"{CATALOGUE}::test_a_forgotten_task_stays_listed_and_a_new_life_starts_over",),
    ),
    Mutation(
        "catalogue: an underscore in a name glob matches any character",
        "ledger/catalogue.py",
        '"_": "\\\\_", ',
        "",
        (f"{CATALOGUE}::test_a_glob_matches_wildcards_only_where_written",),
    ),
    Mutation(
        "catalogue stats (SQLite): percentiles take the lower rank, no interpolation",
        "ledger/store/sqlite.py",
        "hi = sa.func.max(sa.case((r.c.i == below + 1, r.c.s)))",
        "hi = sa.func.max(sa.case((r.c.i == below, r.c.s)))",
        (f"{CATALOGUE}::test_stats_are_the_counts_and_percentiles_of_the_log",),
    ),
    Mutation(
        "catalogue: --since is ignored",
        "ledger/catalogue.py",
        "        where.append(t.c.first_seen >= f.since)\n",
        "        pass\n",
        (f"{CATALOGUE}::test_each_filter_keeps_exactly_the_tasks_the_log_says",),
    ),
    Mutation(
        "migration 0004: the catalogue is not filled again (no back-fill)",
        "migrations/versions/0004_catalogue_lifecycle.py",
        "    _fill(op.get_bind())\n",
        "",
        (f"{CATALOGUE}::test_db_upgrade_to_0004_fills_lifecycle_rows_and_times",
         f"{CATALOGUE}::test_db_upgrade_back_fills_the_catalogue_of_an_existing_ledger"),
    ),
    Mutation(
        "prune: the catalogue rows of cut tasks are not refolded",
        "ledger/rebuild.py",
        "            CatalogueFill(T.catalogue, catalogue_select(e, streams=chunk), whole_log=False).run(conn, type(store))\n",
        "            pass\n",
        ("tests/test_rebuild.py::test_prune_then_rebuild_then_verify_is_clean",),
    ),
    Mutation(
        "web: templates do not escape stored values",
        "ledger/web/app.py",
        "        autoescape=select_autoescape(default=True, default_for_string=True),\n",
        "        autoescape=False,\n",
        ("tests/test_web.py::test_stored_pickles_are_never_unpickled",
         f"{WEB_BROWSER}::test_a_script_stored_as_name_or_result_renders_as_text"),
    ),
    Mutation(
        "web: the live page's script inserts stored values as HTML",
        "ledger/web/static/console.js",
        '  td.textContent = text == null ? "" : String(text);\n',
        '  td.innerHTML = text == null ? "" : String(text);\n',
        (f"{WEB_BROWSER}::test_a_script_stored_as_name_or_result_renders_as_text",),
    ),
    Mutation(
        "web: responses carry no Content-Security-Policy",
        "ledger/web/security.py",
        '    (b"content-security-policy", CSP.encode()),\n',
        "",
        ("tests/test_web.py::test_every_response_has_a_csp_and_pages_run_no_inline_script",),
    ),
    Mutation(
        "web: a public address is accepted without credentials",
        "ledger/web/security.py",
        "    if credentials is None and not is_loopback(host):\n",
        "    if False:\n",
        ("tests/test_web.py::test_a_public_address_is_refused_without_auth",),
    ),
    Mutation(
        "web: the password is not checked",
        "ledger/web/security.py",
        "        return _same(password, self.secret) & user_ok\n",
        "        return user_ok\n",
        ("tests/test_web.py::test_credentials_are_required_when_set",),
    ),
    Mutation(
        "web: any Host is answered without credentials (DNS rebinding)",
        "ledger/web/security.py",
        '        elif not self.answers_to(headers.get("host", "")):\n',
        "        elif False:\n",
        ("tests/test_web.py::test_without_auth_only_localhost_names_are_answered",),
    ),
    Mutation(
        "web: the server's database sessions can write",
        "ledger/store/sqlite.py",
        '            cur.execute("PRAGMA query_only = ON")\n',
        "            pass\n",
        ("tests/test_web.py::test_the_servers_connections_cannot_write",),
    ),
    Mutation(
        "web: the database URL is shown with its password",
        "ledger/web/pages.py",
        "        request=request, ledger_url=state.ledger.url, **context\n",
        "        request=request, ledger_url=state.ledger.engine.url.render_as_string(hide_password=False), **context\n",
        ("tests/test_web.py::test_the_database_password_is_never_rendered",),
    ),
    Mutation(
        "web: an SSE client's queue is unbounded",
        "ledger/web/feed.py",
        "        if self.waiting + events > self.size:\n",
        "        if False:\n",
        ("tests/test_web.py::test_a_client_that_cannot_keep_up_is_cut_off_alone",),
    ),
    Mutation(
        "get: the point read sends the task id as a C string (cut at a NUL)",
        "ledger/store/postgres.py",
        "            pg.send_query_prepared(self.name, [key.encode()], self._binary, self._binary[0])\n",
        "            pg.send_query_prepared(self.name, [key.encode()], None, self._binary[0])\n",
        (f"{BACKEND}::test_an_id_with_a_nul_is_no_task_never_read_as_its_prefix",),
    ),
    Mutation(
        "get: a deallocated point read is not prepared again",
        "ledger/store/postgres.py",
        '                if getattr(exc, "sqlstate", None) != "26000" or attempt == 2:\n',
        "                if True:\n",
        (f"{BACKEND}::test_get_prepares_its_lookup_again_after_deallocate_all",),
    ),
    Mutation(
        "store: a statement deallocated from the session is not prepared again",
        "ledger/store/postgres.py",
        '        if getattr(error, "sqlstate", None) != "26000":\n',
        "        if True:\n",
        (f"{BACKEND}::test_a_store_prepares_its_statement_again_after_deallocate_all",
         "tests/test_celery_chords.py::test_parts_stored_after_deallocate_all_prepare_their_statements_again_and_fire_once"),
    ),
    Mutation(
        "chord: a failed read after the part's committed transaction sends the transaction again",
        "ledger/store/postgres.py",
        "        again = everything if failed_unit is None or failed_unit < len(statements) else everything[len(statements):]\n",
        "        again = everything\n",
        ("tests/test_celery_chords.py::test_a_completing_part_whose_header_read_was_deallocated_sends_the_body_once",),
    ),
    Mutation(
        "catalogue: without result_extended a worker's state carries no task name",
        "ledger/celery.py",
        '                **self._extended_fields(meta) if "name" in meta else _request_fields(request),\n',
        '                **self._extended_fields(meta) if "name" in meta else {},\n',
        (f"{CATALOGUE}::test_without_result_extended_finished_tasks_keep_their_name_worker_queue_and_retries",),
    ),
    Mutation(
        "output: a stored terminal escape reaches the terminal",
        "ledger/output.py",
        "    return _CONTROL.sub(_escape, text)\n",
        "    return text\n",
        ("tests/test_cli_inputs.py::test_terminal_escapes_stored_in_a_task_are_printed_escaped",),
    ),
    Mutation(
        "output: a CSV cell keeps its terminal escapes",
        "ledger/output.py",
        "        value = terminal_safe(value)\n",
        "        pass\n",
        ("tests/test_cli_inputs.py::test_csv_output_shows_terminal_escapes_as_text",),
    ),
    Mutation(
        "output: a CSV cell that starts a formula is written as is",
        "ledger/output.py",
        "        if value.startswith(FORMULA_START):\n",
        "        if False:\n",
        ("tests/test_cli_inputs.py::test_csv_export_neutralizes_formula_cells_and_keeps_numbers",),
    ),
    Mutation(
        "get: a result ready at the first read is handed over before the parents are checked",
        "ledger/celery.py",
        "                if ready and on_interval:\n",
        "                if False:\n",
        (f"{BACKEND}::test_get_raises_the_failed_header_parts_error_even_when_the_body_is_ready_at_once",),
    ),
    Mutation(
        "follow: read_interval is ignored (one read per commit under a stream of stores)",
        "ledger/api.py",
        "                if pause > 0 and (stop.wait(pause) if stop is not None else time.sleep(pause)):\n",
        "                if False:\n",
        ("tests/test_follow.py::test_follow_read_interval_gathers_a_stream_of_commits_into_few_reads",),
    ),
    Mutation(
        "web: the Gantt chart draws no retried attempt",
        "ledger/web/gantt.py",
        '        row.segments.append(_segment(x_of(start), x_of(run_from), "retried"))\n',
        "        pass\n",
        (f"{WEB_BROWSER}::test_workflow_page_draws_the_bars_of_a_chord_with_a_retried_part",),
    ),
    Mutation(
        "web: the Tasks page does not follow the log",
        "ledger/web/static/console.js",
        "    if (pending === null) { pending = setTimeout(refresh, 300); }\n",
        "    return;\n",
        (f"{WEB_BROWSER}::test_a_task_a_worker_stores_appears_on_the_live_and_tasks_pages_without_reload",),
    ),
    Mutation(
        "lifecycle: a SENT ends Celery's view of the task (task meta)",
        "projections/task_meta.py",
        "    if event.type in TOMBSTONE_TYPES:\n",
        "    if event.type in TOMBSTONE_TYPES | {'task.sent'}:\n",
        (f"{LIFECYCLE}::test_sent_and_received_never_change_what_celery_sees",),
    ),
    Mutation(
        "lifecycle: a SENT replaces a RECEIVED",
        "projections/lifecycle.py",
        "    if current is None or RANK.get(current, RANK[incoming]) < RANK[incoming]:\n",
        "    if current is None or RANK.get(current, RANK[incoming]) != RANK[incoming]:\n",
        (f"{LIFECYCLE}::test_a_lifecycle_state_never_overrides_a_celery_state",),
    ),
    Mutation(
        "lifecycle: SENT gets a task-meta row on PostgreSQL's fused path",
        "ledger/store/postgres.py",
        "            **lifecycle,\n",
        "            **lifecycle, TaskSent.type: FusedSql(f'projection AS ({self._fused_updates(tm, g)[TaskState.type]})'),\n",
        ("tests/test_projection_equivalence.py::test_memory_fold_live_sql_and_rebuild_agree",),
    ),
    Mutation(
        "catalogue: a SENT or RECEIVED replaces a Celery state (the fold)",
        "projections/catalogue.py",
        "    return RANK.get(current, RANK[incoming] + 1) <= RANK[incoming]\n",
        "    return True\n",
        (f"{LIFECYCLE}::test_the_catalogue_lists_celerys_state_else_the_highest_lifecycle_state",),
    ),
    Mutation(
        "catalogue: a SENT or RECEIVED replaces a Celery state (live SQL)",
        "ledger/store/target.py",
        "        takes = sa.or_(ended, c.c.state.in_([s for s, r in RANK.items() if r <= RANK[incoming]]))\n",
        "        takes = sa.true()\n",
        ("tests/test_projection_equivalence.py::test_memory_fold_live_sql_and_rebuild_agree",),
    ),
    Mutation(
        "catalogue: a SENT or RECEIVED replaces a Celery state (PostgreSQL's fused path)",
        "ledger/store/postgres.py",
        '            takes = f"({ended} OR {c}.state IN ({below}))"\n',
        '            takes = "true"\n',
        ("tests/test_projection_equivalence.py::test_memory_fold_live_sql_and_rebuild_agree",),
    ),
    Mutation(
        "catalogue: the rebuild takes a lifecycle event over a Celery state",
        "ledger/store/target.py",
        "                latest(k.c.type == TaskState.type),\n",
        "",
        ("tests/test_projection_equivalence.py::test_memory_fold_live_sql_and_rebuild_agree",),
    ),
    Mutation(
        "catalogue: a retry's SENT keeps the earlier attempt's RECEIVED (the fold)",
        "projections/catalogue.py",
        "                       received_at=None, started_at=None)\n",
        "                       )\n",
        ("tests/test_projection_equivalence.py::test_memory_fold_live_sql_and_rebuild_agree",),
    ),
    Mutation(
        "stats: queue wait measured to RECEIVED although STARTED was stored",
        "ledger/catalogue.py",
        "    wait = _seconds(conn, t.c.ready_at, sa.func.coalesce(t.c.started_at, t.c.received_at))\n",
        "    wait = _seconds(conn, t.c.ready_at, sa.func.coalesce(t.c.received_at, t.c.started_at))\n",
        (f"{CATALOGUE}::test_stats_are_the_counts_and_percentiles_of_the_log",),
    ),
    Mutation(
        "catalogue live: a SENT committed after the RECEIVED leaves the queue and arguments out",
        "ledger/store/target.py",
        "        carried = sa.or_(ended, c.c.state.in_(list(RANK))) if sent else ended\n",
        "        carried = ended\n",
        ("tests/test_projection_equivalence.py::test_memory_fold_live_sql_and_rebuild_agree",),
    ),
    Mutation(
        "lifecycle: SENT records no ETA (a countdown is lost)",
        "ledger/lifecycle.py",
        '            eta=_time(headers.get("eta")),\n',
        "            eta=None,\n",
        (f"{LIFECYCLE}::test_countdown_task_history_reads_sent_received_started_success",),
    ),
    Mutation(
        "catalogue live: a SENT gives no catalogue row (the general path: SQLite, batches)",
        "ledger/store/target.py",
        "        TaskSent.type: _lifecycle,\n",
        "",
        (f"{LIFECYCLE}::test_task_sent_to_a_queue_nobody_consumes_is_sent_and_pending",),
    ),
    Mutation(
        "lifecycle: SENT arguments are stored unredacted",
        "ledger/lifecycle.py",
        "        args, kwargs = backend.redacted(name, *_arguments(body))\n",
        "        args, kwargs = _arguments(body)\n",
        ("tests/test_celery_worker.py::test_redacted_arguments_never_reach_the_log",),
    ),
    Mutation(
        "lifecycle: an app on another backend is recorded in a ledger app's log",
        "ledger/lifecycle.py",
        "            return app if app in _apps else None  # not tracked: another backend\n",
        "            pass\n",
        (f"{LIFECYCLE}::test_an_app_on_another_backend_is_left_alone",),
    ),
    Mutation(
        "lifecycle: queue wait measured to RECEIVED although STARTED was stored",
        "ledger/timeline.py",
        "        return self.started_at or self.received_start\n",
        "        return self.received_start or self.started_at\n",
        (f"{LIFECYCLE}::test_queue_wait_is_the_time_between_the_histories_events",),
    ),
    Mutation(
        "lifecycle: a relaxed commit leaves synchronous_commit off on the connection",
        "ledger/store/postgres.py",
        "set_config('synchronous_commit', 'off', true)",
        "set_config('synchronous_commit', 'off', false)",
        (f"{LIFECYCLE}::test_only_the_lone_lifecycle_event_skips_the_wal_flush_wait",),
    ),
    Mutation(
        "lifecycle: on SQLite a lone SENT/RECEIVED commits at FULL (waits for the WAL's sync)",
        "ledger/store/sqlite.py",
        '_synchronous(conn, "NORMAL" if write and options.get("ledger_relaxed") else "FULL")',
        '_synchronous(conn, "FULL")',
        (f"{LIFECYCLE}::test_on_sqlite_only_the_lone_lifecycle_event_commits_without_the_wal_sync",),
    ),
    Mutation(
        "lifecycle: on SQLite the transaction after a relaxed one keeps synchronous = NORMAL",
        "ledger/store/sqlite.py",
        "    if info.get(_SYNCHRONOUS) != level:\n",
        "    if level == 'NORMAL' and info.get(_SYNCHRONOUS) != level:\n",
        (f"{LIFECYCLE}::test_on_sqlite_only_the_lone_lifecycle_event_commits_without_the_wal_sync",),
    ),
    Mutation(
        "lifecycle: several events in one append commit relaxed",
        "ledger/store/base.py",
        "    return len(items) == 1 and items[0].new.data.type in LIFECYCLE_TYPES\n",
        "    return items[0].new.data.type in LIFECYCLE_TYPES\n",
        (f"{LIFECYCLE}::test_on_sqlite_only_the_lone_lifecycle_event_commits_without_the_wal_sync",),
    ),
    Mutation(
        "lifecycle: a quiet worker (no banner) never connects task_received",
        "ledger/cli/plugin.py",
        "lifecycle.watch_workers()\n",
        "\n",
        (f"{LIFECYCLE}::test_a_quiet_worker_records_received_too",),
    ),
    Mutation(
        "keyset paging: the key's own task is listed again on the older page",
        "ledger/catalogue.py",
        "t.c.first_seen < seen, sa.and_(t.c.first_seen == seen, t.c.task_id < task_id)))",
        "t.c.first_seen < seen, sa.and_(t.c.first_seen == seen, t.c.task_id <= task_id)))",
        ("tests/test_web.py::test_tasks_pages_by_key_through_the_whole_list_both_ways",),
    ),
    Mutation(
        "follow horizon (PostgreSQL): every running transaction of the server holds followers back",
        "ledger/store/postgres.py",
        "          AND tx_id < {VISIBLE_HORIZON}\n",
        "          AND tx_id < pg_snapshot_xmin(pg_current_snapshot())::text::bigint\n",
        (f"{LOG_PG}::test_an_open_transaction_in_another_database_does_not_hold_followers_back",),
    ),
    Mutation(
        "follow horizon (PostgreSQL): transactions of this database are skipped too",
        "ledger/store/postgres.py",
        "WHERE backend_xid IS NOT NULL AND datname IS DISTINCT FROM current_database())),",
        "WHERE backend_xid IS NOT NULL)),",
        (f"{LOG_PG}::test_an_open_transaction_holds_followers_back_until_it_commits",),
    ),
    Mutation(
        "JSON decoding: a result is decoded for an app that does not accept JSON",
        "ledger/celery.py",
        "            and self.accept is not None and _JSON in self.accept\n",
        "            and True\n",
        (f"{BACKEND}::test_results_are_read_only_by_apps_that_accept_their_content_type",),
    ),
    Mutation(
        "JSON decoding: an app without an accept list skips kombu's check of disabled content types",
        "ledger/celery.py",
        "            and self.accept is not None and _JSON in self.accept\n",
        "            and (self.accept is None or _JSON in self.accept)\n",
        (f"{BACKEND}::test_json_disabled_in_kombu_is_refused_to_an_app_without_an_accept_list",),
    ),
    Mutation(
        "JSON decoding: kombu's object hook is left out (typed values come back as envelopes)",
        "ledger/celery.py",
        "json.JSONDecoder(object_hook=kombu_json.object_hook).decode",
        "json.JSONDecoder().decode",
        (f"{BACKEND}::test_json_results_decode_kombus_typed_values",),
    ),
    Mutation(
        "JSON decoding: an app's own registered JSON decoder is bypassed",
        "ledger/celery.py",
        "            and registry._decoders.get(_JSON) is kombu_json.loads\n",
        "            and True\n",
        (f"{BACKEND}::test_an_apps_own_json_decoder_is_used",),
    ),
    Mutation(
        "JSON decoding: corrupt JSON raises the decoder's ValueError, not kombu's DecodeError",
        "ledger/celery.py",
        "            with contextlib.suppress(ValueError):\n                return _json_decode",
        "            if True:\n                return _json_decode",
        (f"{BACKEND}::test_a_corrupt_json_result_raises_kombus_decode_error",),
    ),
    Mutation(
        "relay: a record the broker refuses as too large is taken for Kafka down",
        "ledger/relay.py",
        "                    if not isinstance(f.exception, (MessageSizeTooLargeError, RecordListTooLargeError)):\n",
        "                    if True:\n",
        (f"{STREAM_INTEGRITY}::test_an_event_the_broker_refuses_as_too_large_is_skipped_and_the_stream_keeps_going",),
    ),
    Mutation(
        "relay: records the broker refused with others are skipped without being sent alone",
        "ledger/relay.py",
        "            if positions and not alone:\n",
        "            if False:\n",
        (f"{STREAM_INTEGRITY}::test_an_event_the_broker_refuses_as_too_large_is_skipped_and_the_stream_keeps_going",),
    ),
    Mutation(
        "SQLite chord part: its transaction claims the body without the chord being complete",
        "ledger/api.py",
        "        claimed = self._claim_chord(conn, chord_id, claim)\n",
        "        claimed = bool(self._append_in(conn, [claim]).recorded)\n",
        (f"{LOG_SQLITE}::test_a_part_returning_to_a_complete_unclaimed_chord_claims_the_body_once",
         f"{LOG_SQLITE}::test_chord_part_returned_before_the_chord_started_still_counts"),
    ),
    Mutation(
        "prune: a prune that deleted nothing still appends ledger.pruned",
        "ledger/rebuild.py",
        "        if deleted:  # a prune that changed nothing is no event: cron's hourly run adds none\n",
        "        if True:\n",
        ("tests/test_rebuild.py::test_prune_then_rebuild_then_verify_is_clean",),
    ),
    Mutation(
        "get: an id with a NUL is sent to PostgreSQL (DataError) instead of being no task",
        "ledger/api.py",
        "            if not self.could_hold(task_id):  # no task has that id (Redis: PENDING too)\n",
        "            if False:\n",
        (f"{BACKEND}::test_an_id_with_a_nul_is_no_task_never_read_as_its_prefix",),
    ),
    Mutation(
        "events: an id longer than the database column is accepted (no length bound)",
        "ledger/events.py",
        "Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]\n",
        "Id = Annotated[str, Field(min_length=1)]\n",
        ("tests/test_events.py::test_overlong_task_id_names_the_field_and_the_limit",
         "tests/faults/test_bad_input.py"),
    ),
    Mutation(
        "events: exception text with a lone surrogate is kept raw when an event is built",
        "ledger/events.py",
        "                fields[name] = _utf8_text(value)\n",
        "                pass\n",
        ("tests/test_events.py::test_exception_text_with_a_lone_surrogate_is_escaped_when_an_event_is_built",),
    ),
    Mutation(
        "events: a model_construct() event (never validated) is appended unchecked",
        "ledger/events.py",
        "        made._validated = False\n",
        "        pass\n",
        (f"{LOG_PG}::test_invalid_event_is_rejected_before_anything_is_written",),
    ),
    Mutation(
        "cli: an argument that is not UTF-8 reaches the database driver (a traceback)",
        "ledger/cli/root.py",
        "        if LONE_SURROGATE.search(arg):\n",
        "        if False:\n",
        ("tests/test_cli_inputs.py::test_an_argument_that_is_not_utf8_is_one_usage_line",),
    ),
    Mutation(
        "url: a database URL that is not UTF-8 reaches SQLAlchemy (a traceback)",
        "ledger/store/engine.py",
        "    if (raw := LONE_SURROGATE.search(text)) is not None:\n",
        "    if False:\n",
        ("tests/test_cli_inputs.py::test_a_database_url_that_is_not_utf8_is_one_usage_line_naming_the_byte",),
    ),
]


@dataclass
class Outcome:
    mutation: Mutation
    where: str
    result: str  # caught, SURVIVED, error, timeout
    detail: str
    seconds: float


def run_tests(tests: tuple[str, ...] | list[str]) -> tuple[int | None, str]:
    """(pytest's exit status or None on timeout, its output) for ``tests``."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p", "no:cacheprovider", *tests]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its workers and relays too
        out, _ = proc.communicate()
        return None, out
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)  # Ctrl-C: stop the child before restoring
        proc.wait()
        raise
    return proc.returncode, out


def first_failure(output: str) -> str:
    found = re.search(r"^FAILED (\S+)", output, re.MULTILINE)
    return found.group(1) if found else output.strip().splitlines()[-1] if output.strip() else ""


def apply(m: Mutation) -> Outcome:
    path = m.file()
    original = path.read_bytes()
    stat = path.stat()
    text = original.decode()
    if text.count(m.old) != 1:
        return Outcome(m, m.path, "error", f"the line to mutate occurs {text.count(m.old)} times "
                       "(changed code, or a mutant left by a killed run: git checkout it)", 0.0)
    where = m.where()
    began = time.monotonic()
    try:
        path.write_text(text.replace(m.old, m.new))
        status, output = run_tests(m.tests)
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    seconds = time.monotonic() - began
    if status is None:
        return Outcome(m, where, "timeout", f"no result within {TIMEOUT} s", seconds)
    if status == 1:
        return Outcome(m, where, "caught", first_failure(output), seconds)
    if status == 0:
        return Outcome(m, where, "SURVIVED", "every targeted test passed", seconds)
    return Outcome(m, where, "error", f"pytest exit {status}: {first_failure(output)}", seconds)


def report(outcomes: list[Outcome], baseline: str) -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    caught = sum(o.result == "caught" for o in outcomes)
    lines = [
        f"make mutations, {datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}, commit {commit}, "
        f"load average {load}",
        f"baseline (targeted tests on the real code): {baseline}",
        f"{caught} of {len(outcomes)} mutations caught",
        "",
    ]
    for o in outcomes:
        old, new = o.mutation.old.splitlines(), o.mutation.new.splitlines()
        lines.append(f"{o.result:8} {o.seconds:6.1f} s  {o.mutation.name}  ({o.where})")
        lines += [f"         - {line.strip()}" for line in old if line not in new]
        lines += [f"         + {line.strip()}" for line in new if line not in old]
        lines.append(f"         {o.detail}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutations", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="run only mutations whose name contains one of these")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the run of the targeted tests on the real code")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.names or any(n in m.name for n in args.names)]
    if args.list:
        for m in chosen:
            print(f"{m.where():40} {m.name}")
        return 0
    # SIGTERM restores like Ctrl-C: the finally in apply() puts the file back.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    baseline = "skipped (--no-baseline)"
    if not args.no_baseline:
        tests = list(dict.fromkeys(t for m in chosen for t in m.tests))
        status, output = run_tests(tests)
        if status != 0:
            print(output[-5000:])
            print(f"the targeted tests fail on the real code (exit {status}): fix that first")
            return 2
        baseline = f"{len(tests)} test ids passed"
    outcomes = []
    for m in chosen:
        outcome = apply(m)
        print(f"{outcome.result:8} {outcome.seconds:6.1f} s  {m.name}", flush=True)
        outcomes.append(outcome)
    text = report(outcomes, baseline)
    print("\n" + text, end="")
    if not args.names:
        RESULTS.write_text(text)
    return 0 if all(o.result == "caught" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
