"""Redaction: task arguments that must never reach the log.

Configured with two Celery settings read by the backend::

    ledger_redact_kwargs = ["password", "card"]   # parameter and key names
    ledger_redact_args = [1]                      # positional indexes

With ``result_extended`` (the only path by which arguments are stored), each of
these is replaced by :data:`REDACTED` before the arguments are encoded, so the
secret is in no stored byte:

* a keyword argument whose name is listed;
* a positional argument whose *parameter* is listed, found from the task's
  signature (``charge(42, "4111...")`` with ``def charge(amount, card)``), when
  the task is registered in the storing process (the worker's always is); every
  extra positional of a listed ``*args`` parameter;
* a positional argument at a listed index (negative counts from the end);
* at any depth, inside dicts, lists and tuples of the arguments, the value of
  a dict key that is listed (``{"payment": {"card": ...}}``).

Not covered (the secret is stored as given): names matched other than exactly
(case, prefixes); a secret inside a string, a custom object, or an unnamed
position of a task not registered where the state is stored; the task's
result, exception message and traceback (``raise ValueError(card)`` stores it);
and what Celery itself keeps outside the ledger (the broker's message, worker logs).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

REDACTED = "[redacted]"


def signature_of(task: Callable[..., Any] | None) -> inspect.Signature | None:
    """The signature arguments bind to (a bound task's ``self`` is already excluded)."""
    if task is None:
        return None
    try:
        return inspect.signature(task)
    except (TypeError, ValueError):  # builtins and C callables may have none
        return None


def redact(
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    *,
    names: Collection[str],
    indexes: Collection[int] = (),
    signature: inspect.Signature | None = None,
) -> tuple[list[Any] | None, dict[str, Any] | None]:
    """``args`` and ``kwargs`` with every value the settings name replaced (module docstring)."""
    hidden = set(_positions_named(args or (), names, signature))
    n = len(args or ())
    hidden |= {i % n for i in indexes if -n <= i < n}
    new_args = None if args is None else [
        REDACTED if i in hidden else _nested(value, names) for i, value in enumerate(args)
    ]
    new_kwargs = None if kwargs is None else {
        key: REDACTED if key in names else _nested(value, names) for key, value in kwargs.items()
    }
    return new_args, new_kwargs


def _positions_named(
    args: Sequence[Any], names: Collection[str], signature: inspect.Signature | None
) -> list[int]:
    if signature is None or not names:
        return []
    positional: list[str] = []
    star: str | None = None
    for p in signature.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional.append(p.name)
        elif p.kind is p.VAR_POSITIONAL:
            star = p.name
    named = [positional[i] if i < len(positional) else star for i in range(len(args))]
    return [i for i, name in enumerate(named) if name in names]


def _nested(value: Any, names: Collection[str]) -> Any:
    if not names:
        return value
    if isinstance(value, Mapping):
        return {k: REDACTED if k in names else _nested(v, names) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nested(v, names) for v in value]
    return value
