"""Serve the ``tabulate`` flow on a cron schedule without a work pool.

    python -m flows.serve --config config.yaml --cron "0 2 * * *" --timezone America/New_York

Stopping this process pauses the schedule (Prefect behaviour). For a work-pool deployment use
``prefect deploy --all`` with ``prefect.yaml``.
"""

from __future__ import annotations

import argparse

EPILOG = """Examples:
  python -m flows.serve --config configs/production.yaml
  python -m flows.serve --config configs/production.yaml --cron "30 1 * * 0" --timezone America/New_York --name weekly
"""


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m flows.serve`` (every option with its help text)."""
    ap = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, metavar="YAML",
                    help="run config YAML the scheduled runs use (no secrets in it)")
    ap.add_argument("--cron", default="0 2 * * *", metavar="EXPR",
                    help="when to run, a five-field cron expression (default: %(default)r, daily at 02:00)")
    ap.add_argument("--timezone", default="UTC", metavar="TZ",
                    help="IANA time zone the cron expression is read in, e.g. America/New_York (default: %(default)s)")
    ap.add_argument("--name", default="nightly-served",
                    help="deployment name shown in the Prefect UI (default: %(default)s)")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from prefect.schedules import Cron

    from flows.tabulate import tabulate  # Prefect loads only when serving, not for --help

    tabulate.serve(name=args.name, schedule=Cron(args.cron, timezone=args.timezone),
                   parameters={"config_path": args.config}, limit=1)


if __name__ == "__main__":
    main()
