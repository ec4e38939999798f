"""Hostile input and output (issue 14): each mistake is one line and an exit status, run as a
real ``celery-ledger`` process; no injection reaches a terminal or a spreadsheet; no secret shown."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from celery import Celery
from celery.app.task import Context

from ledger.api import Ledger
from ledger.cli import main
from ledger.events import Encoded, TaskState

CLI = str(Path(sys.executable).parent / "celery-ledger")


def cli(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``celery-ledger argv`` as a process; no Python traceback may reach its user."""
    env = {k: v for k, v in os.environ.items() if k != "LEDGER_DATABASE_URL"}
    run = subprocess.run([CLI, *argv], capture_output=True, text=True, timeout=120, cwd=cwd, env=env)
    assert "Traceback" not in run.stderr, run.stderr
    return run


def one_line(run: subprocess.CompletedProcess, status: int) -> str:
    """The single stderr line of a command that failed with ``status``."""
    lines = run.stderr.strip().splitlines()
    assert run.returncode == status and len(lines) == 1, (run.returncode, run.stderr)
    return lines[0]


# -- 1. secrets in URLs ------------------------------------------------------------------


@pytest.mark.parametrize("key", ["password", "sslpassword"])
def test_a_secret_in_the_urls_query_is_masked_in_cli_errors(key):
    run = cli("history", "x", "--db", f"postgresql://bob@127.0.0.1/db?{key}=s3cret")
    line = one_line(run, 1)
    assert "s3cret" not in run.stderr + run.stdout
    assert f"{key}=***" in line


@pytest.mark.parametrize("key", ["password", "sslpassword"])
def test_a_secret_in_the_urls_query_is_masked_by_the_backends_as_uri(key):
    app = Celery(backend=f"ledger+postgresql://bob@127.0.0.1/db?{key}=s3cret", set_as_current=False)
    assert app.backend.as_uri() == f"ledger+postgresql+psycopg://bob@127.0.0.1/db?{key}=***"


# -- 6. URLs: in-memory SQLite refused, postgres:// accepted --------------------------------


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "ledger+sqlite://"])
def test_an_in_memory_sqlite_url_is_refused_in_one_line(url):
    line = one_line(cli("history", "x", "--db", url), 2)
    assert "in-memory SQLite database" in line and "use a file" in line


def test_a_sqlite_uri_filename_is_refused_in_one_line_naming_the_path_form(tmp_path):
    """``sqlite:///file:/x.db?mode=ro&uri=true`` said "no ledger database at
    file:/x.db" of a file that exists: the ledger finds its file by the URL's path."""
    db = tmp_path / "ledger.db"
    assert cli("db", "upgrade", "--db", f"sqlite:///{db}").returncode == 0
    line = one_line(cli("tasks", "--db", f"sqlite:///file:{db}?mode=ro&uri=true"), 2)
    assert "SQLite URI filename (uri=true)" in line and "use the file's path" in line


def test_a_postgres_url_in_herokus_spelling_is_accepted(pg_url):
    Ledger.open(pg_url).append([TaskState(task_id="t1", status="SUCCESS")])
    heroku = "postgres://" + pg_url.split("://", 1)[1]
    run = cli("history", "t1", "--db", heroku)
    assert run.returncode == 0 and "SUCCESS" in run.stdout, run.stderr


# -- 5 and 13. SQLite files: created private, never by a read command -----------------------


def test_a_new_sqlite_database_and_its_wal_are_readable_by_their_owner_only(tmp_path):
    db = tmp_path / "new.db"
    run = cli("db", "upgrade", "--db", f"sqlite:///{db}")
    assert run.returncode == 0, run.stderr
    Ledger.open(f"sqlite:///{db}").append([TaskState(task_id="t1", status="SUCCESS")])
    files = [db, tmp_path / "new.db-wal"]
    assert all(f.exists() for f in files)
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {"0o600"}


@pytest.mark.parametrize("argv", [
    ("history", "t1"), ("show", "t1"), ("export",), ("timeline", "t1"), ("tail",), ("verify",),
    ("rebuild",), ("prune", "--before", "2026-01-01"), ("db", "current"), ("db", "check"),
])
def test_a_command_on_a_mistyped_sqlite_path_says_so_and_creates_nothing(tmp_path, argv):
    db = tmp_path / "typo.db"
    line = one_line(cli(*argv, "--db", f"sqlite:///{db}"), 1)
    assert line == f"celery-ledger: no ledger database at {db} (create one: celery-ledger db upgrade)"
    assert list(tmp_path.iterdir()) == []


# -- 2 and 3. stored strings are data: no terminal escapes, no spreadsheet formulas ----------

ESC = "\x1b]0;TITLE\x07\x1b[2J"


