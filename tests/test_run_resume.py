"""Kill -9 at many points, resume, and get exactly the release of an uninterrupted run.

Crash points are injected with ``DPTAB_CRASH_AT`` (see ``pipeline.rundir.crash_point``): the
process SIGKILLs itself there, so nothing is flushed or cleaned up. A second test kills the
process at random times from outside. In both, the resumed release's tables and microdata
and the run's noisy measurement files must be byte-identical to an uninterrupted run that
used the same noise key (rule: measurements are drawn once and reused on resume).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_helpers import make_inputs, write_config

from pipeline.job import stages
from pipeline.job.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent


def _dptab(args: list[str], crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("DPTAB_CRASH_AT", None)
    if crash_at:
        env["DPTAB_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-m", "dptab.cli", "run", "--quiet", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _done_count(run_dir: Path) -> int:
    try:
        return len(RunDir(run_dir).state()["done"])
    except (OSError, ValueError):
        return 0


def _digests(root: Path, pattern: str) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.glob(pattern)) if p.is_file()}


def _same_outputs(run_a: Path, rel_a: Path, run_b: Path, rel_b: Path) -> None:
    meas_a, meas_b = _digests(run_a, "measurements/**/*.parquet"), _digests(run_b, "measurements/**/*.parquet")
    assert meas_a and meas_a == meas_b, "measurement files differ"
    for pattern in ("tables/*.parquet", "microdata/*.parquet", "csv/**/*.csv"):
        a, b = _digests(rel_a, pattern), _digests(rel_b, pattern)
        assert a and a == b, f"{pattern} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    inputs = make_inputs(tmp, persons=2000, seed=4)
    cfg = write_config(tmp, inputs, release_id="reference")
    out = stages.run(cfg, progress=False)
    return tmp, inputs, Path(out["run_dir"]), Path(out["release_path"])


CRASH_POINTS = [
    "before:inputs",                       # histograms written, not recorded
    "before:measure:persons:block:00000",  # full estimator: block answers drawn, not recorded
    "before:estimate:persons",             # full estimator: GLS targets written, not recorded
    "before:shard:persons:nation:00000",   # root measured and solved, not recorded
    "mid-write:state.json#4",              # a state update half-written
    "mid-write:shards.jsonl#2",            # a shard record cut short (the next append removes it)
    "before:shard:persons:block:00000",    # block measurements drawn and solved, not recorded
    "before:level:units:block",            # last level merged, not recorded
    "before:publish",                      # release renamed into place, not recorded
]


def test_crash_points_resume_to_identical_release(reference) -> None:
    tmp, inputs, ref_run, ref_release = reference
    cfg = write_config(tmp, inputs, name="crash.yaml", release_id="crashed")
    first = _dptab([str(cfg)], crash_at=CRASH_POINTS[0])
    assert first.returncode == -signal.SIGKILL, first.stderr
    run_dir = tmp / "runs" / "crashed"
    for point in CRASH_POINTS[1:]:
        res = _dptab(["--resume", str(run_dir)], crash_at=point)
        assert res.returncode == -signal.SIGKILL, f"{point} did not fire: {res.stderr[-2000:]}"
    done = _dptab(["--resume", str(run_dir)])
    assert done.returncode == 0, done.stderr[-3000:]
    _same_outputs(ref_run, ref_release, run_dir, tmp / "releases" / "crashed")


def test_random_kills_with_the_same_key_resume_to_identical_release(tmp_path) -> None:
    inputs = make_inputs(tmp_path, persons=2000, seed=8)
    keyed = {"randomness": "keyed", "seed": None}
    # the 2020 estimator here (the crash points and the kill campaign run the default, full)
    topdown = {"estimator": "topdown"}
    ref = stages.run(write_config(tmp_path, inputs, name="a.yaml", release_id="keyed-a", privacy=keyed,
                                  postprocess=topdown), progress=False)
    run_b = stages.prepare(write_config(tmp_path, inputs, name="b.yaml", release_id="keyed-b", privacy=keyed,
                                        postprocess=topdown))
    shutil.copyfile(Path(ref["run_dir"]) / "noise.key", run_b / "noise.key")  # same key, as on a retry
    rng = random.Random(20261123)
    # kill points drawn over the run's progress (number of recorded stages), plus a random
    # delay of up to 0.3 s so the kill usually lands in the middle of the next stage
    n_stages = len(RunDir(Path(ref["run_dir"])).state()["done"])
    targets = sorted(rng.sample(range(1, n_stages - 1), 4))
    kills = 0
    for target in targets:
        proc = subprocess.Popen([sys.executable, "-m", "dptab.cli", "run", "--quiet", "--resume", str(run_b)],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and _done_count(run_b) < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    done = _dptab(["--resume", str(run_b)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert kills >= 1, "no kill landed: the run finished before the first kill"
    _same_outputs(Path(ref["run_dir"]), Path(ref["release_path"]), run_b, tmp_path / "releases" / "keyed-b")


#: kill points that still lie ahead while levels remain, and once only publishing remains
SOLVE_POINTS = ["shard:measured", "shard:solved", "mid-write:state.json", "mid-write:shards.jsonl"]
PUBLISH_POINTS = ["publish:tables-written", "publish:before-rename"]


def _leftovers(tmp: Path, run_dir: Path, release: str) -> list[str]:
    """Anything a killed attempt could leave: hidden partial release folders, temp files."""
    out = [p.name for p in (tmp / "releases").iterdir() if p.name != release and release in p.name]
    out += [str(p.relative_to(run_dir)) for p in run_dir.rglob(".*") if p.is_file()]
    return out


def _kill_campaign(tmp: Path, inputs: Path, n_kills: int, seed: int) -> None:
    """Kill `dptab run --resume` at random points (measure, solve, publish) ``n_kills`` times,
    then finish; the release must equal an uninterrupted run with the same key, with nothing
    left behind."""
    keyed = {"randomness": "keyed", "seed": None}
    ref = stages.run(write_config(tmp, inputs, name="a.yaml", release_id="camp-a", privacy=keyed), progress=False)
    run_b = stages.prepare(write_config(tmp, inputs, name="b.yaml", release_id="camp-b", privacy=keyed))
    shutil.copyfile(Path(ref["run_dir"]) / "noise.key", run_b / "noise.key")  # same key, as on a retry
    rng = random.Random(seed)
    kills, fired = 0, []
    while kills < n_kills:
        levels_left = "level:units:block" not in json.loads((run_b / "state.json").read_text())["done"]
        if levels_left and kills < n_kills - 2:
            point = rng.choice(SOLVE_POINTS)
        elif levels_left:  # the last two kills go to publishing: finish the levels first
            stages.solve_levels(run_b)
            continue
        elif kills < n_kills - 1:
            point = rng.choice(PUBLISH_POINTS)
        else:  # release renamed into place, stage not recorded: the resume must adopt it
            point = "before:publish"
        res = _dptab(["--resume", str(run_b)], crash_at=point)
        assert res.returncode == -signal.SIGKILL, f"{point} did not fire: {res.stderr[-2000:]}"
        kills += 1
        fired.append(point)
    done = _dptab(["--resume", str(run_b)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(SOLVE_POINTS[:2]) & set(fired) and set(PUBLISH_POINTS) & set(fired), \
        f"kills did not cover measuring or solving, and publishing: {fired}"
    _same_outputs(Path(ref["run_dir"]), Path(ref["release_path"]), run_b, tmp / "releases" / "camp-b")
    assert _leftovers(tmp, run_b, "camp-b") == []


def test_kill_campaign_resumes_to_identical_release(tmp_path) -> None:
    """A handful of kills in `make test` (the slow suite runs the long campaign)."""
    inputs = make_inputs(tmp_path, persons=1500, seed=9)
    _kill_campaign(tmp_path, inputs, n_kills=5, seed=7)


@pytest.mark.slow
def test_long_kill_campaign_resumes_to_identical_release(tmp_path) -> None:
    inputs = make_inputs(tmp_path, persons=3000, seed=10)
    _kill_campaign(tmp_path, inputs, n_kills=24, seed=2026)


def test_a_killed_run_leaves_no_worker_processes(tmp_path) -> None:
    """Killed (``kill -9``) after its worker pool has solved levels, the run leaves no process
    behind: the pool's workers, the fork server and the resource tracker all end within seconds
    (they used to stay, idle and holding their memory, until the machine restarted)."""
    import psutil

    # enough persons that levels are cut into work items for the pool (2,000 were solved in place)
    inputs = make_inputs(tmp_path, persons=20_000, seed=12)
    cfg = write_config(tmp_path, inputs, release_id="killed", postprocess={"estimator": "topdown"},
                       execution={"workers": 2, "shard_target_cells": 20_000})
    env = {**os.environ, "DPTAB_CRASH_AT": "before:level:units:block"}
    proc = subprocess.Popen([sys.executable, "-m", "dptab.cli", "run", "--quiet", str(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    assert proc.wait(timeout=300) == -signal.SIGKILL

    def left() -> list[psutil.Process]:  # the killed run's session: every process it started
        out = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == proc.pid:
                    out.append(p)
            except (ProcessLookupError, PermissionError, psutil.Error):
                pass
        return out

    deadline = time.monotonic() + 15
    while left() and time.monotonic() < deadline:
        time.sleep(0.2)
    stayed = left()
    for p in stayed:
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not stayed, [" ".join(p.cmdline())[:100] for p in stayed]
