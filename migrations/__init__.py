"""Alembic environment of celery-ledger (shipped in the wheel as ``ledger.migrations``)."""
