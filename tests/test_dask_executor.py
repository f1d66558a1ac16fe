"""The same job on a Dask cluster (``execution.executor: dask``, no Prefect): a real scheduler
and two workers on 127.0.0.1 (subprocesses, stopped by PID), a two-state job whose shards run
as cluster tasks, and a release identical to the local run's."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from run_helpers import scale_module, write_config

from pipeline.inputs.synth import synthesize
from pipeline.job.stages import run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("dask")
    with scale_module().dask_cluster(2, logs) as (address, _):
        yield address, logs


def _digests(release: Path) -> dict[str, str]:
    return {p.relative_to(release).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(release.rglob("*"))
            # manifest, index page, README and codebook carry the release id and dates
            if p.is_file() and p.name not in ("manifest.json", "README.md", "codebook.json") and p.suffix != ".html"}


def _two_states(tmp: Path) -> Path:
    """Two small synthetic states (Rhode Island, Delaware) in one input."""
    parts = []
    for st, seed in (("44", 21), ("10", 22)):
        synthesize(1500, seed, tmp / st, states=[st])
        parts.append(tmp / st)
    out = tmp / "inputs"
    out.mkdir()
    pl.concat([pl.read_parquet(d / "persons.parquet") for d in parts]).write_parquet(out / "persons.parquet")
    pl.concat([pl.read_parquet(d / "units.parquet").with_columns(pl.lit(d.name + "-") + pl.col("unit_id"))
               for d in parts]).write_parquet(out / "units.parquet")
    return out


@pytest.fixture(scope="module")
def local_release(tmp_path_factory):
    """The two-state job run locally (the reference the cluster runs must reproduce)."""
    tmp = tmp_path_factory.mktemp("local")
    inputs = _two_states(tmp)
    (tmp / "l").mkdir()
    local = write_config(tmp / "l", inputs, release_id="L", privacy=SEEDED, execution=EXECUTION)
    return inputs, Path(run(local, progress=False)["release_path"])


SEEDED = {"randomness": "seeded", "seed": 7}
# a small shard target: every level below the states has several shards (cluster tasks)
EXECUTION = {"workers": 1, "shard_target_cells": 20_000}


def test_dask_run_gives_the_local_release(cluster, local_release, tmp_path: Path) -> None:
    """Shards as cluster tasks, ``workers: 2`` for the driver's own cores: the local release, and
    no shard task started a process pool on its worker (the cluster's threads are the run's
    cores; the loopback workers have no nanny, so they could)."""
    from distributed import Client

    address, _ = cluster
    inputs, a = local_release
    (tmp_path / "d").mkdir()
    dask = write_config(tmp_path / "d", inputs, release_id="D", privacy=SEEDED,
                        execution={**EXECUTION, "workers": 2, "executor": "dask", "dask_address": address})
    b_out = run(dask, progress=False)

    def pool_started() -> bool:  # on each worker (nested: sent by value)
        import sys

        executor = sys.modules.get("pipeline.job.executor")
        return executor is not None and executor._current is not None and executor._current._pool is not None

    with Client(address, set_as_default=False) as client:
        assert not any(client.run(pool_started).values()), "a shard task started a process pool on a worker"
    b = Path(b_out["release_path"])
    solved = [k for k in b_out["levels"] if k.get("action", "solve") == "solve"]  # not measure/estimate steps
    states = [k for k in solved if k["level"] == "state"]
    assert states[0]["units"] == 2
    assert sum(k["shards"] for k in solved) > len(solved), "no level ran as several cluster tasks"
    assert _digests(a) == _digests(b)


def test_single_shard_levels_spread_their_parents_over_the_cluster(cluster, local_release,
                                                                   tmp_path: Path) -> None:
    """One shard a level (a large shard target) on a two-worker cluster: each shard task sends its
    work items to the cluster as tasks of their own (``ClusterTasks``), and the release is still
    the local run's with the same shards."""
    from distributed import Client

    address, _ = cluster
    inputs, _ = local_release
    one = {"workers": 1, "shard_target_cells": 50_000_000}
    (tmp_path / "l").mkdir()
    a = Path(run(write_config(tmp_path / "l", inputs, release_id="L1", privacy=SEEDED, execution=one),
                 progress=False)["release_path"])
    (tmp_path / "d").mkdir()
    out = run(write_config(tmp_path / "d", inputs, release_id="D1", privacy=SEEDED,
                           execution={**one, "executor": "dask", "dask_address": address}), progress=False)
    solved = [k for k in out["levels"] if k.get("action", "solve") == "solve"]
    assert all(k["shards"] == 1 for k in solved)
    with Client(address, set_as_default=False) as client:
        prefixes = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes))
    assert "solve_range" in prefixes, "no work item ran as a cluster task of its own"
    assert _digests(a) == _digests(Path(out["release_path"]))


def test_flow_on_the_cluster_gives_the_local_release(cluster, local_release, tmp_path: Path) -> None:
    """`dptab run --flow --task-runner dask --dask-address`: the Prefect flow's shard tasks run on
    the cluster and report to the one API server the driver started — no worker starts its own
    (which would write a second history into ~/.prefect and lock its database)."""
    address, logs = cluster
    inputs, _ = local_release
    # many small shards a level, which the flow runs as a few tasks of several shards each
    # (flows.tabulate.shard_parts); the 2020 estimator, the faster one
    fewer = {"execution": EXECUTION, "postprocess": {"estimator": "topdown"}}
    (tmp_path / "l").mkdir()
    a = Path(run(write_config(tmp_path / "l", inputs, release_id="L", privacy=SEEDED, **fewer),
                 progress=False)["release_path"])
    cfg = write_config(tmp_path, inputs, release_id="F", privacy=SEEDED, **fewer)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    # the flow tests' private home (tests/flows/conftest.py) when collected with them: its database
    # is migrated already; alone, a fresh one (never the user's ~/.prefect)
    env.setdefault("PREFECT_HOME", str(tmp_path / "prefect-home"))
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    res = subprocess.run([sys.executable, "-m", "dptab.cli", "run", "--quiet", "--flow", "--task-runner", "dask",
                          "--dask-address", address, str(cfg)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _digests(a) == _digests(tmp_path / "releases" / "F")
    worker_logs = "".join((logs / f"worker{i}.log").read_text() for i in range(2))
    assert "temporary server" not in worker_logs and "database is locked" not in worker_logs
    assert "Error logging to API" not in res.stdout + res.stderr


def test_flow_refuses_a_remote_cluster_without_a_reachable_api(tmp_path: Path) -> None:
    from pipeline.model.config import ConfigError

    env_url = os.environ.pop("PREFECT_API_URL", None)
    try:
        from flows.tabulate import api_for_workers

        with pytest.raises(ConfigError, match="PREFECT_API_URL"):
            with api_for_workers("dask", "tcp://10.1.2.3:8786"):
                pass
    finally:
        if env_url is not None:
            os.environ["PREFECT_API_URL"] = env_url
