"""16 writer processes append (with duplicate event ids and a hot stream) while a
follower reads in follow order, (tx_id, position): it never skips or repeats an event.

The same proof as tests/test_concurrency.py (8 writers), at twice the concurrency.
"""

from __future__ import annotations

from tests.test_concurrency import append_while_following

WRITERS = 16
#: appends per writer (the 8-writer test does 500); keeps the suite's runtime modest
APPENDS = 250


def test_follower_never_skips_or_repeats_an_event_while_16_processes_append(pg_url):
    seen, stored = append_while_following(pg_url, writers=WRITERS, appends=APPENDS,
                                          with_duplicates=True)
    followed = [e.position for e in seen]
    skipped = len(stored - set(followed))
    repeated = len(followed) - len(set(followed))
    print(f"\nFAULTS writers={WRITERS} events={len(stored)} followed={len(followed)} "
          f"skipped={skipped} repeated={repeated}")
