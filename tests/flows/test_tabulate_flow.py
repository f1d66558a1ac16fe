"""Prefect smoke tests: the `tabulate` flow on a tiny input, artifacts, runner selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from run_helpers import make_inputs, write_config


@pytest.fixture(scope="module")
def flow_result(prefect_harness, tmp_path_factory):
    import logging

    from flows.tabulate import tabulate

    # the run loggers at INFO (conftest quiets Prefect to WARNING): their records go to the API
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).setLevel(logging.INFO)
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


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), first=st.integers(0, 5), lanes=st.integers(1, 40))
def test_shard_parts_cover_every_shard_once_in_order_and_evenly(n: int, first: int, lanes: int) -> None:
    """A level's shards go to at most ``lanes`` tasks, each a non-empty run of consecutive shards,
    together every shard once and in order, sizes differing by at most one."""
    from flows.tabulate import shard_parts

    shards = tuple(range(first, first + n))
    parts = shard_parts(shards, lanes)
    assert [s for p in parts for s in p] == list(shards)
    assert len(parts) == min(n, lanes)
    assert all(parts)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(b - a == 1 for p in parts for a, b in zip(p, p[1:]))


def test_flow_logs_every_shard_of_every_level(flow_result) -> None:
    """A task holds several shards (``shard_parts``): each shard still has its own log line, the
    operator's view of a level's progress."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    _, state = flow_result
    APILogWorker.drain_all(timeout=30)

    async def read() -> list[str]:
        out: list[str] = []
        async with get_client() as client:
            while True:  # the API gives at most 200 a request
                page = await client.read_logs(log_filter=LogFilter(
                    flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])), limit=200,
                    offset=len(out))
                out += [log.message for log in page]
                if len(page) < 200:
                    return out

    messages = anyio.run(read)
    for step in state.result()["levels"]:
        if step.get("action", "solve") != "solve":
            continue
        lines = [m for m in messages if m.startswith(f"solve {step['kind']} {step['level']} shard ")]
        assert len(lines) == step["shards"], (step, lines)
