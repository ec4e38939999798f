"""Store, get_task_meta, group save/restore and forget, driven through Celery's backend API.

The calls are the ones a worker and a client make: a prefork child stores
STARTED (``store_result(..., request=...)``, as ``task_track_started`` does)
then SUCCESS (``mark_as_done(..., request=...)``); a client reads
``get_task_meta``, saves and restores a ``GroupResult`` and ``forget``\\ s.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence

from celery import Celery
from celery.app.task import Context
from celery.result import AsyncResult, GroupResult

from bench.processes import Job, Slice

HOSTNAME = f"bench@{socket.gethostname()}"
GROUP_SIZE = 10


def request_for(task_id: str, i: int, **extra) -> Context:
    """The request a worker child holds while running task ``task_id``."""
    return Context(
        id=task_id,
        task="bench.part",
        args=[i],
        kwargs={},
        hostname=HOSTNAME,
        delivery_info={"exchange": "", "routing_key": "celery", "priority": 0, "redelivered": False},
        retries=0,
        root_id=task_id,
        parent_id=None,
        group=None,
        chord=None,
        ignore_result=False,
        **extra,
    )


def task_ids(prefix: str, slices: Sequence[Slice]) -> list[str]:
    """The ids a store run wrote (children name them ``<prefix>-<child>-<n>``)."""
    return [f"{prefix}-{c}-{n}" for c, s in enumerate(slices) for n in range(s.ops)]


def store(app: Celery, prefix: str) -> Job:
    """Each child stores STARTED then SUCCESS for new tasks until the deadline."""
    backend = app.backend

    def job(child: int, deadline: float) -> Slice:
        s = Slice(started=time.monotonic())
        started_meta = {"pid": os.getpid(), "hostname": HOSTNAME}
        n = 0
        while (t0 := time.monotonic()) < deadline:
            task_id = f"{prefix}-{child}-{n}"
            req = request_for(task_id, n)
            backend.store_result(task_id, started_meta, "STARTED", request=req)
            backend.mark_as_done(task_id, {"n": n, "ok": True}, request=req)
            s.latencies.append(time.monotonic() - t0)
            n += 1
        s.ended, s.ops = time.monotonic(), n
        return s

    return job


def get_task_meta(app: Celery, ids: Sequence[str]) -> Job:
    """One child reads finished tasks' meta (cycling through ``ids``); each must be SUCCESS."""
    backend = app.backend

    def job(child: int, deadline: float) -> Slice:
        s = Slice(started=time.monotonic(), extra=0)
        n = 0
        while (t0 := time.monotonic()) < deadline:
            meta = backend.get_task_meta(ids[n % len(ids)])
            s.latencies.append(time.monotonic() - t0)
            if meta["status"] != "SUCCESS" or meta["result"] != {"n": int(ids[n % len(ids)].rsplit("-", 1)[1]), "ok": True}:
                s.extra += 1
            n += 1
        s.ended, s.ops = time.monotonic(), n
        return s

    return job


def group_save_restore(app: Celery, prefix: str, members: Sequence[str]) -> Job:
    """Save a GroupResult of ``GROUP_SIZE`` tasks and restore it; each must come back whole."""
    backend = app.backend

    def job(child: int, deadline: float) -> Slice:
        s = Slice(started=time.monotonic(), extra=0)
        results = [AsyncResult(m, app=app, backend=backend) for m in members[:GROUP_SIZE]]
        n = 0
        while (t0 := time.monotonic()) < deadline:
            group_id = f"{prefix}-{child}-{n}"
            GroupResult(group_id, results, app=app, backend=backend).save(backend=backend)
            restored = GroupResult.restore(group_id, backend=backend, app=app)
            s.latencies.append(time.monotonic() - t0)
            if restored is None or [r.id for r in restored.results] != list(members[:GROUP_SIZE]):
                s.extra += 1
            n += 1
        s.ended, s.ops = time.monotonic(), n
        return s

    return job


def forget(app: Celery, ids: Sequence[str]) -> Job:
    """One child forgets finished tasks until the deadline or until none is left."""
    backend = app.backend

    def job(child: int, deadline: float) -> Slice:
        s = Slice(started=time.monotonic(), extra=0)
        n = 0
        while n < len(ids) and (t0 := time.monotonic()) < deadline:
            backend.forget(ids[n])
            s.latencies.append(time.monotonic() - t0)
            n += 1
        s.ended, s.ops = time.monotonic(), n
        # A forgotten task reads as PENDING again.
        if n and backend.get_task_meta(ids[n - 1])["status"] != "PENDING":
            s.extra += 1
        return s

    return job
