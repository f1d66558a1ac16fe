"""Prefect orchestration of the ``pipeline`` stages (tasks wrap pipeline functions)."""

from pipeline.runtime import apply_allocator_defaults

apply_allocator_defaults()  # before numpy / pyarrow are imported (pipeline.runtime says why)
