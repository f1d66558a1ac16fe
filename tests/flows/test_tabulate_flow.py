"""Prefect smoke tests: the `tabulate` flow on a tiny input, artifacts, runner selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from run_helpers import make_inputs, write_config


@pytest.fixture(scope="module")
def flow_result(prefect_harness, tmp_path_factory):
    from flows.tabulate import tabulate

    tmp = tmp_path_factory.mktemp("flow")
    inputs = make_inputs(tmp, persons=2000, seed=21)
    cfg = write_config(tmp, inputs, release_id="flow-rel")
    state = tabulate(config_path=str(cfg), return_state=True)
    return tmp, state


def test_flow_publishes_a_verified_release(flow_result) -> None:
    from pipeline.release.verify import verify_release

    tmp, state = flow_result
    assert state.is_completed()
    result = state.result()
    assert Path(result["release"]).name == "flow-rel"
    assert verify_release(Path(result["release"])) == []
    # small manifests only: JSON-able, no arrays, no key or seed
    text = json.dumps(result)
    assert "noise.key" not in text and '"seed"' not in text
    assert {d["level"] for d in result["levels"] if d.get("action", "solve") == "solve"} == {"nation", "state", "county", "tract", "block_group", "block"}


def test_flow_writes_privacy_diagnostics_and_link_artifacts(flow_result) -> None:
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["privacy-accounting", "level-diagnostics", "release"])))

    arts = anyio.run(read)
    keys = {a.key for a in arts}
    assert keys == {"privacy-accounting", "level-diagnostics", "release"}
    privacy = next(a for a in arts if a.key == "privacy-accounting")
    assert "rho" in privacy.data and "epsilon" in privacy.data


def test_task_runner_is_selectable_without_editing_code(prefect_harness) -> None:
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.tabulate import tabulate, with_runner

    assert with_runner("thread") is tabulate
    assert isinstance(tabulate.task_runner, ThreadPoolTaskRunner)
    prefect_dask = pytest.importorskip("prefect_dask")
    dask_flow = with_runner("dask", "tcp://127.0.0.1:8786")
    assert isinstance(dask_flow.task_runner, prefect_dask.DaskTaskRunner)
    assert dask_flow.task_runner.address == "tcp://127.0.0.1:8786"
