"""Real ``celery worker`` processes for the fault tests, started and killed at will.

Same command line as ``tests/test_celery_worker.py`` (prefork, Redis broker,
a queue and key prefix of the test's own), with the fault app and extra Celery
settings; the worker's log goes to a file the test reads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import redis
from celery import Celery

from tests.conftest import RUN_ID
from tests.faults.faultapp import make_app
from tests.test_celery_worker import BROKER, ROOT


class Workers:
    """Workers of one test: same queue, backend and settings; cleaned up by :meth:`close`."""

    def __init__(self, backend: str, conf: dict, log_dir: Path) -> None:
        self.backend = backend
        self.conf = conf
        self.queue = f"ledger-faults-{RUN_ID}-{uuid.uuid4().hex[:6]}"
        self.prefix = f"{self.queue}:"
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def client(self, backend: str | None = None) -> Celery:
        """The client-side app (optionally with another backend URL, e.g. bypassing a proxy)."""
        return make_app(BROKER, backend or self.backend, self.queue, self.prefix, dict(self.conf))

    def start(self, concurrency: int = 3) -> subprocess.Popen:
        env = dict(
            os.environ,
            LEDGER_TEST_BROKER=BROKER,
            LEDGER_TEST_BACKEND=self.backend,
            LEDGER_TEST_QUEUE=self.queue,
            LEDGER_TEST_PREFIX=self.prefix,
            LEDGER_FAULT_CONF=json.dumps(self.conf),
            PYTHONPATH=str(ROOT),
        )
        log = self.log_dir / f"worker-{len(self.procs)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "tests.faults.faultapp", "worker",
                 "-P", "prefork", "-c", str(concurrency), "-Q", self.queue,
                 "-n", f"{self.queue}-{len(self.procs)}@%h",
                 "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "warning"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: SIGKILL reaches the children
            )
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL the worker and its pool children at once (no shutdown, no acks)."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(30)
        r = redis.Redis.from_url(BROKER)
        keys = list(r.scan_iter(f"{self.prefix}*"))
        if keys:
            r.delete(*keys)
