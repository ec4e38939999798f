"""A private PostgreSQL cluster for tests that stop and start the server.

The machine's shared server on 5432 is used by everyone else's tests and is
never restarted; this cluster lives in a temporary directory owned by the
``postgres`` user, on a free port, and is removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

BIN = Path("/usr/lib/postgresql") / sorted(os.listdir("/usr/lib/postgresql"))[-1] / "bin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateCluster:
    """``initdb`` + ``pg_ctl`` as the postgres user; trust auth on 127.0.0.1 only."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ledger-faults-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = _free_port()
        pw = pwd.getpwnam("postgres")
        os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._as_postgres(BIN / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres")
        self.restarts = 0

    def _as_postgres(self, *argv) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *map(str, argv)],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=on "
                   "-c max_connections=200")
        self._as_postgres(BIN / "pg_ctl", "-D", self.data, "-o", options, "-l", self.log,
                          "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(BIN / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def restart(self, down_for: float = 1.0, mode: str = "fast") -> None:
        """Stop the server, stay down ``down_for`` seconds, start it again."""
        self.stop(mode)
        time.sleep(down_for)
        self.start()
        self.restarts += 1

    def url(self, database: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql+psycopg://{user}@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str, database: str = "postgres") -> None:
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres",
                             dbname=database, autocommit=True) as conn:
            conn.execute(sql)

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already down
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
