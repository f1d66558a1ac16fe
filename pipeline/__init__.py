"""dptab: differentially private, hierarchically consistent count tables.

The library is importable and runnable without Prefect; orchestration lives in ``flows/``.
"""

__version__ = "0.1.0"
