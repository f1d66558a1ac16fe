"""National-scale benchmark: `dptab run` at N persons, watched as a whole process tree.

    python benchmarks/scale.py --persons 10000000 [--persons 30000000 ...] [--workers 2]
                               [--estimator topdown] [--interval 1.0]
                               [--mode local|flow|dask|flow-dask ...] [--dask-workers 2] [--verify]

For each N (synthetic input cached in ``bench-out/synth-N-1``, made by ``dptab synth``): runs
the whole job (keyed noise, the 2020 strategies, ``output.csv: false``) in a fresh subprocess
and samples, every ``--interval`` seconds, the resident memory and CPU time of the job and every
descendant (its worker pool). Stage boundaries come from the run's ``state.json`` (each stage's
completion time); per stage it reports wall seconds and CPU utilisation (CPU seconds of the whole
tree / wall seconds, in % of one core: 200% = both cores busy on this machine). The I/O floor is
a read of the persons file + one group_by to block × cell counts + a write (same process).

Prints a line per sample batch and, last, one JSON object per N: wall, peak total RSS of the
tree, per-stage wall and CPU %, the floor. Large N take minutes to hours: run in the background.

``--mode`` (repeatable; each N runs once per mode, same seeded noise): ``local`` is ``dptab run``
with its own worker pool; ``flow`` the Prefect flow (thread runner, ephemeral API); ``dask``
``execution.executor: dask`` on a local ``distributed`` cluster of ``--dask-workers`` worker
processes (one thread each, started here on 127.0.0.1 and stopped after the run); ``flow-dask``
the Prefect flow with the Dask task runner on that cluster. The cluster's processes are counted in
the tree's RSS and CPU. ``--prefect-server``: the flow modes report to one standing Prefect
server started here for the whole benchmark (as a deployment's, and as any cluster beyond this
machine needs) instead of the temporary server each ``--flow`` run starts otherwise; the
server's CPU and memory during a flow run count as the run's. With several modes the JSON says
whether every release is identical to the first mode's (all files but the manifest, README,
codebook and HTML, which carry ids and dates); ``release_sha256`` digests those files, to compare
the releases of runs from different commits.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent


def io_floor(persons: Path, out: Path) -> float:
    t0 = time.perf_counter()
    (pl.scan_parquet(persons).group_by(["geoid", "hhgq", "voting_age", "hispanic", "cenrace"]).len()
     .collect().write_parquet(out))
    return time.perf_counter() - t0


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _sample(roots: list[psutil.Process]) -> tuple[float, float]:
    """(total RSS in MB, total CPU seconds) of the process trees; vanished processes count 0."""
    rss = cpu = 0.0
    for p in (q for r in roots for q in _tree(r)):
        try:
            with p.oneshot():
                rss += p.memory_info().rss
                t = p.cpu_times()
                cpu += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            continue
    return rss / 2**20, cpu


@contextlib.contextmanager
def dask_cluster(n_workers: int, logs: Path):
    """A ``distributed`` scheduler and ``n_workers`` one-thread workers on 127.0.0.1, importing
    this checkout (whatever checkout the venv installed); yields ``(address, [processes])`` and
    stops them by process group, workers first (without a scheduler a worker lingers, trying to
    reconnect). Also the loopback cluster of ``tests/test_dask_executor.py``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    dask = str(Path(sys.executable).with_name("dask"))
    # the environment README asks of Dask workers (dptab's own processes set it themselves; a
    # worker imports numpy before any dptab code runs, too late for the defaults). By path: in
    # this directory ``pipeline`` is the sibling benchmark script
    import importlib.util

    spec = importlib.util.spec_from_file_location("dptab_runtime", ROOT / "pipeline" / "runtime.py")
    assert spec is not None and spec.loader is not None
    runtime = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runtime)
    env = {**runtime.allocator_defaults(), **os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", ":0"], stdout=open(logs / "scheduler.log", "w"),
                              stderr=subprocess.STDOUT, env=env, start_new_session=True)]
    time.sleep(2)
    for i in range(n_workers):
        procs.append(subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--nworkers", "1",
                                       "--host", "127.0.0.1", "--dashboard-address", ":0", "--no-nanny"],
                                      stdout=open(logs / f"worker{i}.log", "w"), stderr=subprocess.STDOUT,
                                      env=env, start_new_session=True, cwd=ROOT))
    try:
        from distributed import Client

        with Client(address, timeout="60s") as client:
            try:
                client.wait_for_workers(n_workers, timeout=120)
            except TimeoutError:
                raise RuntimeError("Dask workers did not start:\n" + (logs / "worker0.log").read_text()[-2000:]) from None
        yield address, procs
    finally:
        for p in reversed(procs):
            stop_group(p)