@pytest.fixture
def hostile(sqlite_url):
    """A task whose every free-text field (and its id) carries terminal escapes."""
    Ledger.open(sqlite_url).append([
        TaskState(task_id=f"t{ESC}", status=f"CUSTOM{ESC}", name=f"proj.{ESC}", worker=f"w{ESC}\u202e",
                  exc_type="ValueError", exc_message=f"bad{ESC}\rinput", root_id=f"t{ESC}"),
    ])
    return sqlite_url


@pytest.mark.parametrize("argv", [
    ("history", f"t{ESC}"), ("show", f"t{ESC}"), ("tail",), ("tail", "--task", f"t{ESC}"),
    ("timeline", f"t{ESC}"), ("history", "nope" + ESC),
])
def test_terminal_escapes_stored_in_a_task_are_printed_escaped(hostile, argv):
    run = cli(*argv, "--db", hostile)
    out = run.stdout + run.stderr
    assert out.strip(), run
    assert not any(c in out for c in "\x1b\x07\r\u202e")
    assert "\\x1b]0;TITLE\\x07" in out


def test_csv_export_neutralizes_formula_cells_and_keeps_numbers(sqlite_url, tmp_path):
    Ledger.open(sqlite_url).append([
        TaskState(task_id="t1", status="FAILURE", name='=HYPERLINK("http://evil","x")',
                  worker="@SUM(1+1)", retries=3, exc_type="ValueError", exc_message="=1+1"),
        TaskState(task_id="t2", status="SUCCESS", name="+cmd", worker="-w", retries=0),
    ])
    out = tmp_path / "audit.csv"
    assert cli("export", "--format", "csv", "-o", str(out), "--db", sqlite_url).returncode == 0
    rows = list(csv.DictReader(out.open(newline="")))
    assert [(r["name"], r["worker"], r["exc_message"]) for r in rows] == [
        ("'=HYPERLINK(\"http://evil\",\"x\")", "'@SUM(1+1)", "'=1+1"), ("'+cmd", "'-w", ""),
    ]
    assert [(r["position"], r["retries"]) for r in rows] == [("1", "3"), ("2", "0")]
    for row in rows:
        assert not any(str(v).startswith(("=", "+", "-", "@", "\t", "\r")) for v in row.values())


@pytest.mark.parametrize("argv", [("export", "--format", "csv"), ("tasks", "--format", "csv")])
def test_csv_output_shows_terminal_escapes_as_text(hostile, argv):
    run = cli(*argv, "--db", hostile)
    assert run.returncode == 0, run
    assert not any(c in run.stdout for c in "\x1b\x07\u202e")
    assert "proj.\\x1b]0;TITLE\\x07\\x1b[2J" in run.stdout
    names = [row["name"] for row in csv.DictReader(io.StringIO(run.stdout, newline=""))]
    assert names == ["proj.\\x1b]0;TITLE\\x07\\x1b[2J"]


SURROGATE_RESULT = "a\ud800b"  # as json.loads('"a\\ud800b"') gives it


@pytest.fixture
def surrogates(sqlite_url):
    """A result and an argument holding a lone surrogate, stored through the backend."""
    app = Celery("surrogates", backend=f"ledger+{sqlite_url}", set_as_current=False)
    app.conf.result_extended = True

    def request(task_id, args=()):
        return Context(id=task_id, task="s.task", args=list(args), kwargs={}, hostname="w",
                       retries=0, delivery_info={"routing_key": "q"})

    app.backend.store_result("sur-result", SURROGATE_RESULT, "SUCCESS", request=request("sur-result"))
    app.backend.store_result("sur-args", 1, "SUCCESS", request=request("sur-args", ["\ud800"]))
    assert app.backend.get_task_meta("sur-result")["result"] == SURROGATE_RESULT  # as stored
    return sqlite_url


@pytest.mark.parametrize(("argv", "shown"), [
    (("show", "sur-result"), True), (("history", "sur-result"), True), (("history", "sur-args"), False),
    (("history", "sur-args", "--format", "json"), True), (("show", "sur-result", "--format", "json"), True),
    (("tail",), False), (("tail", "--format", "json"), True), (("tasks",), False),
    (("tasks", "--format", "csv"), True), (("tasks", "--format", "json"), True),
    (("export", "--format", "csv"), True), (("export", "--format", "text"), False),
])
def test_a_lone_surrogate_in_a_result_or_argument_is_printed_as_its_escape(surrogates, argv, shown):
    run = cli(*argv, "--db", surrogates)
    assert run.returncode == 0, run.stderr
    assert ("\\ud800" in run.stdout) is shown, run.stdout  # text lines show no values: no error is all


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_a_json_export_holding_a_lone_surrogate_is_written_and_reads_back_as_stored(
        surrogates, tmp_path, fmt):
    out = tmp_path / f"audit.{fmt}"
    run = cli("export", "--format", fmt, "-o", str(out), "--db", surrogates)
    assert run.returncode == 0, run.stderr
    text = out.read_text(encoding="utf-8")
    assert "\\ud800" in text  # JSON's escape: valid JSON that UTF-8 holds
    events = [json.loads(line) for line in text.splitlines()] if fmt == "jsonl" else json.loads(text)
    data = {e["stream_id"]: e["data"] for e in events}
    assert data["task:sur-result"]["result"]["value"] == SURROGATE_RESULT
    assert data["task:sur-args"]["args"]["value"] == ["\ud800"]


