"""``relay`` and ``tail``: the ledger as a stream (ledger/relay.py and ledger/stream.py do the work)."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import uuid

import click

from ledger.cli.context import Env, Failure, db_option, echo, format_option, pass_env
from ledger.cli.params import Seconds
from ledger.events import TASK, stream_id
from ledger.relay import MAX_BACKOFF, MAX_BATCH, check_bootstrap, check_topic


def _stop_on_sigterm(*, interrupt: bool = False) -> threading.Event:
    """An event set by SIGTERM (and, with ``interrupt``, by the first Ctrl-C: a second
    one interrupts at once)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if interrupt:
        def first_interrupt(*_) -> None:
            stop.set()
            signal.signal(signal.SIGINT, signal.default_int_handler)

        signal.signal(signal.SIGINT, first_interrupt)
    return stop


class _Checked(click.ParamType):
    """A value ``check`` accepts, else a usage error with its message."""

    def __init__(self, name: str, check) -> None:
        self.name, self.check = name, check

    def convert(self, value, param, ctx):
        try:
            return self.check(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@click.command()
@click.option("--bootstrap", required=True, metavar="HOST:PORT", type=_Checked("HOST:PORT", check_bootstrap),
              help="Kafka bootstrap servers (comma-separated)")
@click.option("--topic", required=True, type=_Checked("TOPIC", check_topic), help="event topic (one record per event)")
@click.option("--state-topic", metavar="TOPIC", type=_Checked("TOPIC", check_topic),
              help="also keep each task's latest meta here (null value when forgotten); not the event topic")
@click.option("--once", is_flag=True, help="relay what is there, then exit")
@click.option("--batch", type=click.IntRange(min=1, max=MAX_BATCH), default=5000, show_default=True,
              help="events per flush")
@click.option("--max-backoff", type=Seconds(max=MAX_BACKOFF), default=10.0, show_default=True, metavar="SECONDS",
              help="longest wait between retries while Kafka is down")
@click.option("-v", "--verbose", is_flag=True, help="log every batch")
@db_option
@pass_env
def relay(env: Env, bootstrap: str, topic: str, state_topic: str | None, once: bool, batch: int,
          max_backoff: float, verbose: bool) -> None:
    """Relay the log to a Kafka topic (at-least-once, in order).

    SIGTERM or Ctrl-C stops it after the batch in flight is acknowledged and its
    checkpoint saved (a second Ctrl-C stops it at once).
    """
    if state_topic == topic:
        raise click.BadParameter(f"must not be the event topic ({topic!r})", param_hint="'--state-topic'")
    try:
        import kafka  # noqa: F401
    except ImportError:
        raise Failure('relay needs kafka-python: pip install "celery-ledger[kafka]"') from None
    from ledger.relay import Relay

    # --once is for scripts: its output is the result line or one error line
    # (-v shows everything). kafka-python logs every refused connection; the
    # relay's own warnings already say when Kafka fails.
    quiet = logging.ERROR if once else logging.INFO
    logging.basicConfig(
        level=logging.DEBUG if verbose else quiet,
        format="%(asctime)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
        # the schema check's Alembic context: nine INFO lines of its plugins otherwise
        logging.getLogger("alembic").setLevel(logging.WARNING)
    relayer = Relay(
        env.ledger(), bootstrap, topic, state_topic=state_topic, batch_size=batch,
        max_backoff=max_backoff,
    )
    stop = _stop_on_sigterm(interrupt=True)
    try:
        relayed = relayer.run(once=once, stop=stop)
    except KeyboardInterrupt:
        relayed = relayer.relayed
    # Skipped events are not on the topic: say so even where warnings are not shown (--once).
    skipped = (f" ({relayer.skipped} skipped, not sent: corrupt or too large for Kafka;"
               " the warnings name them, -v shows them with --once)") if relayer.skipped else ""
    echo(f"relayed {relayed} events to {topic}{skipped}; checkpoint {tuple(relayer.checkpoint)}")


@click.command()
@click.option("-f", "--follow", is_flag=True, help="keep printing new events")
@click.option("--task", metavar="ID", help="only this task's events (its history first)")
@click.option("-n", "--lines", type=click.IntRange(min=0), default=20, show_default=True,
              help="start this many events back")
@format_option("text", "json")
@db_option
@pass_env
def tail(env: Env, follow: bool, task: str | None, lines: int, fmt: str) -> None:
    """Print ledger events as they happen."""
    from ledger.audit import event_json, event_line

    def line(event) -> str:
        return json.dumps(event_json(event), default=str) if fmt == "json" else event_line(event)

    ledger = env.ledger()
    wanted = stream_id(TASK, task) if task else None
    printed: set[uuid.UUID] = set()
    if wanted is not None:
        # The task's whole story first, then whatever follows it.
        history = ledger.read_stream(wanted)
        start = history[0].position - 1 if history else ledger.follower_lag()["head_position"]
        for event in history:
            printed.add(event.event_id)
            echo(line(event))
    else:
        start = max(0, ledger.follower_lag()["head_position"] - lines)
    stop = _stop_on_sigterm()
    for event in ledger.follow(start, stop=stop, idle_timeout=None if follow else 0):
        if wanted is not None and (event.stream_id != wanted or event.event_id in printed):
            continue
        echo(line(event))