def stop_group(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it started: its
    process group gets SIGTERM, then SIGKILL after ``timeout`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def prefect_server(home: Path, env: dict[str, str] | None = None):
    """A standing Prefect API server on 127.0.0.1, as a deployment runs one (``prefect server
    start``, no UI, analytics off, ``PREFECT_HOME=home``; ``env``: its environment, default this
    process's); yields ``(api_url, process)``, stopped by process group at the end. A flow run
    with ``PREFECT_API_URL`` pointing at it starts no temporary server of its own — what every
    cluster of more than one machine needs (``flows.tabulate.api_for_workers``). Also the server
    of ``tests/flows/test_deployment.py``."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home.mkdir(parents=True, exist_ok=True)
    env = {**(os.environ if env is None else env), "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    with open(home / "server.log", "w") as log:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
                                 "127.0.0.1", "--port", str(port), "--no-ui", "--analytics-off"], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("Prefect server did not start:\n" + (home / "server.log").read_text()[-3000:])
            time.sleep(0.2)
        yield url, proc
    finally:
        stop_group(proc, timeout=30)


def release_digests(release: Path) -> dict[str, str]:
    """sha256 of every release file but those carrying the release id or dates."""
    return {p.relative_to(release).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(release.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", "README.md", "codebook.json") and p.suffix != ".html"}


def synthetic_input(persons: int) -> Path:
    cache = ROOT / "bench-out" / f"synth-{persons}-1"
    if not (cache / "units.parquet").exists():
        subprocess.run([sys.executable, "-m", "dptab.cli", "synth", "--persons", str(persons), "--seed", "1",
                        "--out", str(cache), "--quiet"], cwd=ROOT, check=True)
    return cache


def run_one(persons: int, workers: int, estimator: str, interval: float, work: Path, mode: str = "local",
            dask_workers: int = 2, server: psutil.Process | None = None) -> dict:
    cache = synthetic_input(persons)
    tag = f"scale-{persons}-{mode}"
    execution: dict = {"workers": workers}
    # seeded noise: every mode draws the same measurements, so their releases can be compared
    cfg = {"dataset_id": f"scale-{mode}", "confidential": False, "release_id": tag,
           "inputs": {"persons": str(cache / "persons.parquet"), "units": str(cache / "units.parquet")},
           "privacy": {"randomness": "seeded", "seed": 1, "ledger": str(work / "ledger.sqlite"),
                       "lifetime_rho": "100000"},
           "postprocess": {"estimator": estimator},
           "output": {"runs_dir": str(work / "runs"), "releases_dir": str(work / "releases"), "csv": False},
           "execution": execution}
    floor = io_floor(cache / "persons.parquet", work / "floor.parquet")
    with contextlib.ExitStack() as stack:
        cluster: list[subprocess.Popen] = []
        cmd = [sys.executable, "-m", "dptab.cli", "run", "--quiet"]
        if mode in ("dask", "flow-dask"):
            logs = work / f"dask-{mode}"
            logs.mkdir()
            address, cluster = stack.enter_context(dask_cluster(dask_workers, logs))
            if mode == "dask":  # shards are cluster tasks; ``workers``: the driver's own cores (publishing)
                execution.update(executor="dask", dask_address=address)
            else:
                cmd += ["--flow", "--task-runner", "dask", "--dask-address", address]
        elif mode == "flow":
            cmd += ["--flow"]
        path = work / f"{tag}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        extra = [psutil.Process(p.pid) for p in cluster] + ([server] if server is not None and "flow" in mode else [])
        res = _watch(cmd + [str(path)], extra, interval, persons)
    wall, samples = res
    from timing import run_stages  # a sibling script (tests load this file by path, for its cluster and server)

    stages = _stages(run_stages(work / "runs" / tag), wall[0], samples)
    return {"persons": persons, "estimator": estimator, "mode": mode, "workers": workers,
            **({"dask_workers": dask_workers} if "dask" in mode else {}),
            **({"prefect_server": "standing"} if server is not None and "flow" in mode else {}),
            "wall_s": round(wall[1], 1),
            "peak_total_rss_mb": round(max((s[1] for s in samples), default=0.0)),
            "cpu_percent_whole_job": round(100 * (samples[-1][2] / wall[1] if samples else 0.0)),
            "io_floor_s": round(floor, 2), "stages": stages, "release": str(work / "releases" / tag)}


def _watch(cmd: list[str], extra: list[psutil.Process], interval: float,
           persons: int) -> tuple[tuple[float, float], list[tuple[float, float, float]]]:
    """Run ``cmd`` and sample it (and the ``extra`` process trees) until it exits; returns
    ((start unix time, wall s), [(unix time, total RSS MB, CPU s so far)])."""
    samples: list[tuple[float, float, float]] = []  # (unix time, rss MB, cpu s)
    t0 = time.time()
    base = _sample(extra)[1]  # a cluster's start-up CPU is not the job's
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    cpu_done = 0.0  # CPU of exited children is folded into their parent's children_* times
    while proc.poll() is None:
        rss, cpu = _sample([ps, *extra])
        cpu -= base
        cpu_done = max(cpu_done, cpu)
        samples.append((time.time(), rss, cpu_done))
        if len(samples) % 60 == 0:
            print(f"  {persons:,}: {time.time() - t0:7.0f} s, {rss:8.0f} MB, cpu {cpu_done:8.0f} s", flush=True)
        time.sleep(interval)
    out = proc.stdout.read() if proc.stdout else ""
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(out[-4000:])
    return (t0, wall), samples


def _stages(done: dict, t0: float, samples: list[tuple[float, float, float]]) -> dict[str, dict]:
    """Per stage group (inputs, each kind × level, margins, publish): wall, CPU % and peak RSS
    between the previous group's completion and its own (completion times: ``done``, the run's
    stage records)."""
    ends: dict[str, float] = {}
    for name, info in done.items():
        at = dt.datetime.strptime(info["at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc).timestamp()
        parts = name.split(":")
        group = "inputs" if name == "inputs" else (
            f"{parts[1]}:{parts[2]}" if parts[0] in ("shard", "level", "measure") else
            f"{parts[1]}:gls" if parts[0] == "estimate" else parts[0])
        ends[group] = max(ends.get(group, 0.0), at + 1.0)  # state times have 1 s resolution
    out, start = {}, t0
    for group, end in sorted(ends.items(), key=lambda kv: kv[1]):
        win = [s for s in samples if start <= s[0] <= end]
        if len(win) >= 2:
            cpu = 100 * (win[-1][2] - win[0][2]) / max(win[-1][0] - win[0][0], 1e-9)
            peak = max(s[1] for s in win)
        else:
            cpu, peak = float("nan"), float("nan")
        out[group] = {"wall_s": round(end - start, 1), "cpu_percent": None if cpu != cpu else round(cpu),
                      "peak_total_rss_mb": None if peak != peak else round(peak)}
        start = end
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--persons", type=int, action="append", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--estimator", default="topdown", choices=["topdown", "full"])
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--mode", action="append", choices=["local", "flow", "dask", "flow-dask"])
    ap.add_argument("--dask-workers", type=int, default=2)
    ap.add_argument("--prefect-server", action="store_true",
                    help="flow modes report to a standing Prefect server started here (as a deployment's), "
                         "not to a temporary one each run starts; its CPU and memory count in the flow modes'")
    ap.add_argument("--verify", action="store_true",
                    help="then `dptab verify` the (first mode's) release, watched the same way: its wall, CPU and "
                         "peak total RSS in the JSON as `verify`")
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        server = None
        if args.prefect_server:
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dptab-prefect-")))
            url, proc = stack.enter_context(prefect_server(home))
            os.environ.update(PREFECT_API_URL=url, PREFECT_HOME=str(home))  # the CLI's and the workers'
            server = psutil.Process(proc.pid)
        for n in args.persons:
            _run_modes(n, args, server)


def _run_modes(n: int, args: argparse.Namespace, server: psutil.Process | None) -> None:
    with tempfile.TemporaryDirectory(prefix="dptab-scale-") as tmp:
        first: dict[str, str] | None = None
        for mode in args.mode or ["local"]:
            res = run_one(n, args.workers, args.estimator, args.interval, Path(tmp), mode, args.dask_workers, server)
            release = Path(res.pop("release"))
            if args.verify and first is None:
                (_, wall), samples = _watch([sys.executable, "-m", "dptab.cli", "verify", str(release)], [],
                                             args.interval, n)
                res["verify"] = {"wall_s": round(wall, 1),
                                 "cpu_percent": round(100 * samples[-1][2] / wall) if samples else None,
                                 "peak_total_rss_mb": round(max((x[1] for x in samples), default=0.0))}
            digests = release_digests(release)
            # one digest of the release's files: runs of other commits compare by it
            res["release_sha256"] = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()
            if first is None:
                first = digests
            else:
                res["release_identical_to_first_mode"] = digests == first
            print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
