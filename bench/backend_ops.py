"""Store, get_task_meta, group save/restore and forget, driven through Celery's backend API.

The calls are the ones a worker and a client make: a prefork child stores
STARTED (``store_result(..., request=...)``, as ``task_track_started`` does)
then SUCCESS (``mark_as_done(..., request=...)``); a client reads
``get_task_meta``, saves and restores a ``GroupResult`` and ``forget``\\ s.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

from celery import Celery
from celery.app.task import Context
from celery.result import AsyncResult, GroupResult

from bench.processes import Job, Slice, timed_ops

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
        started_meta = {"pid": os.getpid(), "hostname": HOSTNAME}

        def op(n: int) -> None:
            task_id = f"{prefix}-{child}-{n}"
            req = request_for(task_id, n)
            backend.store_result(task_id, started_meta, "STARTED", request=req)
            backend.mark_as_done(task_id, {"n": n, "ok": True}, request=req)

        return timed_ops(deadline, op)

    return job


def get_task_meta(app: Celery, ids: Sequence[str]) -> Job:
    """One child reads finished tasks' meta (cycling through ``ids``); each must be SUCCESS."""
    backend = app.backend

    def wrong(n: int, meta: dict) -> bool:
        task_id = ids[n % len(ids)]
        return meta["status"] != "SUCCESS" or meta["result"] != {"n": int(task_id.rsplit("-", 1)[1]), "ok": True}

    def job(child: int, deadline: float) -> Slice:
        return timed_ops(deadline, lambda n: backend.get_task_meta(ids[n % len(ids)]), wrong)

    return job


def group_save_restore(app: Celery, prefix: str, members: Sequence[str]) -> Job:
    """Save a GroupResult of ``GROUP_SIZE`` tasks and restore it; each must come back whole."""
    backend = app.backend

    def job(child: int, deadline: float) -> Slice:
        results = [AsyncResult(m, app=app, backend=backend) for m in members[:GROUP_SIZE]]

        def op(n: int) -> GroupResult | None:
            group_id = f"{prefix}-{child}-{n}"
            GroupResult(group_id, results, app=app, backend=backend).save(backend=backend)
            return GroupResult.restore(group_id, backend=backend, app=app)

        def wrong(n: int, restored: GroupResult | None) -> bool:
            return restored is None or [r.id for r in restored.results] != list(members[:GROUP_SIZE])

        return timed_ops(deadline, op, wrong)

    return job


def forget(app: Celery, ids: Sequence[str]) -> Job:
    """One child forgets finished tasks until the deadline or until none is left."""
    backend = app.backend

    def job(child: int, deadline: float) -> Slice:
        s = timed_ops(deadline, lambda n: backend.forget(ids[n]), limit=len(ids))
        # A forgotten task reads as PENDING again.
        s.extra = int(bool(s.ops) and backend.get_task_meta(ids[s.ops - 1])["status"] != "PENDING")
        return s

    return job
