"""Deploy the ``dp-tabulate`` flow to a Prefect server, checked at deploy time.

    python -m flows.deploy --config configs/production.yaml            # nightly at 02:00 New York
    python -m flows.deploy --config my.yaml --cron "0 3 * * 1" --pool dptab-process
    prefect worker start --pool dptab-process                          # runs what is scheduled

Everything a scheduled run needs is checked *now*, not at 2 a.m.: the config validates, its
strategies fit the spec and geography, the input files exist and the output folders can be
written (``pipeline.job.prepare.check_config``, no data is read and no budget reserved). Paths are
resolved from the project: the flow's code is loaded from this repository (the pull step sets
the working directory to it) and the config is passed as an absolute path. The work pool is
created (type ``process``) if it does not exist. Exit status 2 with a clear message if anything
is missing; ``PREFECT_API_URL`` says which server (an ephemeral one otherwise).

``prefect deploy --all`` with ``prefect.yaml``, run from the repository root, is the same
deployment without the checks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "production.yaml"),
                    help="run config YAML (default: configs/production.yaml); no secrets in it")
    ap.add_argument("--name", default="nightly", help="deployment name (default: nightly)")
    ap.add_argument("--pool", default="dptab-process", help="process work pool, created if missing")
    ap.add_argument("--cron", default="0 2 * * *", help="schedule (cron); default 02:00 daily")
    ap.add_argument("--timezone", default="America/New_York", help="time zone of the schedule")
    ap.add_argument("--no-schedule", action="store_true", help="deploy without a schedule (run on demand)")
    args = ap.parse_args(argv)

    from pipeline.errors import DptabError
    from pipeline.job.prepare import check_config

    config = Path(args.config).resolve()
    try:
        cfg = check_config(config)
    except DptabError as exc:
        print(f"cannot deploy: {type(exc).__name__}: {exc}", file=sys.stderr)
        return exc.exit_status
    if cfg.release_id and not args.no_schedule:
        print(f"cannot deploy: {config}: release_id {cfg.release_id!r} is fixed, but a scheduled run makes a new "
              "release each time; remove release_id (each run then gets <dataset>-<time>-<random>)", file=sys.stderr)
        return 2
    for what, p in (("inputs.persons", cfg.inputs.persons), ("inputs.units", cfg.inputs.units)):
        if not p.exists():
            print(f"cannot deploy: {config}: {what} {p} does not exist", file=sys.stderr)
            return 2

    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.schedules import Cron

    from flows.tabulate import tabulate

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=args.pool, type="process"))
        except ObjectAlreadyExists:
            pass
    flow = tabulate.from_source(source=str(ROOT), entrypoint="flows/tabulate.py:tabulate")
    deployment_id = flow.deploy(
        name=args.name, work_pool_name=args.pool, build=False, push=False, print_next_steps=False,
        parameters={"config_path": str(config)}, concurrency_limit=1,
        schedule=None if args.no_schedule else Cron(args.cron, timezone=args.timezone),
        description=f"dptab release of {cfg.dataset_id} ({config.name})",
    )
    print(f"deployed dp-tabulate/{args.name} ({deployment_id}) on pool {args.pool}; "
          f"config {config}; {'no schedule' if args.no_schedule else f'cron {args.cron!r} {args.timezone}'}")
    print(f"start a worker: prefect worker start --pool {args.pool}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
