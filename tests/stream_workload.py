"""Event mixes for the stream tests: tasks with retries and failures, forgets, groups, chords."""

from __future__ import annotations

import random
from datetime import datetime, timezone

from ledger.api import Ledger
from ledger.events import (
    ChordPartReturned,
    ChordStarted,
    Encoded,
    EventData,
    GroupSaved,
    ResultExpired,
    TaskForgotten,
    TaskState,
)


def task_lives(prefix: str, n_tasks: int, seed: int = 5) -> list[EventData]:
    """About 2.5 events per task: STARTED, sometimes RETRY, then SUCCESS or FAILURE;
    every 10th task forgotten, every 25th expired, then (sometimes) stored again."""
    rnd = random.Random(seed)
    out: list[EventData] = []
    for i in range(n_tasks):
        tid = f"{prefix}-{i}"
        out.append(TaskState(task_id=tid, status="STARTED", worker="w1"))
        if rnd.random() < 0.2:
            out.append(TaskState(task_id=tid, status="RETRY", retries=1))
        final = "SUCCESS" if rnd.random() < 0.8 else "FAILURE"
        out.append(TaskState(
            task_id=tid, status=final,
            result=Encoded(content_type="application/json", data=str(i).encode()),
        ))
        if i % 10 == 0:
            out.append(TaskForgotten(task_id=tid))
        if i % 25 == 0:
            out.append(ResultExpired(task_id=tid, expired_before=datetime.now(timezone.utc)))
            if rnd.random() < 0.5:
                out.append(TaskState(task_id=tid, status="PENDING"))
    return out


def groups_and_chords(prefix: str, n: int = 3, size: int = 4) -> list[EventData]:
    out: list[EventData] = []
    for g in range(n):
        members = [f"{prefix}-g{g}-{k}" for k in range(size)]
        out.append(GroupSaved(group_id=f"{prefix}-g{g}", result=[[m, None] for m in members]))
        out.append(ChordStarted(chord_id=f"{prefix}-c{g}", size=size))
        for m in members:
            out.append(TaskState(task_id=m, status="SUCCESS"))
            out.append(ChordPartReturned(chord_id=f"{prefix}-c{g}", task_id=m, status="SUCCESS"))
    return out


def append_in_batches(ledger: Ledger, events: list[EventData], batch: int = 200) -> None:
    for i in range(0, len(events), batch):
        ledger.append(events[i : i + batch])
