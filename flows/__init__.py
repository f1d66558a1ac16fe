"""Prefect orchestration of the ``pipeline`` stages (tasks wrap pipeline functions)."""
