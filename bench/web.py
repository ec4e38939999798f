"""The web console: page latency, and an appended event's latency to SSE clients.

    .venv/bin/python -m bench.web --db postgresql+psycopg://postgres@127.0.0.1/bench_web

Runs the real ``celery-ledger web`` process on a free loopback port. Seeds
``--tasks`` tasks (several names, workers, states) and one 20-task workflow
unless the log already has that many. Reports, as JSON:

* ``pages``: p50/p99 ms of ``--requests`` sequential GETs of each page and API
  route (one client, keep-alive);
* ``sse``: ``--events`` single-event appends at ``--rate``/s; the time from the
  append returning to the event read by ``Ledger.follow()`` in this process (the
  floor: what the log's followers see), then by 1 and by ``--clients`` connected
  ``/api/events`` clients (p50/p99/max over all clients and events);
* ``stores``: single-event appends per second for ``--store-seconds`` with no
  SSE client and with ``--clients`` connected, alternated ``--rounds`` times.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx

from bench.pacing import paced_appends
from bench.stats import percentile
from ledger.api import Ledger
from ledger.events import TaskState
from tests.kafka import free_port

NAMES = ["shop.charge", "shop.refund", "mail.send", "sync.inventory", "report.build"]
STATES = ["SUCCESS"] * 8 + ["FAILURE", "RETRY"]


def seed(ledger: Ledger, n: int) -> tuple[str, str]:
    """``n`` tasks and one workflow (a chain of 20 under one root); returns (a task id, the root)."""
    prefix = uuid.uuid4().hex[:6]
    for start in range(0, n, 1000):
        ledger.append(
            TaskState(task_id=f"b-{prefix}-{i}", status=STATES[i % len(STATES)], name=NAMES[i % 5],
                      worker=f"w{i % 7}@host", queue=f"q{i % 3}", retries=0)
            for i in range(start, min(n, start + 1000))
        )
    root = f"wf-{prefix}-0"
    for i in range(20):
        common = dict(task_id=f"wf-{prefix}-{i}", name=NAMES[i % 5], root_id=root,
                      parent_id=f"wf-{prefix}-{i - 1}" if i else None, worker="w1@host")
        ledger.append([TaskState(status="STARTED", **common)])
        ledger.append([TaskState(status="SUCCESS", **common)])
    return f"b-{prefix}-{n // 2}", root


def start_server(url: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cli = str(Path(sys.executable).parent / "celery-ledger")
    proc = subprocess.Popen([cli, "web", "--db", url, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(base + "/static/console.css", timeout=2)
            return proc, base
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("celery-ledger web did not start")


def time_pages(base: str, paths: list[str], requests: int) -> dict:
    out = {}
    with httpx.Client(base_url=base, timeout=30) as client:
        for path in paths:
            client.get(path)  # warm: first query plans, templates compiled
            times = []
            for _ in range(requests):
                t0 = time.perf_counter()
                r = client.get(path)
                times.append((time.perf_counter() - t0) * 1000)
            out[path] = {"status": r.status_code, "p50_ms": round(statistics.median(times), 2),
                         "p99_ms": round(percentile(times, 99), 2)}
    return out


class Clients:
    """``n`` raw SSE clients on threads, noting when each event's position arrives."""

    def __init__(self, port: int, n: int) -> None:
        self.seen: list[dict[int, float]] = [{} for _ in range(n)]
        self.stop = threading.Event()
        self.socks = []
        for i in range(n):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            sock.settimeout(0.5)
            self.socks.append(sock)
            threading.Thread(target=self._read, args=(sock, self.seen[i]), daemon=True).start()

    def _read(self, sock: socket.socket, seen: dict[int, float]) -> None:
        buf = b""
        while not self.stop.is_set():
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            now = time.perf_counter()
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.startswith(b"id: "):
                    seen[int(line[4:])] = now

    def close(self) -> None:
        self.stop.set()
        for sock in self.socks:
            sock.close()


