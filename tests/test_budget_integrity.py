"""Every spend counted, every release whole: the fault paths of `dptab run` / `--resume`.

Each test reproduces one way the budget could be spent without being counted, held forever, or
a release published partial or wrong, and checks the run now refuses or stops instead.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import polars as pl
import pytest
import yaml
from run_helpers import make_inputs, write_config
from typer.testing import CliRunner

from dptab.cli import app
from pipeline.job import stages
from pipeline.job.context import RunContext
from pipeline.job.rundir import RunDirError, RunDirIntegrityError
from pipeline.privacy.ledger import Ledger, LedgerError, LedgerMissingError


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return make_inputs(tmp_path_factory.mktemp("inputs"), persons=1500, seed=3)


def _spends(ledger: Path) -> list[dict]:
    return Ledger(ledger).entries() if ledger.exists() else []


def _run_dirs(tmp: Path) -> list[Path]:
    runs = tmp / "runs"
    return sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []


def _cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.output


def _until_publish(cfg: Path) -> Path:
    """A run with every level solved, not yet published (the state a kill before publish leaves)."""
    run_dir = stages.prepare(cfg)
    stages.stage_inputs(run_dir)
    stages.solve_levels(run_dir)
    return run_dir


def test_release_id_reused_from_another_runs_directory_is_refused(tmp_path: Path, inputs: Path) -> None:
    """Two configs with the same dataset, ledger and release id but different output folders:
    the second would draw new noise under the first one's ledger row."""
    ledger = tmp_path / "ledger.sqlite"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_config(tmp_path / "a", inputs, release_id="R1", privacy={"ledger": str(ledger)}, **{"output": {
        "runs_dir": str(tmp_path / "a" / "runs"), "releases_dir": str(tmp_path / "a" / "releases")}})
    b = write_config(tmp_path / "b", inputs, release_id="R1", privacy={"ledger": str(ledger)}, **{"output": {
        "runs_dir": str(tmp_path / "b" / "runs"), "releases_dir": str(tmp_path / "b" / "releases")}})
    stages.run(a, progress=False)
    with pytest.raises(LedgerError, match="already used by another run"):
        stages.prepare(b)
    assert not (tmp_path / "b" / "runs" / "R1").exists()
    rows = _spends(ledger)
    assert len(rows) == 1 and rows[0]["status"] == "committed"


def test_edited_config_before_resume_is_refused(tmp_path: Path, inputs: Path) -> None:
    cfg = write_config(tmp_path, inputs, release_id="E1")
    run_dir = stages.prepare(cfg)
    path = run_dir / "config.yaml"
    c = yaml.safe_load(path.read_text())
    c["privacy"]["strategy"] = "uniform"  # a different ρ than the ledger holds
    path.write_text(yaml.safe_dump(c))
    with pytest.raises(RunDirError, match="edited after the run started"):
        stages.run(resume_dir=run_dir, progress=False)
    code, out = _cli("run", "--quiet", "--resume", str(run_dir))
    assert code == 2 and "edited after the run started" in out


def test_vanished_ledger_stops_the_run_before_anything_is_public(tmp_path: Path, inputs: Path) -> None:
    ledger = tmp_path / "ledger.sqlite"
    cfg = write_config(tmp_path, inputs, release_id="L1")
    run_dir = _until_publish(cfg)
    ledger.unlink()
    with pytest.raises(LedgerMissingError, match="gone"):
        stages.run(resume_dir=run_dir, progress=False)
    assert not ledger.exists(), "a missing ledger must not be recreated empty"
    releases = tmp_path / "releases"
    assert not releases.exists() or not any(releases.iterdir())
    code, out = _cli("run", "--quiet", "--resume", str(run_dir))
    assert code == 1 and "gone" in out  # a fault while working, not "nothing ran"
    # a new run of the same dataset may not start a fresh ledger either
    cfg2 = write_config(tmp_path, inputs, name="c2.yaml", release_id="L2")
    with pytest.raises(LedgerMissingError, match="restore the ledger"):
        stages.prepare(cfg2)
    assert not ledger.exists()


