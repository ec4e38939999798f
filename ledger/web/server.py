"""``celery-ledger web``: the console under uvicorn, safe by default.

Refuses a non-loopback address without ``--auth`` before opening anything, and
opens the database read-only for good measure: the server's connections are
read-only sessions (PostgreSQL ``default_transaction_read_only``, SQLite
``query_only``), so even a bug in a page could not write to the ledger.
"""

from __future__ import annotations

from ledger import migrate
from ledger.api import Ledger
from ledger.settings import WEB_HOST, WEB_PORT
from ledger.web.security import Credentials, check_bind


def read_only(ledger: Ledger) -> None:
    """Make every connection the ledger's engine opens from now on a read-only session."""
    ledger.store.read_only_sessions()


def serve(ledger: Ledger, host: str = WEB_HOST, port: int = WEB_PORT, auth: str | None = None) -> None:
    """Run the console until interrupted; raises before listening when unsafe or unusable."""
    import uvicorn

    from ledger.web.app import create_app

    credentials = Credentials.parse(auth) if auth else None
    check_bind(host, credentials)
    read_only(ledger)
    # Fail now, with one line, if the database is unreachable or its schema missing or
    # older than this code's: every page would be a 500. A revision this code does not
    # know (a newer celery-ledger's) was warned about by the CLI and is read as it is.
    if migrate.unknown_revision(ledger.engine) is None:
        ledger.require_schema()
    shown = f"[{host}]" if ":" in host else host
    print(f"celery-ledger web: http://{shown}:{port}/ on {ledger.url}"
          + (" (credentials required)" if credentials else ""), flush=True)
    uvicorn.run(create_app(ledger, credentials=credentials, host=host), host=host, port=port,
                # SSE streams never end by themselves: don't wait on them at shutdown.
                log_level="warning", access_log=False, timeout_graceful_shutdown=2)
