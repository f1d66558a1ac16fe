"""``make demo``: run the Prefect flow (ephemeral API) on the committed sample.

Prints where the release, its ``index.html`` and the internal review report are.
``PREFECT_HOME`` is set to ``.prefect/`` in the repository before Prefect is imported, so the
demo never touches a user's own Prefect database.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    config = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "configs" / "demo.yaml"
    # Prefect's own chatter stays at WARNING; the flow's stage lines (checking inputs, each
    # level with its parents and seconds, publishing) are shown, so the demo is never silent
    import logging

    from flows.tabulate import tabulate  # after PREFECT_HOME is set

    logging.getLogger("prefect.flow_runs").setLevel(logging.INFO)
    print(f"dptab demo: running the Prefect flow dp-tabulate on {config} (about a minute)", flush=True)

    t0 = time.perf_counter()
    result = tabulate(config_path=str(config))
    from fractions import Fraction

    from pipeline.release.verify import verify_release
    from pipeline.review import review_run_dir

    report = review_run_dir(Path(result["run_dir"]))
    release = Path(result["release"])
    failures = verify_release(release)
    print()
    print(f"dptab demo finished in {time.perf_counter() - t0:.0f} s")
    print(f"  release:      {release}")
    print(f"  index page:   {release / 'index.html'}")
    print(f"  review report (internal): {report}")
    print(f"  run directory (confidential): {result['run_dir']}")
    print(f"  privacy: rho = {float(Fraction(result['rho'])):.4f}, "
          f"epsilon = {float(Fraction(result['epsilon'])):.2f} at delta = 1e-10")
    print(f"  dptab verify: {'every checksum and consistency check passes' if not failures else failures}")
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