def test_replaced_ledger_stops_the_run(tmp_path: Path, inputs: Path) -> None:
    ledger = tmp_path / "ledger.sqlite"
    cfg = write_config(tmp_path, inputs, release_id="L3")
    run_dir = _until_publish(cfg)
    ledger.unlink()
    Ledger(ledger)  # an empty ledger at the same path
    with pytest.raises(LedgerMissingError, match="replaced"):
        stages.stage_publish(run_dir)
    assert not (tmp_path / "releases" / "L3").exists()


def test_the_spend_is_committed_before_the_release_is_public(tmp_path: Path, inputs: Path) -> None:
    """The ledger row is committed while the finished folder is still hidden; a release is
    never public with a `reserved` (or missing) row."""
    ledger = tmp_path / "ledger.sqlite"
    cfg = write_config(tmp_path, inputs, release_id="C1")
    run_dir = _until_publish(cfg)
    seen = {}
    import pipeline.release.writer as writer

    real_rename = os.rename

    def spying_rename(src, dst):
        if Path(dst).name == "C1":
            seen["status"] = Ledger(ledger).status("test-ds", "C1")
            seen["public_before"] = Path(dst).exists()
        return real_rename(src, dst)

    mp = pytest.MonkeyPatch()
    mp.setattr(writer.os, "rename", spying_rename)
    try:
        stages.stage_publish(run_dir)
    finally:
        mp.undo()
    assert seen == {"status": "committed", "public_before": False}


@pytest.mark.parametrize("bad", ["zero_byte", "fifo"])
def test_bad_input_holds_no_budget_and_leaves_no_run_directory(tmp_path: Path, inputs: Path, bad: str) -> None:
    """Two runs on a 0-byte (or FIFO) persons file with lifetime 6 used to lock the dataset out."""
    persons = tmp_path / "persons.parquet"
    if bad == "zero_byte":
        persons.write_bytes(b"")
    else:
        os.mkfifo(persons)
    for i in range(2):
        cfg = write_config(tmp_path, inputs, name=f"c{i}.yaml", privacy={"lifetime_rho": "6"},
                           inputs={"persons": str(persons), "units": str(inputs / "units.parquet")})
        code, out = _cli("run", "--quiet", str(cfg))
        assert code == 2, out
        assert str(persons) in out and ("0 bytes" in out or "not a regular file" in out)
    assert _spends(tmp_path / "ledger.sqlite") == []
    assert _run_dirs(tmp_path) == []