def test_csv_export_leaves_numeric_results_alone_and_quotes_text_that_starts_like_a_formula(
        sqlite_url, tmp_path):
    def raw_json(text: str) -> Encoded:
        return Encoded(content_type="application/json", data=text.encode())

    Ledger.open(sqlite_url).append([
        TaskState(task_id="neg", status="SUCCESS", result=raw_json("-5")),
        TaskState(task_id="exp", status="SUCCESS", result=raw_json("-1.5e3")),
        TaskState(task_id="text", status="SUCCESS", result=raw_json('"-5"')),
        TaskState(task_id="inf", status="SUCCESS", result=raw_json("-Infinity")),
        TaskState(task_id="dde", status="FAILURE", name="-1+cmd|' /C calc'!A0", worker="-cmd",
                  exc_type="ValueError", exc_message="-2+3"),
    ])
    out = tmp_path / "audit.csv"
    assert cli("export", "--format", "csv", "-o", str(out), "--db", sqlite_url).returncode == 0
    rows = {r["stream_id"]: r for r in csv.DictReader(out.open(newline=""))}
    assert {k: r["result"] for k, r in rows.items()} == {
        "task:neg": "-5", "task:exp": "-1500.0", "task:text": '"-5"', "task:inf": "'-Infinity",
        "task:dde": "",
    }
    dde = rows["task:dde"]
    assert (dde["name"], dde["worker"], dde["exc_message"]) == (
        "'-1+cmd|' /C calc'!A0", "'-cmd", "'-2+3")


def _column_starts_everywhere(lines: list[str], column: str) -> bool:
    """Whether ``column`` starts at the same place in every row as in the header line."""
    at = lines[0].index(column)
    return all(row[at - 2:at] == "  " and row[at] != " " for row in lines)


def test_tasks_and_history_columns_line_up_when_values_are_escaped(sqlite_url):
    Ledger.open(sqlite_url).append([
        TaskState(task_id="plain", status="SUCCESS", worker="w1", retries=7),
        TaskState(task_id="hostile", status="STARTED", worker="w\x1b[2J\u202e", retries=8),
        TaskState(task_id="hostile", status="FAILURE", worker="w2", retries=9,
                  exc_type="ValueError", exc_message="x"),
        TaskState(task_id="odd", status="SUCCESS", worker="w\x1b[2J\u202e", retries=6),
    ])
    tasks = cli("tasks", "--db", sqlite_url)
    assert tasks.returncode == 0, tasks.stderr
    assert "w\\x1b[2J\\u202e" in tasks.stdout and "w1" in tasks.stdout
    assert _column_starts_everywhere(tasks.stdout.splitlines(), "retries"), tasks.stdout
    history = cli("history", "hostile", "--db", sqlite_url)
    assert history.returncode == 0, history.stderr
    assert "w\\x1b[2J\\u202e" in history.stdout
    assert _column_starts_everywhere(history.stdout.splitlines()[1:], "RETRIES"), history.stdout


# -- 7. export files: one line for a path that cannot be written, the old file kept on failure --


@pytest.fixture
def busy(sqlite_url):
    """A ledger whose every output is over 1 MB (more than a pipe holds): 2,000 events."""
    ledger = Ledger.open(sqlite_url)
    ledger.append([TaskState(task_id=f"t{i}", status="SUCCESS", name="proj.add", worker="w" * 200)
                   for i in range(1000)])
    ledger.append([TaskState(task_id="long", status="STARTED", retries=i, worker="w" * 1000)
                   for i in range(1000)])
    return sqlite_url


@pytest.mark.parametrize(("target", "message"), [
    (".", "{}: is a directory"),
    ("missing/x.jsonl", "{}: no such directory missing"),
    ("/dev/full", "{}: No space left on device"),
])
def test_export_to_a_path_that_cannot_be_written_says_so_in_one_line(busy, tmp_path, target, message):
    line = one_line(cli("export", "-o", target, "--db", busy, cwd=tmp_path), 1)
    assert line == "celery-ledger: " + message.format(target)


def _limit_file_size() -> None:
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def test_an_export_that_fails_midway_leaves_the_existing_file_untouched(busy, tmp_path):
    old = tmp_path / "audit.jsonl"
    old.write_text("yesterday's export\n")
    env = {k: v for k, v in os.environ.items() if k != "LEDGER_DATABASE_URL"}
    run = subprocess.run([CLI, "export", "-o", str(old), "--db", busy], capture_output=True,
                         text=True, timeout=120, env=env, preexec_fn=_limit_file_size)
    assert one_line(run, 1) == f"celery-ledger: {old}: File too large"
    assert old.read_text() == "yesterday's export\n"
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("ledger.db")] == ["audit.jsonl"]


