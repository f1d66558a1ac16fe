"""Serve the ``tabulate`` flow on a cron schedule without a work pool.

    python -m flows.serve --config config.yaml --cron "0 2 * * *" --timezone America/New_York

Stopping this process pauses the schedule (Prefect behaviour). For a work-pool deployment use
``prefect deploy --all`` with ``prefect.yaml``.
"""

from __future__ import annotations

import argparse

from flows.tabulate import tabulate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="run config YAML (no secrets in it)")
    ap.add_argument("--cron", default="0 2 * * *")
    ap.add_argument("--timezone", default="UTC")
    ap.add_argument("--name", default="nightly-served")
    args = ap.parse_args()
    from prefect.schedules import Cron

    tabulate.serve(name=args.name, schedule=Cron(args.cron, timezone=args.timezone),
                   parameters={"config_path": args.config}, limit=1)


if __name__ == "__main__":
    main()