def test_runs_directory_that_cannot_be_made_reserves_nothing(tmp_path: Path, inputs: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the runs directory should go")
    cfg = write_config(tmp_path, inputs, output={"runs_dir": str(blocker / "runs")})
    code, out = _cli("run", "--quiet", str(cfg))
    assert code == 2 and "output.runs_dir" in out and "not a directory" in out
    assert _spends(tmp_path / "ledger.sqlite") == []


def test_ledger_fail_gives_back_unpublished_rho_once(tmp_path: Path, inputs: Path) -> None:
    ledger = tmp_path / "ledger.sqlite"
    cfg = write_config(tmp_path, inputs, release_id="F1")
    run_dir = _until_publish(cfg)
    assert Ledger(ledger).spent("test-ds") > 0
    code, out = _cli("ledger", "fail", str(run_dir))
    assert code == 0, out
    assert Ledger(ledger).spent("test-ds") == 0
    # its noise may never be published now
    with pytest.raises(LedgerError, match="marked failed"):
        stages.run(resume_dir=run_dir, progress=False)
    with pytest.raises(LedgerError, match="failed"):
        stages.stage_publish(run_dir)
    assert not (tmp_path / "releases" / "F1").exists()
    code, out = _cli("ledger", "show", "--ledger", str(ledger))
    assert code == 0 and "F1" in out and "failed" in out


def test_ledger_fail_refuses_published_and_partially_published_runs(tmp_path: Path, inputs: Path) -> None:
    cfg = write_config(tmp_path, inputs, release_id="P1")
    out = stages.run(cfg, progress=False)
    code, text = _cli("ledger", "fail", out["run_dir"])
    assert code == 2 and "published" in text
    cfg2 = write_config(tmp_path, inputs, name="c2.yaml", release_id="P2")
    run_dir = _until_publish(cfg2)
    (tmp_path / "releases" / ".P2.tmp-deadbeef").mkdir(parents=True)
    code, text = _cli("ledger", "fail", str(run_dir))
    assert code == 2 and "left the run directory" in text
    assert Ledger(tmp_path / "ledger.sqlite").status("test-ds", "P2") == "reserved"


def test_partial_release_folders_are_cleaned_on_resume(tmp_path: Path, inputs: Path) -> None:
    cfg = write_config(tmp_path, inputs, release_id="T1")
    run_dir = _until_publish(cfg)
    stale = tmp_path / "releases" / ".T1.tmp-0123abcd"
    (stale / "tables").mkdir(parents=True)
    (stale / "tables" / "P1.parquet").write_bytes(b"PAR1 unterminated")
    stages.run(resume_dir=run_dir, progress=False)
    assert not stale.exists()
    assert sorted(p.name for p in (tmp_path / "releases").iterdir()) == ["T1"]


@pytest.mark.parametrize("damage", ["delete", "overwrite"])
def test_damaged_measurement_shard_stops_the_release(tmp_path: Path, inputs: Path, damage: str) -> None:
    cfg = write_config(tmp_path, inputs, release_id="D1")
    run_dir = _until_publish(cfg)
    shard = RunContext.load(run_dir).rd.measurement_path("persons", "block", 0)
    if damage == "delete":
        shard.unlink()
    else:
        data = bytearray(shard.read_bytes())
        data[len(data) // 2:len(data) // 2 + 50] = b"\x00" * 50
        shard.write_bytes(bytes(data))
    with pytest.raises(RunDirIntegrityError, match="shard-00000"):
        stages.stage_publish(run_dir)
    assert not (tmp_path / "releases" / "D1").exists()
    assert list((tmp_path / "releases").iterdir()) == []  # no partial folder either


def test_copy_verified_checks_the_bytes_it_copies(tmp_path: Path, inputs: Path) -> None:
    """Publishing copies each measurement file with ``RunDir.copy_verified``: one read that both
    copies and checks the file against the run's record; a changed byte fails it and leaves no copy."""
    cfg = write_config(tmp_path, inputs, release_id="D3")
    rd = RunContext.load(_until_publish(cfg)).rd
    shard = rd.measurement_path("persons", "block", 0)
    assert rd.copy_verified(shard, tmp_path / "copy.parquet") == rd.verified_sha256(shard)
    assert (tmp_path / "copy.parquet").read_bytes() == shard.read_bytes()
    data = bytearray(shard.read_bytes())
    data[-100] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(RunDirIntegrityError, match="changed since its stage finished"):
        rd.copy_verified(shard, tmp_path / "bad.parquet")
    assert not (tmp_path / "bad.parquet").exists()
    stray = shutil.copy(tmp_path / "copy.parquet", shard.with_name("shard-99999.parquet"))
    with pytest.raises(RunDirIntegrityError, match="not recorded"):
        rd.copy_verified(Path(stray), tmp_path / "other.parquet")


def test_damaged_solved_level_stops_the_next_level(tmp_path: Path, inputs: Path) -> None:
    cfg = write_config(tmp_path, inputs, release_id="D2", postprocess={"estimator": "topdown"})  # stage by stage
    run_dir = stages.prepare(cfg)
    stages.stage_inputs(run_dir)
    ctx = RunContext.load(run_dir)
    for level in ctx.level_names[:2]:
        stages.stage_shard(run_dir, "persons", level, 0)
        stages.stage_finish_level(run_dir, "persons", level)
    solved = ctx.rd.solved_path("persons", ctx.level_names[1])
    solved.write_bytes(solved.read_bytes()[:-20])
    with pytest.raises(RunDirIntegrityError, match="changed since its stage finished"):
        stages.stage_shard(run_dir, "persons", ctx.level_names[2], 0)


def test_run_directory_is_private(tmp_path: Path, inputs: Path) -> None:
    cfg = write_config(tmp_path, inputs, release_id="M1")
    out = stages.run(cfg, progress=False)
    run_dir = Path(out["run_dir"])
    loose = []
    for p in [run_dir, *run_dir.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        want = 0o700 if p.is_dir() else 0o600
        if mode & 0o077 or (p.is_dir() and mode != want):
            loose.append(f"{p.relative_to(run_dir)}: {oct(mode)}")
    assert not loose, loose


def test_fixed_release_id_rerun_points_to_resume(tmp_path: Path, inputs: Path) -> None:
    cfg = write_config(tmp_path, inputs, release_id="X1")
    run_dir = stages.prepare(cfg)
    code, out = _cli("run", "--quiet", str(cfg))
    assert code == 2 and "--resume" in out and str(run_dir) in out


def test_markup_in_data_values_is_printed_as_text(tmp_path: Path, inputs: Path) -> None:
    persons = pl.read_parquet(inputs / "persons.parquet")
    bad = persons.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("[/x][bold]9"))
                               .otherwise(pl.col("geoid")).alias("geoid"))
    path = tmp_path / "persons.parquet"
    bad.write_parquet(path)
    cfg = write_config(tmp_path, inputs, inputs={"persons": str(path), "units": str(inputs / "units.parquet")})
    code, out = _cli("run", "--quiet", str(cfg))
    assert code == 2, out
    assert "[/x][bold]9" in out and "Traceback" not in out


def test_absurd_lifetime_budget_is_refused(tmp_path: Path, inputs: Path) -> None:
    cfg = write_config(tmp_path, inputs, privacy={"lifetime_rho": "1e2000000"})
    code, out = _cli("run", "--quiet", str(cfg))
    assert code == 2 and "lifetime_rho" in out
    assert _spends(tmp_path / "ledger.sqlite") == [] and _run_dirs(tmp_path) == []


def test_many_concurrent_shard_records_are_all_kept(tmp_path: Path, inputs: Path) -> None:
    """`state.json` updates hold a lock: 64 threads marking stages done lose none."""
    from concurrent.futures import ThreadPoolExecutor

    cfg = write_config(tmp_path, inputs, release_id="S1")
    rd = RunContext.load(stages.prepare(cfg)).rd
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: rd.mark_done(f"shard:test:{i:03d}", {"i": i}), range(64)))
    done = rd.state()["done"]
    assert all(f"shard:test:{i:03d}" in done for i in range(64))


