"""The shipped deployment works: deploy to a Prefect server on 127.0.0.1, trigger a run, a
process worker picks it up, and a verified release is published. Also: deploying a config that
cannot run fails at deploy time with exit 2, not at 2 a.m.

The server, the deploy step and the worker are separate processes, as in production; the server
is stopped by PID at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from run_helpers import make_inputs, scale_module, write_config

ROOT = Path(__file__).resolve().parents[2]
PREFECT = Path(sys.executable).with_name("prefect")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_LOGGING_LEVEL": "WARNING"}
    with scale_module().prefect_server(home, env) as (api, _):
        yield {**env, "PREFECT_API_URL": api}


def test_deploy_trigger_and_publish(server, tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path, persons=1500, seed=12)
    cfg = write_config(tmp_path, inputs)
    pool = "test-pool"
    dep = subprocess.run([sys.executable, "-m", "flows.deploy", "--config", str(cfg), "--name", "t", "--pool", pool,
                          "--no-schedule"], cwd=tmp_path, env={**server, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=300)
    assert dep.returncode == 0, dep.stderr[-3000:]
    run = subprocess.run([str(PREFECT), "deployment", "run", "dp-tabulate/t"], env=server, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    worker = subprocess.run([str(PREFECT), "worker", "start", "--pool", pool, "--run-once"], env=server,
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert worker.returncode == 0, (worker.stdout + worker.stderr)[-4000:]
    releases = [p for p in (tmp_path / "releases").iterdir() if not p.name.startswith(".")]
    assert len(releases) == 1, worker.stdout[-3000:]
    verify = subprocess.run([sys.executable, "-m", "dptab.cli", "verify", str(releases[0])], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    manifest = json.loads((releases[0] / "manifest.json").read_text())
    assert manifest["dataset_id"] == "test-ds"


def test_deploying_a_config_that_cannot_run_fails_at_deploy_time(server, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, tmp_path / "nowhere")  # inputs that do not exist
    dep = subprocess.run([sys.executable, "-m", "flows.deploy", "--config", str(cfg), "--name", "bad", "--no-schedule"],
                         cwd=tmp_path, env={**server, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=300)
    assert dep.returncode == 2 and "inputs.persons" in dep.stderr and "does not exist" in dep.stderr
    missing = subprocess.run([sys.executable, "-m", "flows.deploy", "--config", str(tmp_path / "absent.yaml")],
                             cwd=tmp_path, env={**server, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 2 and "config file not found" in missing.stderr
    fixed = write_config(tmp_path, make_inputs(tmp_path, persons=200, seed=1), name="fixed.yaml", release_id="R")
    sched = subprocess.run([sys.executable, "-m", "flows.deploy", "--config", str(fixed), "--name", "fixed"],
                           cwd=tmp_path, env={**server, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                           timeout=300)
    assert sched.returncode == 2 and "release_id" in sched.stderr


def test_shipped_production_config_validates() -> None:
    from pipeline.job.prepare import check_config

    cfg = check_config(ROOT / "configs" / "production.yaml")
    assert cfg.release_id is None and cfg.confidential and (cfg.inputs.persons).is_file()
