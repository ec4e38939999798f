"""One follower of the log, fanned out to every connected SSE client.

A single thread runs :meth:`Ledger.follow` (LISTEN/NOTIFY on PostgreSQL, polling
on SQLite) however many browsers are connected, so clients add no load on the
database. Each client has a bounded queue: the follower hands events to the
event loop without waiting (``call_soon_threadsafe``, once per chunk of events
that piled up meanwhile) and the loop puts each chunk in every queue without
waiting. A client too slow to drain its queue is cut
off with an ``overflow`` message instead of holding anyone up: writers never
wait for the follower, the follower never waits for the loop, and the loop
never waits for a client. A browser's ``EventSource`` reconnects by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from ledger.api import Ledger
from ledger.events import RecordedEvent

log = logging.getLogger("ledger.web")

#: Events a client may have waiting before it is cut off as too slow. Well above
#: the follower's batch (1000 events per read), which reaches the event loop as one
#: burst: a client that keeps up must never overflow on a burst. At ~300 bytes an
#: event, a stuck client holds at most ~1.2 MB.
CLIENT_QUEUE = 4096
#: Recent events kept for clients that ask for a backlog (the Live page).
BACKLOG = 200
#: The least time between two reads of the log by the shared follower
#: (:meth:`Ledger.follow`'s ``read_interval``). Under a stream of stores it makes
#: one read, one hand-over to the loop and one write per client out of every
#: commit in the interval, instead of one of each per commit: what each store
#: costs the machine then hardly depends on the number of clients. An event
#: waits at most this long, under the console's 100 ms budget for reaching a client.
READ_INTERVAL = 0.02


class Overflow:
    """Put in a slow client's queue in place of what it missed."""

    def __init__(self, dropped: int) -> None:
        self.dropped = dropped


class Subscription:
    """A client's bounded queue of rendered events from the shared follower.

    Events arrive in chunks (all the follower handed over since the loop last
    ran, joined once for every client); the bound counts events, not chunks.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.queue: asyncio.Queue[str | Overflow] = asyncio.Queue()
        self.waiting = 0  # events in the queue
        self.closed = False

    async def next_batch(self) -> list[str | Overflow]:
        """Wait for one chunk, then take whatever else is already waiting (one write for all)."""
        batch = [await self.queue.get()]
        while not self.queue.empty():
            batch.append(self.queue.get_nowait())
        self.waiting = 0
        return batch

    def offer(self, chunk: str, events: int = 1) -> None:
        if self.closed:
            return
        if self.waiting + events > self.size:
            # Drop what it had not read: the client ends its stream on Overflow.
            dropped = self.waiting + events
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(Overflow(dropped))
            self.closed = True
            return
        self.waiting += events
        self.queue.put_nowait(chunk)


class EventFeed:
    """The shared follower; ``subscribe()`` gives each client its own bounded stream.

    ``render`` turns an event into the text sent to clients, once per event
    (in the follower's thread), however many clients there are.
    """

    def __init__(
        self,
        ledger: Ledger,
        render: Callable[[RecordedEvent], str],
        *,
        client_queue: int = CLIENT_QUEUE,
        poll_interval: float = 0.1,
        read_interval: float = READ_INTERVAL,
    ) -> None:
        self.ledger = ledger
        self.render = render
        self.client_queue = client_queue
        self.poll_interval = poll_interval
        self.read_interval = read_interval
        self.backlog: deque[str] = deque(maxlen=BACKLOG)
        self._subscribers: set[Subscription] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Rendered events handed over by the follower, not yet published by the
        # loop. The loop is woken once per chunk, not per event: at thousands of
        # events a second and 50 clients, a wake-up and 50 queue puts per event
        # took the CPU the writers needed (bench.web's store rates).
        self._pending: list[str] = []
        self._pending_lock = threading.Lock()

    @property
    def clients(self) -> int:
        return len(self._subscribers)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # Start a little before the head so the Live page opens with recent events.
        head = self.ledger.follower_lag()["head_position"]
        start = max(0, head - BACKLOG)
        self._thread = threading.Thread(
            target=self._run, args=(start,), name="ledger-web-feed", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self, start: int) -> None:
        after: int = start
        while not self._stop.is_set():
            try:
                for event in self.ledger.follow(
                    after, stop=self._stop, poll_interval=self.poll_interval,
                    read_interval=self.read_interval,
                ):
                    after = event.position
                    self._hand_over(self.render(event))
            except Exception:  # the database went away: keep the server up, try again
                log.exception("following the ledger failed; retrying in 1 s")
                time.sleep(1)

    def _hand_over(self, item: str) -> None:
        """From the follower's thread: queue ``item`` for the loop, waking it once per chunk."""
        with self._pending_lock:
            self._pending.append(item)
            wake = len(self._pending) == 1
        if wake:  # otherwise a publish is already scheduled and takes this one too
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._publish)

    def _publish(self) -> None:
        with self._pending_lock:
            items, self._pending = self._pending, []
        self.backlog.extend(items)
        chunk = "".join(items)
        for sub in list(self._subscribers):
            sub.offer(chunk, len(items))

    @contextlib.contextmanager
    def subscribe(self, backlog: int = 0) -> Iterator[Subscription]:
        """A client's queue of events from now on (after the last ``backlog`` recent ones)."""
        sub = Subscription(self.client_queue)
        for item in list(self.backlog)[-backlog:] if backlog > 0 else []:
            sub.offer(item)
        self._subscribers.add(sub)
        try:
            yield sub
        finally:
            self._subscribers.discard(sub)