def test_shutil_is_not_needed_to_clean_up_after_refusals(tmp_path: Path, inputs: Path) -> None:
    """A refused overspend leaves nothing behind (no run directory, no reservation)."""
    cfg = write_config(tmp_path, inputs, privacy={"lifetime_rho": "1"})
    code, out = _cli("run", "--quiet", str(cfg))
    assert code == 2 and "budget exceeded" in out
    assert _run_dirs(tmp_path) == [] and _spends(tmp_path / "ledger.sqlite") == []
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)


def test_private_unit_counts_need_a_public_block_list(tmp_path: Path, inputs: Path) -> None:
    """With no housing-unit or facility invariant the release may not reveal which blocks have
    units: a run needs a public block list, and then publishes every listed block."""
    off = {"block_housing_units": False, "gq_facilities": False}
    cfg = write_config(tmp_path, inputs, invariants=off)
    code, out = _cli("run", "--quiet", str(cfg))
    assert code == 2 and "geography.blocks" in out
    assert _spends(tmp_path / "ledger.sqlite") == [] and _run_dirs(tmp_path) == []
    units = pl.read_parquet(inputs / "units.parquet")
    have = sorted(set(units["geoid"].to_list()))
    # the public list: every block with units plus empty blocks of the same block groups
    empty = sorted({g[:12] + f"{900 + i:03d}" for i, g in enumerate(have[:40])} - set(have))
    listed = tmp_path / "blocks.csv"
    pl.DataFrame({"geoid": have + empty}).write_csv(listed)
    cfg = write_config(tmp_path, inputs, name="listed.yaml", release_id="B1", invariants=off,
                       geography={"blocks": str(listed)})
    out = stages.run(cfg, progress=False)
    p1 = pl.read_parquet(Path(out["release_path"]) / "tables" / "P1.parquet")
    shown = set(p1.filter(pl.col("geolevel") == "block")["geoid"].to_list())
    assert shown == set(have) | set(empty) and len(empty) > 0
    # a list that misses a block of the units file is refused before any reservation
    short = tmp_path / "short.csv"
    pl.DataFrame({"geoid": have[1:]}).write_csv(short)
    cfg = write_config(tmp_path, inputs, name="short.yaml", release_id="B2", invariants=off,
                       geography={"blocks": str(short)})
    code, text = _cli("run", "--quiet", str(cfg))
    assert code == 2 and "block_not_in_geography" in text and have[0] in text
    assert Ledger(tmp_path / "ledger.sqlite").status("test-ds", "B2") is None


