"""Redaction: task arguments that must never reach the log.

Configured with two Celery settings read by the backend::

    ledger_redact_kwargs = ["password", "token"]   # keyword names
    ledger_redact_args = [1]                       # positional indexes

Matching values are replaced by :data:`REDACTED` before the arguments are
encoded, so the secret is never in any stored byte (``result_extended`` is the
only path by which arguments are stored). Only top-level keyword names and
positions are matched; nested structures are stored as given.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

REDACTED = "[redacted]"


def redact_args(args: Sequence[Any] | None, indexes: Collection[int]) -> Any:
    """``args`` with the values at ``indexes`` (negative counts from the end) replaced."""
    if not args or not indexes:
        return args
    n = len(args)
    hidden = {i % n for i in indexes if -n <= i < n}
    return [REDACTED if i in hidden else value for i, value in enumerate(args)]


def redact_kwargs(kwargs: Mapping[str, Any] | None, names: Collection[str]) -> Any:
    """``kwargs`` with the values of the keys in ``names`` replaced."""
    if not kwargs or not names:
        return kwargs
    return {key: REDACTED if key in names else value for key, value in kwargs.items()}
