"""Integrity of the stream with a real Kafka-wire broker (Tansu): nothing the relay
has not sent is pruned, and a corrupt event never stops or poisons the stream.
"""

from __future__ import annotations

from datetime import datetime, timezone

from ledger.api import Ledger
from ledger.events import TaskState
from ledger.rebuild import prune
from ledger.relay import Relay
from ledger.stream import decode_event
from tests.kafka import kafka, read_all, topic  # noqa: F401

FAR_FUTURE = datetime(2099, 1, 1, tzinfo=timezone.utc)


def store_tasks(ledger: Ledger, prefix: str, n: int) -> None:
    for i in range(n):
        ledger.append([TaskState(task_id=f"{prefix}-{i}", status="STARTED")])
        ledger.append([TaskState(task_id=f"{prefix}-{i}", status="SUCCESS")])


def test_prune_never_deletes_what_the_relay_has_not_sent(any_url, kafka, topic):  # noqa: F811
    ledger = Ledger.open(any_url)
    store_tasks(ledger, "sent", 10)
    assert Relay(ledger, kafka, topic).run(once=True) == 20
    store_tasks(ledger, "unsent", 10)
    written = {e.event_id for t in range(10) for p in ("sent", "unsent")
               for e in ledger.history(f"{p}-{t}")}

    dry = prune(ledger, FAR_FUTURE, dry_run=True)
    assert dry.dry_run and dry.events_deleted == 10  # the STARTED events already sent
    assert dry.held_by == f"relay:{topic}" and dry.kept_for_followers == 20
    assert {e.event_id for t in range(10) for p in ("sent", "unsent")
            for e in ledger.history(f"{p}-{t}")} == written  # a dry run deletes nothing

    report = prune(ledger, FAR_FUTURE)
    assert report.events_deleted == 10 and report.held_by == f"relay:{topic}"
    assert "stopped short" in "\n".join(report.summary())
    assert Relay(ledger, kafka, topic).run(once=True) == 21  # and the ledger.pruned event
    on_topic = {decode_event(r.value).event_id for r in read_all(kafka, topic, expect=41)}
    assert written <= on_topic and len(on_topic) == 41

    # Once the relay has read everything, the same prune goes all the way.
    report = prune(ledger, FAR_FUTURE)
    assert report.held_by is None and report.events_deleted == 10