def test_edited_strategy_file_before_resume_is_refused(tmp_path: Path, inputs: Path) -> None:
    """The ledger holds the ρ of the strategy as it was: a raised ρ in the strategy file after a
    kill may not be measured (or published) on resume."""
    from pipeline.model.strategy import strategy_path

    mine = tmp_path / "mine.yaml"
    mine.write_text(strategy_path("census2020_pl94").read_text())
    cfg = write_config(tmp_path, inputs, release_id="S1", privacy={"strategy": str(mine)})
    run_dir = stages.prepare(cfg)
    mine.write_text(mine.read_text().replace("rho: 293764/114921", "rho: 100"))
    with pytest.raises(RunDirError, match="mine.yaml changed since the run started"):
        stages.run(resume_dir=run_dir, progress=False)
    import json

    reserved = json.loads((run_dir / "state.json").read_text())["rho"]
    assert [r["rho"] for r in Ledger(tmp_path / "ledger.sqlite").entries()] == [reserved]
    assert not (tmp_path / "releases" / "S1").exists()


def test_a_state_without_fingerprints_is_not_resumed(tmp_path: Path, inputs: Path) -> None:
    import json

    cfg = write_config(tmp_path, inputs, release_id="S2")
    run_dir = stages.prepare(cfg)
    st = json.loads((run_dir / "state.json").read_text())
    del st["config_fingerprint"]
    (run_dir / "state.json").write_text(json.dumps(st))
    with pytest.raises(RunDirError, match="no config fingerprint"):
        stages.run(resume_dir=run_dir, progress=False)


def test_where_the_work_runs_may_change_on_resume(tmp_path: Path, inputs: Path) -> None:
    cfg = write_config(tmp_path, inputs, release_id="S3")
    run_dir = stages.prepare(cfg)
    c = yaml.safe_load((run_dir / "config.yaml").read_text())
    c["execution"]["workers"] = 2
    (run_dir / "config.yaml").write_text(yaml.safe_dump(c))
    assert Path(stages.run(resume_dir=run_dir, progress=False)["release_path"]).is_dir()


