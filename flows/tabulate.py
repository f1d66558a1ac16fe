"""Prefect flow ``tabulate``: one flow run per release, levels in order, ``.map`` over runs of shards.

Every task wraps a stage of :mod:`pipeline.job.stages`, in the order of
:func:`pipeline.job.plan.plan`, and passes only paths and small manifests
(names, counts, checksums, seconds). No arrays, true values, keys or seeds ever go through
task parameters, results, logs or artifacts: the confidential state stays in the run
directory. Retries are safe because every stage is idempotent and measurements are
write-once files — a retried shard re-reads its noise, it never draws it again.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from pipeline.errors import InputError
from pipeline.job import stages
from pipeline.job.context import RunContext
from pipeline.job.plan import plan

# Prefect's result cache must never decide whether noise is drawn: the stages are idempotent
# on disk, so caching is off and retries simply re-enter the stage.
_TASK = dict(cache_policy=NONE, persist_result=False)


class InvalidInputError(InputError):
    """Invalid input, described without data values (Prefect stores logs and exceptions)."""


@task(name="prepare-run", **_TASK)
def prepare_task(config_path: str, resume_dir: str | None) -> str:
    """Config, ledger check, input validation, reservation (see ``stages.prepare``)."""
    from pipeline.inputs.problems import InputValidationError

    try:
        return str(stages.prepare(config_path or None, resume_dir=resume_dir))
    except InputValidationError as exc:
        # values stay on the operator's terminal; Prefect's database gets files, columns, rows
        raise InvalidInputError(exc.message(values=False)) from None


@task(name="histograms", retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=lambda task, run, state: not _is_invalid_input(state), **_TASK)
def histograms_task(run_dir: str) -> dict[str, Any]:
    from pipeline.inputs.problems import InputValidationError

    try:
        return stages.stage_inputs(run_dir)
    except InputValidationError as exc:
        # the full message (with offending values) is for the operator's terminal; what
        # reaches Prefect's database names files, columns, kinds, counts and rows only
        raise InvalidInputError(exc.message(values=False)) from None


def _is_invalid_input(state) -> bool:
    """Invalid input is deterministic: never retry it."""
    try:
        state.result()
    except InvalidInputError:
        return True
    except Exception:
        return False
    return False


@task(name="shards", task_run_name="{action}-{kind}-{level}-{part}", retries=2, retry_delay_seconds=[5, 30],
      **_TASK)
def shards_task(run_dir: str, kind: str, level: str, shards: list[int], action: str = "solve",
                part: str = "") -> list[dict[str, Any]]:
    """Some shards of one level, one after the other (``part``: which, for the task's name), each
    logged as it finishes (a task holds many shards: the log is where an operator follows
    them). A retry re-enters every one: those already done return their recorded summary."""
    log = get_run_logger()
    out = []
    for s in shards:
        info = stages.stage_shard(run_dir, kind, level, s, action)
        out.append(info)
        log.info("%s %s %s shard %d: %s parents, %.1f s", action, kind, level, s, info.get("parents", "-"),
                 info.get("seconds", 0.0))
    return out


#: shard tasks per thread of a Dask cluster in one level: a few, so that a thread that finishes
#: early takes another, but not one per shard (see :func:`shard_parts`)
TASKS_PER_DASK_THREAD = 2


def shard_parts(shards: tuple[int, ...], lanes: int) -> list[list[int]]:
    """A level's shards cut into at most ``lanes`` runs of consecutive shards, as even as the
    count allows (shards have about the same cells: ``execution.shard_target_cells``).

    Why not one task per shard: a Prefect task run costs ~0.1 s of a Dask worker and ~3 ms of
    the API server (research notes, "Measured overhead"), while a block-level shard of 5 M cells
    takes ~0.5 s and a units shard ~0.05 s. At 10 M persons, 70 shards a block level made the
    flow's block levels 8-11 s slower than plain Dask's (BENCHMARKS.md)."""
    n = max(1, min(len(shards), lanes))
    cuts = [round(k * len(shards) / n) for k in range(n + 1)]
    return [list(shards[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]


def _warm_workers() -> None:
    """Have every Dask worker import this module (Prefect's task engine, the pipeline's stages and
    engine) now, while the histograms are built, not in its first shard task: a cold worker's
    first task spent ~2 s importing (1 M persons: the nation level 3.7 -> 2.5 s, state 1.9 -> 0.9
    s). Fire and forget: a worker that fails here imports again in its task and fails there."""
    from prefect.context import get_run_context

    client = getattr(get_run_context().task_runner, "client", None)  # DaskTaskRunner's
    if client is not None and __name__ != "__main__":
        # a coroutine function (the only kind a worker runs without its caller waiting) made of
        # the standard library's alone: the worker answers before it imports anything, and the
        # import runs on a thread, not on the worker's event loop. A function of this module
        # would be unpickled by importing this module first, while the caller waits (~1.1 s)
        import asyncio
        import functools

        client.run(functools.partial(asyncio.to_thread, importlib.import_module, __name__), wait=False)


def _lanes(run_dir: str) -> int:
    """How many shard tasks of a level to make: on a Dask cluster, :data:`TASKS_PER_DASK_THREAD`
    per thread of its workers; on the thread runner, as many as a run without Prefect keeps in
    flight (``execution.workers + 1`` with a worker pool, each spreading its parents over it;
    else 1), so the shards' data in memory stay bounded as there."""
    from prefect.context import get_run_context

    client = getattr(get_run_context().task_runner, "client", None)  # DaskTaskRunner's
    if client is not None:
        return TASKS_PER_DASK_THREAD * max(1, sum(client.nthreads().values()))
    workers = RunContext.load(run_dir).cfg.execution.workers
    return workers + 1 if workers > 1 else 1


@task(name="finish-level", task_run_name="finish-{action}-{kind}-{level}", **_TASK)
def finish_level_task(run_dir: str, kind: str, level: str, action: str = "solve") -> dict[str, Any]:
    return stages.stage_finish_level(run_dir, kind, level, action)


@task(name="margins", retries=1, retry_delay_seconds=[10], **_TASK)
def margins_task(run_dir: str) -> dict[str, Any]:
    from pipeline.job.margins import stage_margins

    return stage_margins(run_dir)


@task(name="publish", retries=1, retry_delay_seconds=[10], **_TASK)
def publish_task(run_dir: str) -> dict[str, Any]:
    return stages.stage_publish(run_dir)


@flow(name="dp-tabulate", validate_parameters=True)
def tabulate(config_path: str, resume_dir: str | None = None) -> dict[str, Any]:
    """Run one release end to end: validate, histograms, top-down per level, publish.

    Returns a small manifest: run directory, release path, ρ/ε, per-level diagnostics.
    """
    log = get_run_logger()
    _warm_workers()
    log.info("checking config, budget and inputs")
    run_dir = prepare_task(config_path, resume_dir)
    log.info("building histograms and invariants")
    histograms_task(run_dir)
    diagnostics: list[dict[str, Any]] = []
    steps = plan(RunContext.load(run_dir))
    lanes = _lanes(run_dir)
    for k, step in enumerate(steps, start=1):
        parts = shard_parts(step.shards, lanes)
        names = [str(p[0]) if len(p) == 1 else f"{p[0]}-{p[-1]}" for p in parts]
        futures = shards_task.map(unmapped(run_dir), unmapped(step.kind), unmapped(step.level), parts,
                                  unmapped(step.action), names)
        futures.wait()
        futures.result()  # raise the first shard failure, if any
        summary = finish_level_task(run_dir, step.kind, step.level, step.action)
        diagnostics.append(summary)
        log.info("[%d/%d] %s: %s parents in %s shards, %.1f s", k, len(steps), stages.step_label(step),
                 summary.get("parents", "-"), len(step.shards), summary.get("seconds", 0.0))
    log.info("publishing the release")
    margins_task(run_dir)  # simulated margins of error, if configured (else a no-op)
    published = publish_task(run_dir)
    create_markdown_artifact(key="privacy-accounting", markdown=published["privacy_markdown"],
                             description="Privacy-loss accounting of this release")
    create_table_artifact(key="level-diagnostics", table=diagnostics,
                          description="Post-processing diagnostics per run kind and level")
    create_link_artifact(key="release", link=published["release_uri"], link_text=published["release_id"])
    return {"run_dir": run_dir, "release": published["release_path"], "release_id": published["release_id"],
            "rho": published["rho"], "epsilon": published["epsilon"], "levels": diagnostics}


@contextlib.contextmanager
def api_for_workers(task_runner: str, dask_address: str | None) -> Iterator[Callable[[], str | None]]:
    """The Prefect API the flow's Dask workers report their task runs to.

    Without ``PREFECT_API_URL`` a flow run starts an ephemeral API server in its own process
    tree, and the settings that travel with each task to a Dask worker say "ephemeral" — so
    every worker would start its own server on the shared ``~/.prefect`` database (a second
    history, ~5-15 s per worker, and "database is locked" errors). Here the driver starts that
    server itself and sets ``PREFECT_API_URL`` for the flow run, so the workers report to it.
    It listens on 127.0.0.1: a cluster on other machines needs a Prefect server they can reach
    (``prefect server start --host 0.0.0.0`` and ``PREFECT_API_URL``), and is refused without
    one (on entry, before the caller prepares the run).

    The server starts in its own process (~3 s on a 2-core machine, :class:`_ApiServer`) while
    the caller prepares the run. Yields ``ready()``: call it before the flow runs; it waits for
    the server, sets ``PREFECT_API_URL`` until the block ends and returns the URL (None: the
    thread runner or a configured API, left alone)."""
    from urllib.parse import urlparse

    from prefect.settings import PREFECT_API_URL, temporary_settings

    if task_runner != "dask" or PREFECT_API_URL.value():
        yield lambda: None
        return
    host = urlparse(dask_address).hostname if dask_address else "127.0.0.1"  # no address: a LocalCluster
    if host not in ("127.0.0.1", "localhost", "::1"):
        from pipeline.model.config import ConfigError

        raise ConfigError(f"the Dask cluster at {dask_address} cannot reach a Prefect API on this machine's "
                          "loopback: start a Prefect server its workers can reach (prefect server start --host "
                          "0.0.0.0) and set PREFECT_API_URL=http://<this-host>:4200/api")
    server = _ApiServer()
    try:
        with contextlib.ExitStack() as stack:
            def ready() -> str:
                url = server.wait_ready(timeout=180)
                stack.enter_context(temporary_settings({PREFECT_API_URL: url}))
                stack.callback(_drain_to_api)  # on exit, first: while the settings and server are up
                return url

            yield ready
    finally:
        server.stop()


class _ApiServer:
    """Prefect's temporary API server, started the way Prefect starts its own for a flow run
    without an API (``prefect.server.api.server.SubprocessASGIServer``: uvicorn serving the
    server's app factory on a free loopback port, UI and background services off, this
    process's Prefect settings in its environment) — but without importing Prefect's server
    in this process: that import alone took ~2 s here before the server's own process (~3 s:
    the same import, the database check) even started, and both ran before the flow could."""

    #: environment of the server process, as Prefect sets it for its temporary server
    ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    #: unless the environment says otherwise: no usage reports from a run on confidential data
    #: (and no network error in the run's output on a machine without one)
    DEFAULTS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    #: uvicorn's exit status when it cannot bind its port (taken meanwhile: try another)
    PORT_TAKEN = 3

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._spawn()

    def _spawn(self) -> None:
        import prefect
        from prefect.settings import get_current_settings

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        env = {**self.DEFAULTS, **os.environ, **self.ENV,
               **get_current_settings().to_environment_variables(exclude_unset=True)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"], env=env)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait_ready(self, timeout: float) -> str:
        """Wait until the server answers its health check; returns its API URL."""
        import httpx

        deadline = time.monotonic() + timeout
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                assert self.proc is not None
                code = self.proc.poll()
                if code == self.PORT_TAKEN:
                    self._spawn()
                elif code is not None:
                    raise RuntimeError(f"the temporary Prefect API server exited with status {code} (its "
                                       "messages are above)")
                try:
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        return self.api_url
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"the temporary Prefect API server did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def _drain_to_api() -> None:
    """Send what the log and event queues still hold while the server is up: after it stops they
    would retry against a closed port for a minute at process exit."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=15)


def with_runner(task_runner: str = "thread", dask_address: str | None = None):
    """The ``tabulate`` flow with the chosen task runner, without editing decorators."""
    if task_runner == "dask":
        from prefect_dask import DaskTaskRunner  # optional extra: pip install 'dptab[dask]'

        return tabulate.with_options(task_runner=DaskTaskRunner(address=dask_address) if dask_address
                                     else DaskTaskRunner())
    return tabulate
