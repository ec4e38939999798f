"""``celery-ledger relay`` as a real process the tests can SIGKILL, and waiting helpers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ledger.api import Ledger
from ledger.store.base import Checkpoint

CLI = str(Path(sys.executable).parent / "celery-ledger")
#: bound for committed events to become visible to followers: on PostgreSQL that
#: waits for the oldest transaction open on the shared server, in any database, which
#: another job may hold for minutes (a bound for a hang, not a speed check)
HORIZON_WAIT = 600


def eventually(condition: Callable[[], object], timeout: float = 60, what: str = "condition"):
    """Poll ``condition`` until truthy; fail naming ``what`` after ``timeout`` (a bound, not a speed check)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class RelayProcess:
    """A relay subprocess whose stderr lines are collected."""

    def __init__(self, url: str, bootstrap: str, topic: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [CLI, "relay", "--db", url, "--bootstrap", bootstrap, "--topic", topic,
             "--max-backoff", "1", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def saw(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def wait_for(self, text: str, timeout: float = 60) -> None:
        eventually(lambda: self.saw(text), timeout, f"relay output {text!r}; got {self.lines[-5:]}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stdout(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.read()


def relay_checkpoint(ledger: Ledger, topic: str) -> Checkpoint:
    return ledger.load_checkpoint(f"relay:{topic}")


def wait_relayed_all(ledger: Ledger, topic: str, timeout: float = 120) -> Checkpoint:
    """Until the relay's checkpoint is at the last committed event in follow order."""
    target: Checkpoint = ledger.read(ledger.log.head)
    return eventually(
        lambda: relay_checkpoint(ledger, topic) >= target and relay_checkpoint(ledger, topic),
        timeout,
        f"relay checkpoint to reach {tuple(target)}",
    )
