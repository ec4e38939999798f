"""The state topic: each task's latest meta per key, a null-value tombstone once it is gone."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from ledger.api import Ledger
from ledger.events import ResultExpired, TaskForgotten, TaskState
from ledger.relay import Relay
from ledger.stream import decode_state
from tests.kafka import create_topic, kafka, read_all, topic  # noqa: F401

pytestmark = pytest.mark.kafka


def latest_per_key(records: list) -> dict[bytes, object]:
    latest: dict[bytes, object] = {}
    for r in records:  # one partition per key, offsets ascending
        latest[r.key] = r
    return latest


def test_forgotten_task_produces_a_tombstone_on_the_state_topic(any_url, kafka, topic):  # noqa: F811
    ledger = Ledger.open(any_url)
    state_topic = create_topic(kafka)
    ledger.append([TaskState(task_id=t, status="STARTED") for t in ("kept", "forgot", "expired")])
    ledger.append([TaskState(task_id=t, status="SUCCESS") for t in ("kept", "forgot", "expired")])
    Relay(ledger, kafka, topic, state_topic=state_topic).run(once=True)
    ledger.append([
        TaskForgotten(task_id="forgot"),
        ResultExpired(task_id="expired", expired_before=datetime.now(timezone.utc)),
    ])
    Relay(ledger, kafka, topic, state_topic=state_topic).run(once=True)

    latest = latest_per_key(read_all(kafka, state_topic))
    assert latest[b"forgot"].value is None
    assert latest[b"expired"].value is None
    assert decode_state(latest[b"kept"].value) == ledger.task_meta("kept")


def test_state_topic_keeps_success_sticky_like_the_projection(any_url, kafka, topic):  # noqa: F811
    ledger = Ledger.open(any_url)
    state_topic = create_topic(kafka)
    ledger.append([TaskState(task_id="t", status="SUCCESS")])
    ledger.append([TaskState(task_id="t", status="FAILURE")])  # recorded, not effective
    ledger.append([TaskState(task_id="u", status="RETRY")])
    Relay(ledger, kafka, topic, state_topic=state_topic).run(once=True)

    latest = latest_per_key(read_all(kafka, state_topic))
    assert decode_state(latest[b"t"].value) == ledger.task_meta("t")
    assert decode_state(latest[b"t"].value).status == "SUCCESS"
    assert decode_state(latest[b"u"].value) == ledger.task_meta("u")
