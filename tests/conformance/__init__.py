"""Celery's own integration suite run against the ledger backend (``make conformance``).

Not part of the project's pytest run: nothing here is named ``test_*``.
"""