def test_an_export_of_an_unknown_task_leaves_the_existing_file_untouched(busy, tmp_path):
    old = tmp_path / "audit.csv"
    old.write_text("kept\n")
    line = one_line(cli("export", "-o", str(old), "--task", "nope", "--format", "csv", "--db", busy), 1)
    assert line == "celery-ledger: no events for task 'nope' in this ledger"
    assert old.read_text() == "kept\n"


def test_an_export_replaces_the_file_only_when_done(busy, tmp_path):
    out = tmp_path / "audit.jsonl"
    out.write_text("old\n")
    run = cli("export", "-o", str(out), "--db", busy)
    assert run.returncode == 0 and run.stderr == f"wrote 2000 events to {out}\n"
    assert len(out.read_text().splitlines()) == 2000


@pytest.mark.parametrize(("argv", "target", "protected"), [
    (("export", "-o"), "ledger.db", "ledger.db"),  # relative to the working directory
    (("export", "-o"), "sub/../ledger.db", "ledger.db"),
    (("export", "-o"), "link.db", "ledger.db"),  # a symlink to the database
    (("export", "-o"), "hard.db", "ledger.db"),  # a hard link
    (("export", "--format", "csv", "-o"), "ledger.db-wal", "ledger.db-wal"),
    (("export", "-o"), "ledger.db-shm", "ledger.db-shm"),
    (("export", "-o"), "ledger.db-journal", "ledger.db-journal"),
    (("timeline", "t1", "--html"), "ledger.db", "ledger.db"),
    (("timeline", "t1", "--html"), "ledger.db-wal", "ledger.db-wal"),
])
def test_an_output_file_that_is_the_ledgers_database_is_refused(sqlite_url, tmp_path, argv, target, protected):
    """``export -o`` the database file printed "wrote N events" and replaced the ledger
    with them ("file is not a database" after)."""
    Ledger.open(sqlite_url).append([TaskState(task_id="t1", status="SUCCESS")])
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.db").symlink_to(tmp_path / "ledger.db")
    os.link(tmp_path / "ledger.db", tmp_path / "hard.db")
    before = sorted(p.name for p in tmp_path.iterdir())
    line = one_line(cli(*argv, target, "--db", "sqlite:///ledger.db", cwd=tmp_path), 2)
    assert line == (f"celery-ledger: {target}: that is the ledger's own database file {tmp_path / protected}; "
                    "writing it would replace the ledger: choose another file")
    # no temporary file left beside it; the ledger reads as before (SQLite itself may
    # have checkpointed its WAL when the command closed the database)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name in before or "tmp" in p.name) == before
    assert [e.stream_id for e in Ledger.open(sqlite_url).history("t1")] == ["task:t1"]


# -- 8. a reader that goes away (| head) ends the command quietly ------------------------------


