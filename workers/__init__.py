"""Celery workers: ``registry worker`` (or ``celery -A workers.app worker``)."""
