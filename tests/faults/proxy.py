"""A fault-injecting TCP proxy for the fault tests (threads, no dependencies).

Clients connect to ``proxy.port``; every connection is piped to ``target``.
The test decides what the network does:

* :meth:`cut` — close every open connection at once (both sides see a reset),
* :meth:`refuse` / :meth:`resume` — accept new connections and close them at
  once (what a client sees while a server is down), or pipe them again,
* :meth:`drop_when` — close a connection the moment a chunk containing a marker
  passes in one direction, before forwarding it: e.g. ``b"COMMIT"`` upstream
  (the transaction never commits) or the server's ``COMMIT`` reply downstream
  (it committed, but the client never learns so: the ambiguous case).

Counters (``accepted``, ``cut_connections``, ``refused``, ``dropped``) are the
faults injected, reported by the tests.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass


@dataclass
class _Trigger:
    marker: bytes
    upstream: bool
    times: int


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``(host, port)``."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._refusing = False
        self._triggers: list[_Trigger] = []
        self._closed = False
        self.accepted = self.cut_connections = self.refused = self.dropped = 0
        threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True).start()

    def url(self, database: str, user: str = "postgres") -> str:
        return f"postgresql+psycopg://{user}@127.0.0.1:{self.port}/{database}"

    # -- faults ------------------------------------------------------------------------

    def cut(self) -> int:
        """Close every open connection; returns how many were cut."""
        with self._lock:
            victims = list(self._open)
            self._open.clear()
            self.cut_connections += len(victims) // 2
        for s in victims:
            _close(s)
        return len(victims) // 2

    def refuse(self) -> None:
        """Close new connections as soon as they are accepted (and cut the open ones)."""
        with self._lock:
            self._refusing = True
        self.cut()

    def resume(self) -> None:
        with self._lock:
            self._refusing = False

    def drop_when(self, marker: bytes, *, upstream: bool, times: int = 1) -> None:
        """Drop the next ``times`` connections that carry ``marker`` in that direction."""
        with self._lock:
            self._triggers.append(_Trigger(marker, upstream, times))

    def close(self) -> None:
        self._closed = True
        _close(self._listener)
        self.cut()

    # -- piping ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refusing = self._refusing
                if refusing:
                    self.refused += 1
            if refusing:
                _close(client)
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            server.settimeout(None)
            with self._lock:
                self.accepted += 1
                self._open.update((client, server))
            for src, dst, up in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pipe, args=(src, dst, up), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while True:
                chunk = src.recv(65536)
                if not chunk or self._fires(chunk, upstream):
                    break
                dst.sendall(chunk)
        except OSError:
            pass
        with self._lock:
            self._open.discard(src)
            self._open.discard(dst)
        _close(src)
        _close(dst)

    def _fires(self, chunk: bytes, upstream: bool) -> bool:
        with self._lock:
            for trigger in self._triggers:
                if trigger.times > 0 and trigger.upstream == upstream and trigger.marker in chunk:
                    trigger.times -= 1
                    self.dropped += 1
                    return True
        return False


def _close(s: socket.socket) -> None:
    # shutdown first: a blocked recv() in the other pipe thread returns at once.
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()
