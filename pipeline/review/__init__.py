"""Internal statisticians' review: accuracy against the truth, experiments, an HTML report.

Confidentiality rule (ARCHITECTURE §1, issue 6). Every number and figure this package derives
from the true histograms is confidential. It is written only under ``RUN_DIR/review/`` (mode
0700 directory, 0600 files), and never into a release folder, a Prefect artifact, a log line,
a flow or task result, or the CLI's output — the public entry points return *paths* only.
The one exception is a run whose config says ``confidential: false`` (synthetic or public
input): its review may be copied elsewhere with :func:`export_review`, which refuses for a
confidential run.
"""

from __future__ import annotations

from pipeline.review.runner import (
                                    ConfidentialityError,
                                    ReviewError,
                                    compute_review,
                                    export_review,
                                    is_confidential,
                                    review_run_dir,
)

__all__ = ["ConfidentialityError", "ReviewError", "compute_review", "export_review", "is_confidential",
           "review_run_dir"]