@pytest.mark.parametrize("argv", [
    ("export",), ("export", "--format", "csv"), ("tail", "-n", "2000", "--format", "json"),
    ("history", "long", "--format", "json"), ("history", "long"),
])
def test_a_closed_pipe_ends_the_command_quietly(busy, argv):
    env = {k: v for k, v in os.environ.items() if k != "LEDGER_DATABASE_URL"}
    proc = subprocess.Popen([CLI, *argv, "--db", busy], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    assert proc.stdout.readline()
    proc.stdout.close()  # `| head -1`
    err = proc.stderr.read().decode()
    # 141 (SIGPIPE's status) when a write failed; a single write into the closed pipe can
    # also end short without an error (exit 0). Never a traceback, never click's status 1.
    assert proc.wait(timeout=120) in (0, 141) and err == ""


# -- 13. an empty time window is a mistake worth a line ----------------------------------------


def test_export_with_since_not_before_until_says_so(sqlite_url):
    line = one_line(cli("export", "--since", "2026-12-03", "--until", "2026-12-01", "--db", sqlite_url), 2)
    assert line == ("celery-ledger: --since 2026-12-03T00:00:00+00:00 is not before "
                    "--until 2026-12-01T00:00:00+00:00: the window is empty")


# -- 9. numeric options are validated before anything runs --------------------------------------


@pytest.mark.parametrize(("argv", "option"), [
    (("timeline", "t1", "--width", "-5"), "'--width': -5"),
    (("timeline", "t1", "--width", "0"), "'--width': 0"),
    # 10**8 columns had not finished after 20 s; 10**20 was a traceback
    (("timeline", "t1", "--width", "1001"), "'--width': 1001"),
    (("timeline", "t1", "--width", "99999999999999999999"), "'--width': 99999999999999999999"),
    (("relay", "--bootstrap", "127.0.0.1:1", "--topic", "t", "--batch", "0"), "'--batch': 0"),
    (("relay", "--bootstrap", "127.0.0.1:1", "--topic", "t", "--batch", "-1"), "'--batch': -1"),
    (("relay", "--bootstrap", "127.0.0.1:1", "--topic", "t", "--max-backoff", "0"), "'--max-backoff': 0"),
    # a batch past SQL's largest integer was an OverflowError (a traceback); NaN slipped
    # through click's FloatRange and would end the relay at its first wait
    (("relay", "--bootstrap", "127.0.0.1:1", "--topic", "t", "--batch", "99999999999999999999"),
     "'--batch': 99999999999999999999 is not in the range 1<=x<=1000000"),
    (("relay", "--bootstrap", "127.0.0.1:1", "--topic", "t", "--max-backoff", "nan"),
     "'--max-backoff': 'nan' is not a number of seconds"),
    (("relay", "--bootstrap", "127.0.0.1:1", "--topic", "t", "--max-backoff", "inf"), "'--max-backoff': inf"),
    (("tail", "-n", "-1"), "'-n' / '--lines': -1"),
    (("tail", "-n", "many"), "'-n' / '--lines': 'many'"),
    # a relative time before the year 1 was an OverflowError (a traceback)
    (("tasks", "--since", "-99999999999999999999d"), "'--since': '-99999999999999999999d' is before the year 1"),
    (("stats", "--since", "-9999999d"), "'--since': '-9999999d' is before the year 1"),
    # a time whose offset takes it past the year 1 or 9999 in UTC was "database error
    # (OverflowError)", status 1: the database blamed for the input
    (("show", "t1", "--as-of", "9999-12-31T23:59:59-12:00"),
     "'--as-of': '9999-12-31T23:59:59-12:00' is outside the years 1 to 9999 in UTC"),
    (("stats", "--since", "0001-01-01T00:00:00+01:00"),
     "'--since': '0001-01-01T00:00:00+01:00' is outside the years 1 to 9999 in UTC"),
    (("tasks", "--until", "9999-12-31T23:59:59-01:00"), "'--until': '9999-12-31T23:59:59-01:00' is outside"),
    (("export", "--since", "0001-01-01T00:00:00+01:00"), "'--since': '0001-01-01T00:00:00+01:00' is outside"),
    (("prune", "--before", "0001-01-01T00:00:00+01:00"), "'--before': '0001-01-01T00:00:00+01:00' is outside"),
])
def test_a_numeric_option_out_of_range_is_refused_in_one_line(sqlite_url, argv, option):
    line = one_line(cli(*argv, "--db", sqlite_url), 2)
    assert line.startswith(f"celery-ledger: Invalid value for {option}")
    assert line.endswith(f"(see: celery-ledger {argv[0]} --help)")


@pytest.mark.parametrize("any_url", ["sqlite", "postgresql"], indirect=True)
@pytest.mark.parametrize("argv", [
    ("tasks", "--limit", "99999999999999999999"),
    ("tasks", "--slowest", "99999999999999999999", "--limit", "99999999999999999999"),
])
def test_a_limit_past_sqls_largest_integer_lists_every_task(any_url, argv):
    """Beyond 2**63 - 1, SQLite's driver raised OverflowError (a traceback) and
    PostgreSQL said bigint out of range: a limit that large asks for everything."""
    Ledger.open(any_url).append([TaskState(task_id="t1", status="STARTED"), TaskState(task_id="t1", status="SUCCESS"),
                                 TaskState(task_id="t2", status="SUCCESS")])
    run = cli(*argv, "--db", any_url, "--format", "csv")
    assert run.returncode == 0, run.stderr
    rows = list(csv.DictReader(io.StringIO(run.stdout)))
    assert sorted(r["task_id"] for r in rows) == (["t1"] if "--slowest" in argv else ["t1", "t2"])


@pytest.mark.parametrize("size", ["abc", "0", "-1", "1001"])
def test_a_bad_pool_size_in_the_environment_is_one_line(pg_url, size):
    """``$LEDGER_POOL_SIZE=abc`` was a ValueError traceback; 0 and -1 were taken."""
    env = {**os.environ, "LEDGER_POOL_SIZE": size}
    env.pop("LEDGER_DATABASE_URL", None)
    run = subprocess.run([CLI, "history", "x", "--db", pg_url], capture_output=True, text=True, timeout=120, env=env)
    assert "Traceback" not in run.stderr
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        f"celery-ledger: $LEDGER_POOL_SIZE must be a whole number from 1 to 1000, not {size!r}"]


def test_a_mistyped_command_gets_one_line_with_a_suggestion(sqlite_url):
    line = one_line(cli("histroy", "t1"), 2)
    assert line == ("celery-ledger: No such command 'histroy'. Did you mean one of these? history "
                    "(see: celery-ledger --help)")


# -- 14. times: ISO 8601 with Z on every supported Python, relative times, @N for positions ---

ROOT = Path(__file__).resolve().parents[1]


