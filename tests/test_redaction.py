"""Redaction by parameter name (issue 14, item 4): positional or keyword, and nested dict keys.

The rules one by one on :func:`ledger.redaction.redact`, then the proof with a
real prefork worker: the secrets are in no byte of the SQLite file and its WAL,
of a pg_dump, of an export (JSON lines and CSV), or of either Kafka topic.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from ledger.redaction import REDACTED, redact
from ledger.relay import Relay
from tests.conftest import PG_SERVER
from tests.kafka import create_topic, kafka, read_all  # noqa: F401
from tests.test_celery_worker import WAIT, db_url, task, worker  # noqa: F401

R = REDACTED


def charge(amount, card, details=None, *extra, **options):
    """The signature the rules below bind to."""


def login(self_, user, *secrets):
    """A ``*args`` parameter named in the settings: every extra positional is hidden."""


SIG = inspect.signature(charge)
NAMES = {"card", "secrets"}


@pytest.mark.parametrize(("args", "kwargs", "signature", "expected"), [
    # by keyword
    ([42], {"card": "4111"}, SIG, ([42], {"card": R})),
    # by position, through the task's signature
    ([42, "4111"], {}, SIG, ([42, R], {})),
    # an extra positional of a named *args parameter
    (["me", "bob", "pw1", "pw2"], {}, inspect.signature(login), (["me", "bob", R, R], {})),
    # nested dict keys, in a positional and in a keyword argument, through lists
    ([42, R, {"billing": {"card": "4111", "zip": "75001"}}], {"options": [{"card": "4111"}]}, SIG,
     ([42, R, {"billing": {"card": R, "zip": "75001"}}], {"options": [{"card": R}]})),
    # an extra keyword (**options) with a listed name
    ([1], {"secrets": "x", "note": "kept"}, SIG, ([1], {"secrets": R, "note": "kept"})),
    # no signature (the task is not registered where the state is stored): keywords only
    ([42, "4111"], {"card": "4111"}, None, ([42, "4111"], {"card": R})),
])
def test_redaction_rules(args, kwargs, signature, expected):
    assert redact(args, kwargs, names=NAMES, signature=signature) == expected


def test_positional_indexes_still_apply_without_names():
    assert redact(["u", "pw", 3], None, names=(), indexes={1, -1}) == (["u", R, R], None)


# -- the proof, with a real worker -------------------------------------------------------------

SECRETS = {
    "positional": "4111-0000-positional",
    "keyword": "4111-0000-keyword",
    "nested in a positional": "4111-0000-nested-arg",
    "nested in a keyword": "4111-0000-nested-kwarg",
}
CLI = str(Path(sys.executable).parent / "celery-ledger")


def _stored_bytes(db_url: str) -> bytes:  # noqa: F811
    """Every byte the database holds: the SQLite file and its WAL, or a pg_dump."""
    if db_url.startswith("sqlite:///"):
        path = Path(db_url[len("sqlite:///"):])
        return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    name = db_url.rsplit("/", 1)[1]
    libpq = PG_SERVER.replace("postgresql+psycopg://", "postgresql://")
    return subprocess.run(["pg_dump", "--data-only", f"{libpq}/{name}"], capture_output=True,
                          check=True, timeout=120).stdout


def test_a_named_secret_is_in_no_stored_exported_or_relayed_byte(worker, db_url, kafka):  # noqa: F811
    charge_task = task(worker, "charge")
    calls = [
        charge_task.delay("amount-marker", SECRETS["positional"]),
        charge_task.delay(2, card=SECRETS["keyword"]),
        charge_task.delay(3, "x", {"billing": {"card": SECRETS["nested in a positional"]}}),
        charge_task.delay(4, "x", details={"payment": {"card": SECRETS["nested in a keyword"]}}),
    ]
    assert [r.get(timeout=WAIT) for r in calls] == ["charged amount-marker", "charged 2",
                                                     "charged 3", "charged 4"]
    meta = worker.backend.get_task_meta(calls[0].id)
    assert (meta["args"], meta["kwargs"]) == (["amount-marker", R], {})
    meta = worker.backend.get_task_meta(calls[3].id)
    assert meta["kwargs"] == {"details": {"payment": {"card": R}}}

    ledger = worker.backend.ledger
    topics = create_topic(kafka), create_topic(kafka)
    relayed = Relay(ledger, kafka, topics[0], state_topic=topics[1]).run(once=True)
    places = {"database": _stored_bytes(db_url)}
    for fmt in ("jsonl", "csv"):
        run = subprocess.run([CLI, "export", "--format", fmt, "--db", db_url], capture_output=True,
                             check=True, timeout=120)
        places[f"export {fmt}"] = run.stdout
    for name, records in (("event topic", read_all(kafka, topics[0], expect=relayed)),
                          ("state topic", read_all(kafka, topics[1]))):
        places[name] = b"".join((r.key or b"") + (r.value or b"") for r in records)
    for place, data in places.items():
        # The marker stored beside the secret is found: the search would see the secret.
        assert holds(data, "amount-marker"), place
        for how, secret in SECRETS.items():
            assert not holds(data, secret), f"{how} secret found in {place}"


def holds(data: bytes, text: str) -> bool:
    """``text`` in ``data`` as bytes, or hex-encoded as pg_dump writes bytea columns."""
    return text.encode() in data or text.encode().hex().encode() in data