def sse_latency(ledger: Ledger, port: int, clients: int, events: int, rate: float) -> dict:
    readers = Clients(port, clients)
    time.sleep(1)  # every client subscribed before the first append
    appended = {e.position: at for e, at in paced_appends(ledger, events, rate, "sse")}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(len(s.keys() & appended.keys()) < events for s in readers.seen):
        time.sleep(0.05)
    readers.close()
    lat = [(s[p] - t) * 1000 for s in readers.seen for p, t in appended.items() if p in s]
    return {"clients": clients, "events": events, "received": len(lat), "expected": clients * events,
            "p50_ms": round(statistics.median(lat), 1), "p99_ms": round(percentile(lat, 99), 1),
            "max_ms": round(max(lat), 1)}


def follow_latency(ledger: Ledger, events: int, rate: float) -> dict:
    """The same appends read by ``Ledger.follow()`` itself: the floor under the SSE figures."""
    seen: dict[int, float] = {}
    stop = threading.Event()
    head = ledger.follower_lag()["head_position"]

    def follow() -> None:
        for event in ledger.follow(head, stop=stop):
            seen[event.position] = time.perf_counter()

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    time.sleep(0.5)
    appended = {e.position: at for e, at in paced_appends(ledger, events, rate, "follow")}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(seen.keys() & appended.keys()) < events:
        time.sleep(0.05)
    stop.set()
    thread.join(10)
    lat = [(seen[p] - t) * 1000 for p, t in appended.items() if p in seen]
    return {"follow (no web)": True, "events": events, "received": len(lat),
            "p50_ms": round(statistics.median(lat), 1), "p99_ms": round(percentile(lat, 99), 1)}


def hold_clients(port: int, n: int, ready, stop) -> None:
    """In a child process: ``n`` clients reading the stream until ``stop`` is set."""
    readers = Clients(port, n)
    ready.set()
    stop.wait()
    readers.close()


def store_rate(ledger: Ledger, seconds: float) -> float:
    prefix, n = uuid.uuid4().hex[:6], 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        ledger.append([TaskState(task_id=f"st-{prefix}-{n}", status="SUCCESS")])
        n += 1
    return n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks to seed on an emptier log")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--store-seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ledger = Ledger.open(args.db, upgrade=True)
    task_id, root = seed(ledger, args.tasks)
    proc, base = start_server(args.db)
    port = int(base.rsplit(":", 1)[1])
    try:
        pages = time_pages(base, [
            "/", "/api/tasks", "/?state=FAILURE", f"/api/tasks?name={NAMES[0]}&limit=50",
            f"/tasks/{task_id}", f"/api/tasks/{task_id}", f"/workflows/{root}",
            f"/api/workflows/{root}", "/live", "/stats", "/api/stats",
        ], args.requests)
        sse = [follow_latency(ledger, args.events, args.rate)]
        sse += [sse_latency(ledger, port, n, args.events, args.rate) for n in (1, args.clients)]
        stores: dict[str, list[float]] = {"0 clients": [], f"{args.clients} clients": []}
        for _ in range(args.rounds):
            stores["0 clients"].append(round(store_rate(ledger, args.store_seconds)))
            # The readers run in another process: their threads must not share this one's GIL.
            ready, stop = multiprocessing.Event(), multiprocessing.Event()
            child = multiprocessing.Process(target=hold_clients, args=(port, args.clients, ready, stop))
            child.start()
            ready.wait(30)
            time.sleep(0.5)
            stores[f"{args.clients} clients"].append(round(store_rate(ledger, args.store_seconds)))
            stop.set()
            child.join(30)
        print(json.dumps({"db": ledger.url, "pages": pages, "sse": sse,
                          "stores_per_s": {k: {"runs": v, "median": statistics.median(v)}
                                           for k, v in stores.items()}}, indent=2))
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