def _python_3_10() -> str | None:
    found = sorted(Path.home().glob(".pyenv/versions/3.10.*/bin/python3.10"))
    return str(found[-1]) if found else shutil.which("python3.10")


@pytest.mark.skipif(_python_3_10() is None, reason="needs a Python 3.10 interpreter")
def test_an_iso_time_with_z_is_parsed_on_python_3_10():
    import dateutil

    site = Path(dateutil.__file__).parents[1]  # dateutil and six are pure Python
    code = ("import sys; sys.path.append(sys.argv[1]); from ledger.times import parse_time; "
            "print(sys.version_info[:2], parse_time('2026-11-25T10:00:00Z').isoformat())")
    run = subprocess.run([_python_3_10(), "-c", code, str(site)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert run.stdout.strip() == "(3, 10) 2026-11-25T10:00:00+00:00", run.stderr


@pytest.fixture
def three_states(sqlite_url):
    ledger = Ledger.open(sqlite_url)
    for status in ("STARTED", "RETRY", "SUCCESS"):
        ledger.append([TaskState(task_id="t1", status=status)])
    return sqlite_url


@pytest.mark.parametrize(("as_of", "state", "when"), [
    ("@1", "STARTED", "at position 1"),
    ("@2", "RETRY", "at position 2"),
    ("2000-01-01T00:00:00Z", "PENDING", "at 2000-01-01T00:00:00+00:00"),
    ("2999-01-01T00:00:00Z", "SUCCESS", "at 2999-01-01T00:00:00+00:00"),
    ("2999-01-01", "SUCCESS", "at 2999-01-01T00:00:00+00:00"),
    ("-1h", "PENDING", "at "),
    ("yesterday", "PENDING", "at "),
    ("now", "SUCCESS", "at "),
    # past what SQLite's driver takes (an OverflowError, a traceback): the whole log
    ("@99999999999999999999", "SUCCESS", "at position 9223372036854775807"),
])
def test_show_as_of_takes_a_position_or_a_time(three_states, as_of, state, when):
    run = cli("show", "t1", "--as-of", as_of, "--db", three_states)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"task t1 {when}") and f"state: {state}\n" in run.stdout


@pytest.mark.parametrize(("as_of", "message"), [
    ("1733140000", "'1733140000' is ambiguous: write @1733140000 for a log position, or a time"),
    ("@x", "'@x' is not a log position: use @ and a number, e.g. @123"),
    ("@\u00b2", "'@\u00b2' is not a log position: use @ and a number, e.g. @123"),  # "²".isdigit()
    ("last tuesday", "'last tuesday' is not a time: use ISO 8601"),
])
def test_show_as_of_refuses_what_it_cannot_read_in_one_line(three_states, as_of, message):
    line = one_line(cli("show", "t1", "--as-of", as_of, "--db", three_states), 2)
    assert message in line


# -- 10. relay --once gives up on an unreachable broker; relay without the kafka extra --------


def test_relay_once_gives_up_on_an_unreachable_broker_in_one_line(sqlite_url):
    Ledger.open(sqlite_url).append([TaskState(task_id="t1", status="SUCCESS")])
    run = cli("relay", "--once", "--bootstrap", "127.0.0.1:1", "--topic", "t", "--max-backoff", "0.2",
              "--db", sqlite_url)
    line = one_line(run, 1)
    assert line.startswith("celery-ledger: Kafka at 127.0.0.1:1 failed 3 times in a row (")
    assert line.endswith("relayed 0 events, checkpoint (0, 0)")
    assert run.stdout == ""


def test_the_relays_backoff_never_overflows_and_stays_under_its_cap():
    """``0.2 * 2**failures`` is past a float at 1,024 failures in a row (hours of Kafka
    down): the relay ended with OverflowError instead of waiting and trying again."""
    from ledger.relay import backoff

    for failures in (0, 7, 1023, 1024, 10**6):
        assert 0 <= backoff(failures, 10.0) <= 10.0
    assert backoff(0, 10.0) <= 0.2


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"batch_size": 0}, "batch_size must be a whole number from 1 to 1,000,000, not 0"),
    ({"batch_size": 10**20}, "batch_size must be a whole number from 1 to 1,000,000"),
    ({"batch_size": 2.5}, "batch_size must be a whole number"),
    ({"max_backoff": float("nan")}, "max_backoff must be more than 0 and at most 3600 seconds, not nan"),
    ({"max_backoff": float("inf")}, "max_backoff must be more than 0 and at most 3600 seconds, not inf"),
    ({"max_backoff": 0}, "max_backoff must be more than 0"),
    ({"topic": "bad topic!"}, "topic 'bad topic!' is not a Kafka topic name"),
    ({"topic": ""}, "topic '' is not a Kafka topic name"),
    ({"topic": "a" * 250}, "is not a Kafka topic name: 1 to 249"),
    ({"topic": ".."}, r"topic '\.\.' is not a Kafka topic name"),
    ({"state_topic": "t"}, "the state topic must not be the event topic"),
    ({"state_topic": "s/t"}, "state topic 's/t' is not a Kafka topic name"),
    ({"bootstrap": "127.0.0.1:abc"}, "bootstrap server '127.0.0.1:abc' is not HOST:PORT"),
    ({"bootstrap": "[::1"}, r"bootstrap server '\[::1' is not HOST:PORT"),
    ({"bootstrap": "127.0.0.1:99999"}, "bootstrap server '127.0.0.1:99999' is not HOST:PORT"),
    ({"bootstrap": "a:1,"}, "bootstrap server '' is not HOST:PORT"),
])
def test_the_relay_refuses_a_batch_or_backoff_it_cannot_use(sqlite_url, kwargs, message):
    """... and a topic Kafka would refuse, a bootstrap server that is no HOST:PORT (a
    traceback from kafka-python, or a malformed address reported as Kafka being
    down), a state topic that is the event topic (its records mixed into the event
    stream, where every consumer stopped at the first)."""
    from ledger.relay import Relay

    args = {"bootstrap": "127.0.0.1:1", "topic": "t", **kwargs}
    with pytest.raises(ValueError, match=message):
        Relay(Ledger.open(sqlite_url), args.pop("bootstrap"), args.pop("topic"), **args)


