"""celery-ledger: an event-sourced result store for Celery.

Kept light on purpose: ``import ledger.events`` must not pull in SQLAlchemy.
The facade is imported lazily: ``from ledger import Ledger``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ledger.api import Ledger

__all__ = ["Ledger", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Ledger":
        from ledger.api import Ledger

        return Ledger
    raise AttributeError(f"module 'ledger' has no attribute {name!r}")
