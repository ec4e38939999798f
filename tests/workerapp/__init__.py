"""A Celery app for the real-worker tests: ``celery -A tests.workerapp.tasks worker``."""