@pytest.mark.parametrize("bootstrap", ["127.0.0.1:9092", "[::1]:9092", "::1", "kafka", "a:1, b:2"])
def test_the_relay_takes_each_form_of_bootstrap_server(sqlite_url, bootstrap):
    from ledger.relay import Relay

    assert Relay(Ledger.open(sqlite_url), bootstrap, "t").bootstrap == bootstrap


@pytest.mark.parametrize(("args", "message"), [
    (["--bootstrap", "127.0.0.1:abc", "--topic", "t"], "Invalid value for '--bootstrap': bootstrap server"),
    (["--bootstrap", "127.0.0.1:1", "--topic", "bad topic!"], "Invalid value for '--topic': topic 'bad topic!'"),
    (["--bootstrap", "127.0.0.1:1", "--topic", "t", "--state-topic", "t"],
     "Invalid value for '--state-topic': must not be the event topic ('t')"),
])
def test_relay_options_kafka_would_refuse_are_one_usage_line(sqlite_url, args, message):
    assert message in one_line(cli("relay", *args, "--once", "--db", sqlite_url), 2)


def test_relay_without_the_kafka_extra_says_what_to_install(sqlite_url):
    code = ("import sys; sys.modules['kafka'] = None  # as if kafka-python were not installed\n"
            "from ledger.cli import main; sys.exit(main(sys.argv[1:]))")
    run = subprocess.run([sys.executable, "-c", code, "relay", "--bootstrap", "127.0.0.1:1",
                          "--topic", "t", "--db", sqlite_url], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in run.stderr
    assert one_line(run, 1) == 'celery-ledger: relay needs kafka-python: pip install "celery-ledger[kafka]"'


# -- 11. a schema revision this version does not know ----------------------------------------

UNKNOWN = ("celery-ledger: the database's schema is at revision 'ffff0000', which this "
           "celery-ledger does not know (written by a newer version?)")


@pytest.fixture
def newer_schema(sqlite_url):
    """A ledger migrated by a (pretended) newer celery-ledger."""
    Ledger.open(sqlite_url).append([TaskState(task_id="t1", status="SUCCESS")])
    with Ledger.open(sqlite_url).engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'ffff0000'")
    return sqlite_url


@pytest.mark.parametrize("argv", [("db", "upgrade"), ("db", "check"), ("db", "downgrade", "base")])
def test_db_commands_on_an_unknown_revision_say_so_in_one_line(newer_schema, argv):
    assert one_line(cli(*argv, "--db", newer_schema), 1) == UNKNOWN


def test_db_check_on_an_older_revision_names_the_fix_in_one_line(tmp_path):
    """Alembic's own words were "Target database is not up to date.", naming neither
    the revision nor the command, where every other command names both."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    assert cli("db", "upgrade", "0003_catalogue", "--db", url).returncode == 0
    assert one_line(cli("db", "check", "--db", url), 1) == (
        f"celery-ledger: {url} is at schema revision 0003_catalogue, not 0005_chord_parts_streams: "
        f"run `celery-ledger db upgrade --db {url}`"
    )


def test_a_read_command_on_an_unknown_revision_warns_and_reads(newer_schema):
    run = cli("history", "t1", "--db", newer_schema)
    assert run.returncode == 0 and "SUCCESS" in run.stdout
    assert run.stderr.startswith("celery-ledger: warning: the database's schema is at revision "
                                 "'ffff0000', unknown to this celery-ledger")


def test_db_upgrade_to_a_revision_that_does_not_exist_says_so(sqlite_url):
    line = one_line(cli("db", "upgrade", "nosuch", "--db", sqlite_url), 1)
    assert line == "celery-ledger: Can't locate revision identified by 'nosuch'"


@pytest.mark.parametrize("any_url", ["sqlite", "postgresql"], indirect=True)
@pytest.mark.parametrize(("argv", "status", "said"), [
    (("tasks", "--name", "a\x00b"), 0, "no tasks match"),
    (("tasks", "--root", "a\x00b", "--worker", "w\x00"), 0, "no tasks match"),
    (("history", "a\x00b"), 1, "celery-ledger: no events for task 'a\\x00b' in this ledger"),
    (("show", "a\x00b", "--as-of", "@1"), 1, "celery-ledger: no events for task 'a\\x00b' in this ledger"),
    (("timeline", "a\x00b"), 1, "celery-ledger: no task, group or chord 'a\\x00b' in this ledger"),
    (("export", "--task", "a\x00b"), 1, "celery-ledger: no events for task 'a\\x00b' in this ledger"),
])
def test_a_nul_in_an_id_or_a_filter_finds_nothing_on_either_database(any_url, capsys, argv, status, said):
    """PostgreSQL holds no NUL in text (``export --task`` was "database error
    (DataError)"). A shell cannot pass one (argv is C strings), a program calling
    ``main`` can: run in-process."""
    Ledger.open(any_url).append([TaskState(task_id="t1", status="SUCCESS", name="a")])
    assert main([*argv, "--db", any_url]) == status
    out = capsys.readouterr()
    assert (out.err if status else out.out).strip() == said


@pytest.mark.parametrize(("argv", "shown", "where"), [
    (("show", "t\udcff"), "'t\\xff'", "celery-ledger show"),
    (("history", "t\udcff"), "'t\\xff'", "celery-ledger history"),
    (("timeline", "\udcff"), "'\\xff'", "celery-ledger timeline"),
    (("tasks", "--name", "a\udcffb"), "'a\\xffb'", "celery-ledger tasks"),
    (("tasks", "--worker=w\udcff"), "'--worker=w\\xff'", "celery-ledger tasks"),
    (("db", "upgrade", "\udcff"), "'\\xff'", "celery-ledger db upgrade"),
])
def test_an_argument_that_is_not_utf8_is_one_usage_line(sqlite_url, argv, shown, where):
    """A raw byte from the shell (``$'\\xff'``; Python hands it over as a lone
    surrogate) was a UnicodeEncodeError traceback from the database driver."""
    line = one_line(cli(*argv, "--db", sqlite_url), 2)
    assert line == f"celery-ledger: {shown} is not UTF-8 text: ids, names and filters must be (see: {where} --help)"


def test_a_file_name_that_is_not_utf8_is_still_a_file_name(sqlite_url, tmp_path):
    Ledger.open(sqlite_url).append([TaskState(task_id="t1", status="SUCCESS")])
    for i, form in enumerate((("-o", "{}"), ("--output={}",), ("-o{}",))):
        target = str(tmp_path / f"r\udcffsults{i}.json")
        run = cli("export", "--task", "t1", *(f.format(target) for f in form), "--db", sqlite_url)
        assert run.returncode == 0, (form, run.stderr)
        assert os.path.exists(os.fsencode(tmp_path) + b"/r\xffsults%d.json" % i), form


@pytest.mark.parametrize("where", ["option", "environment"])
def test_a_database_url_that_is_not_utf8_is_one_usage_line_naming_the_byte(tmp_path, where):
    """``--db $'sqlite:////tmp/\\xff.db'`` was a UnicodeEncodeError traceback from
    SQLAlchemy's URL; the URL is not echoed (it may hold a password)."""
    url = "postgresql://bob:s3cr\udcffet@127.0.0.1/db" if where == "option" else f"sqlite:///{tmp_path}/l\udcfe.db"
    if where == "option":
        run = cli("tasks", "--db", url)
    else:
        env = {**os.environ, "LEDGER_DATABASE_URL": url}
        run = subprocess.run([CLI, "tasks"], capture_output=True, text=True, timeout=120, env=env)
        assert "Traceback" not in run.stderr, run.stderr
    byte = "\\xff" if where == "option" else "\\xfe"
    assert one_line(run, 2) == (
        f"celery-ledger: the database URL is not UTF-8 text (it holds the byte {byte}):"
        " SQLite's paths and PostgreSQL's names must be"
    )
    assert not list(tmp_path.iterdir())


def test_a_lone_surrogate_no_byte_maps_to_is_refused_in_one_line_too(sqlite_url, capsys):
    """``main(["show", "\\ud800"])`` from a program (no shell yields that one): the
    usage line, not a UnicodeEncodeError while wording it."""
    assert main(["show", "\ud800", "--db", sqlite_url]) == 2
    assert capsys.readouterr().err.strip() == (
        "celery-ledger: '\\\\ud800' is not UTF-8 text: ids, names and filters must be"
        " (see: celery-ledger show --help)"
    )
