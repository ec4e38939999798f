"""Run Celery's integration suite on the ledger backends and on Redis, side by side.

    python -m tests.conformance [--backends postgresql,sqlite,redis]
                                [--files test_tasks.py,test_canvas.py] [-- PYTEST_ARGS]

Each backend runs each file in its own pytest process (the suite starts one
in-process prefork worker per session) with a Redis broker database of its own:
``--ledger-broker`` for both ledger runs, which run one after the other, and
``--redis-broker``/``--redis-backend`` for the reference run. Ledger databases
are fresh and migrated: a new PostgreSQL database (dropped afterwards) and a new
SQLite file.

Exit status: 0 when no test failed on a ledger backend that passed on Redis in
the same run (or, without a Redis run, when none failed but those in
:data:`FAIL_EVERYWHERE`), except the tests in :data:`READS_REDIS` that read
Redis itself; 1 otherwise, or when a ledger backend ran no test at all.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis

from tests.conformance.suite import CACHE, SuiteError, celery_version, prepare

BACKENDS = ("postgresql", "sqlite", "redis")
FILES = ("test_tasks.py", "test_canvas.py")
PG_SERVER = os.environ.get("LEDGER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS_SERVER = "redis://127.0.0.1:6379"

#: Tests that read Redis itself, not the result backend, so they cannot pass on
#: another backend (the README's conformance section lists them with the reason).
READS_REDIS = {
    "t.integration.test_tasks.test_task_redis_result_backend::test_asyncresult_forget_cancels_subscription":
        "counts the Redis backend's pub/sub channels (PUBSUB CHANNELS)",
    "t.integration.test_tasks.test_task_redis_result_backend::test_asyncresult_get_cancels_subscription":
        "counts the Redis backend's pub/sub channels (PUBSUB CHANNELS)",
    "t.integration.test_canvas.test_chord::test_chord_on_error":
        "reads the Redis backend's chord join list (get_key_for_group(gid, '.j'))",
}

#: Tests that fail on every backend here, Redis included (for runs without Redis).
FAIL_EVERYWHERE = {
    "t.integration.test_tasks.test_trace_log_arguments::test_task_success":
        "caplog does not see the in-process worker's log records",
    "t.integration.test_tasks.test_trace_log_arguments::test_task_failed":
        "caplog does not see the in-process worker's log records",
}


@dataclass
class FileRun:
    passed: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    skipped: set[str] = field(default_factory=set)
    exit_code: int = 0
    seconds: float = 0.0

    @property
    def collected(self) -> int:
        return len(self.passed) + len(self.failed) + len(self.skipped)

    def summary(self) -> str:
        if self.exit_code not in (0, 1, 5):
            return f"pytest exit {self.exit_code}"
        if not self.collected:
            return "no tests"
        text = f"{len(self.passed)} passed, {len(self.failed)} failed"
        return text + (f", {len(self.skipped)} skipped" if self.skipped else "")


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    CACHE.mkdir(parents=True, exist_ok=True)
    # one directory per run: concurrent runs (on other broker databases) do not collide
    workdir = Path(tempfile.mkdtemp(prefix=f"suite-{celery_version()}-", dir=CACHE))
    try:
        prepare(workdir)
    except SuiteError as exc:
        print(f"conformance: {exc}", file=sys.stderr)
        return 2
    print(f"conformance: Celery {celery_version()}'s suite in {workdir}", flush=True)
    runs: dict[str, dict[str, FileRun]] = {}
    for backend in args.backends:
        with _backend(backend, workdir, args) as (result_backend, broker):
            runs[backend] = {
                name: _run_file(workdir, name, backend, result_backend, broker, args.pytest_args)
                for name in args.files
            }
    _report(runs, args.files)
    status = _verdict(runs)
    if status == 0:
        shutil.rmtree(workdir)
    else:
        print(f"conformance: the suite's copy and JUnit reports stay in {workdir}")
    return status


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.conformance", description=__doc__.split("\n")[0])
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma-separated, of: " + ", ".join(BACKENDS))
    p.add_argument("--files", default=",".join(FILES), help="suite files in t/integration")
    p.add_argument("--ledger-broker", default=f"{REDIS_SERVER}/3",
                   help="Redis broker database of the ledger runs")
    p.add_argument("--redis-broker", default=f"{REDIS_SERVER}/4",
                   help="Redis broker database of the Redis backend run")
    p.add_argument("--redis-backend", default=f"{REDIS_SERVER}/5",
                   help="Redis result database of the Redis backend run")
    p.add_argument("pytest_args", nargs="*", help="passed to pytest (after --), e.g. -k chord")
    args = p.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.files = [f.strip() for f in args.files.split(",") if f.strip()]
    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown or not args.backends:
        p.error(f"unknown backend {', '.join(unknown) or '(none)'}; choose from {', '.join(BACKENDS)}")
    if not args.files:
        p.error("--files names no file")
    return args


@contextmanager
def _backend(name: str, workdir: Path, args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """(result_backend URL, broker URL) of a fresh backend; dropped afterwards."""
    if name == "redis":
        _flush(args.redis_broker, args.redis_backend)
        yield args.redis_backend, args.redis_broker
        return
    from ledger.api import Ledger

    _flush(args.ledger_broker)
    if name == "sqlite":
        url = f"sqlite:///{workdir / 'ledger.db'}"
        Ledger.open(url, upgrade=True).engine.dispose()
        yield f"ledger+{url}", args.ledger_broker
        return
    db = f"ledger_conformance_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    _admin(f'CREATE DATABASE "{db}"')
    try:
        url = f"{PG_SERVER}/{db}"
        Ledger.open(url, upgrade=True).engine.dispose()
        yield f"ledger+{url}", args.ledger_broker
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def _admin(sql: str) -> None:
    server = PG_SERVER.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(server + "/postgres", autocommit=True) as conn:
        conn.execute(sql)


def _flush(*urls: str) -> None:
    # Messages or keys left by an interrupted earlier run would be consumed as new.
    for url in urls:
        redis.Redis.from_url(url).flushdb()


def _run_file(workdir: Path, name: str, backend: str, result_backend: str, broker: str,
              pytest_args: list[str]) -> FileRun:
    junit = workdir / f"{backend}-{name}.xml"
    env = dict(
        os.environ,
        TEST_BROKER=broker,
        TEST_BACKEND=result_backend,
        # the suite's Redis helper: its own keys go anywhere, but test_chord_on_error
        # reads the Redis backend's keys, so on that run it is the results' database
        REDIS_DB=(result_backend if backend == "redis" else broker).rsplit("/", 1)[-1],
    )
    cmd = [sys.executable, "-m", "pytest", f"t/integration/{name}", "-p", "no:cacheprovider",
           "-q", "--timeout=300", f"--junitxml={junit}", *pytest_args]
    print(f"\nconformance: {backend} {name}: {' '.join(cmd[3:])}", flush=True)
    started = time.monotonic()
    code = subprocess.run(cmd, cwd=workdir, env=env).returncode
    run = _outcomes(junit) if junit.exists() else FileRun()
    run.exit_code, run.seconds = code, time.monotonic() - started
    return run


def _outcomes(junit: Path) -> FileRun:
    # A test rerun by the suite's flaky marker (pytest-rerunfailures) appears once
    # per attempt; its last entry is its outcome.
    last: dict[str, str] = {}
    for case in ET.parse(junit).iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            last[test_id] = "failed"
        elif case.find("skipped") is not None:
            last[test_id] = "skipped"
        else:
            last[test_id] = "passed"
    run = FileRun()
    for test_id, outcome in last.items():
        getattr(run, outcome).add(test_id)
    return run


def _report(runs: dict[str, dict[str, FileRun]], files: list[str]) -> None:
    backends = list(runs)
    width = max(len(r.summary()) for by_file in runs.values() for r in by_file.values())
    width = max(width, *(len(b) for b in backends))
    print("\nconformance: Celery", celery_version(), "integration suite")
    print(f"{'file':<16}" + "".join(f"  {b:<{width}}" for b in backends))
    for name in files:
        print(f"{name:<16}" + "".join(f"  {runs[b][name].summary():<{width}}" for b in backends))
    for backend in backends:
        for name in files:
            run = runs[backend][name]
            for test_id in sorted(run.failed):
                note = _why(test_id, runs)
                print(f"  {backend} FAILED {test_id}{f'  ({note})' if note else ''}")


def _why(test_id: str, runs: dict[str, dict[str, FileRun]]) -> str:
    if test_id in READS_REDIS:
        return "reads Redis: " + READS_REDIS[test_id]
    if "redis" in runs:
        if any(test_id in r.failed for r in runs["redis"].values()):
            return "fails on Redis too"
    elif test_id in FAIL_EVERYWHERE:
        return "fails on Redis too: " + FAIL_EVERYWHERE[test_id]
    return ""


def _verdict(runs: dict[str, dict[str, FileRun]]) -> int:
    status = 0
    for backend, by_file in runs.items():
        if backend == "redis":
            continue
        if not any(r.collected for r in by_file.values()):
            print(f"conformance: no test ran on {backend}: that is a failure", file=sys.stderr)
            status = 1
        for name, run in by_file.items():
            if run.exit_code not in (0, 1, 5):
                print(f"conformance: pytest stopped on {backend} {name} (exit {run.exit_code})",
                      file=sys.stderr)
                status = 1
            if any(not _why(t, runs) for t in run.failed):
                status = 1
    print("conformance:", "ok" if status == 0 else "FAILED")
    return status


if __name__ == "__main__":
    sys.exit(main())