def test_a_kill_right_after_the_reservation_resumes_with_its_key(tmp_path: Path, inputs: Path) -> None:
    import signal
    import subprocess
    import sys

    cfg = write_config(tmp_path, inputs, release_id="K1", privacy={"randomness": "keyed", "seed": None})
    env = {**os.environ, "DPTAB_CRASH_AT": "prepare:reserved"}
    first = subprocess.run([sys.executable, "-m", "dptab.cli", "run", "--quiet", str(cfg)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == -signal.SIGKILL, first.stderr
    run_dir = tmp_path / "runs" / "K1"
    assert (run_dir / "noise.key").is_file()
    stages.run(resume_dir=run_dir, progress=False)
    assert Ledger(tmp_path / "ledger.sqlite").status("test-ds", "K1") == "committed"


@pytest.mark.parametrize("off", ["block_housing_units", "gq_facilities"])
def test_one_private_unit_count_also_needs_a_block_list(tmp_path: Path, inputs: Path, off: str) -> None:
    """A facility-only block shows up with 0 housing units (and a housing-only block without
    facilities): either invariant off needs a public block list."""
    cfg = write_config(tmp_path, inputs, invariants={off: False})
    code, out = _cli("run", "--quiet", str(cfg))
    assert code == 2 and "geography.blocks" in out
    assert _spends(tmp_path / "ledger.sqlite") == []


def test_a_geography_without_a_state_level_publishes(tmp_path: Path, inputs: Path) -> None:
    levels = tmp_path / "levels.yaml"
    levels.write_text("levels:\n  - {name: nation, digits: 0}\n  - {name: county, digits: 5}\n"
                      "  - {name: tract, digits: 11}\n  - {name: block_group, digits: 12}\n  - {name: block, digits: 15}\n")
    strategy = tmp_path / "nostate.yaml"
    strategy.write_text("name: nostate\nspec: pl94\nrho: 1\nlevels:\n" + "".join(
        f"  {lv}: {{share: 1/5, queries: {{total: 1/2, detailed: 1/2}}}}\n"
        for lv in ("nation", "county", "tract", "block_group", "block")))
    # the strategy's own level check reads the package geolevels; this one lists a subset of them
    cfg = write_config(tmp_path, inputs, release_id="NS", geography={"levels": str(levels)},
                       privacy={"strategy": str(strategy), "units_strategy": None})
    out = stages.run(cfg, progress=False)
    m = __import__("json").loads((Path(out["release_path"]) / "manifest.json").read_text())
    assert [g["name"] for g in m["geolevels"]] == ["nation", "county", "tract", "block_group", "block"]
    assert m["invariants"]["state_totals"] is None


def test_ledger_fail_refuses_a_run_that_began_publishing(tmp_path: Path, inputs: Path) -> None:
    """The hidden release folder is removed on a failed publish or on resume, but the run
    directory remembers that publishing began: its ρ stays spent."""
    import pipeline.release.writer as writer

    cfg = write_config(tmp_path, inputs, release_id="PS")
    run_dir = _until_publish(cfg)
    mp = pytest.MonkeyPatch()

    def broken(*a, **k):
        raise RuntimeError("disk full while writing the release")

    mp.setattr(writer, "write_release", broken)
    try:
        with pytest.raises(RuntimeError):
            stages.stage_publish(run_dir)
    finally:
        mp.undo()
    code, text = _cli("ledger", "fail", str(run_dir))
    assert code == 2 and "began publishing" in text


def test_private_files_hold_under_concurrent_threads(tmp_path: Path) -> None:
    """One thread leaving `private_files` must not open up files another thread is writing."""
    import threading

    from pipeline.files import private_files

    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a() -> None:
        with private_files():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b() -> None:
        a_in.wait(5)
        with private_files():
            b_in.set()
            a_out.wait(5)
            (tmp_path / "b.bin").write_bytes(b"x")

    ts = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o600


def test_a_run_without_a_fixed_release_id_resumes(tmp_path: Path, inputs: Path) -> None:
    """The config as written carries the generated release id; the fingerprint is of that."""
    cfg = write_config(tmp_path, inputs)
    run_dir = stages.prepare(cfg)
    assert Path(stages.run(resume_dir=run_dir, progress=False)["release_path"]).is_dir()


def test_one_driver_per_run(tmp_path: Path, inputs: Path) -> None:
    """While another process drives a run, a resume is refused (it would remove that
    process's temp files and write beside it)."""
    import subprocess
    import sys
    import time

    cfg = write_config(tmp_path, inputs, release_id="D1")
    run_dir = stages.prepare(cfg)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(run_dir / 'run.lock')!r}, os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(30)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        code, out = _cli("run", "--quiet", "--resume", str(run_dir))
        assert code == 2 and "another process is running this run" in out
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert Path(stages.run(resume_dir=run_dir, progress=False)["release_path"]).is_dir()
