"""The ``dptab`` command line: a roof over the ``pipeline`` library and the ``flows`` package.

The library (``pipeline/``) never imports this package or ``flows/``; the command line may start
the Prefect flow (``dptab run --flow``) and the review (``dptab review``).
"""

from pipeline.runtime import apply_allocator_defaults

apply_allocator_defaults()  # before numpy / pyarrow are imported (pipeline.runtime says why)
