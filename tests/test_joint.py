"""Persons and housing units that agree, block by block (``joint.households``): a keyed run on
each committed sample publishes 0 units breaking the three rules of
``pipeline.release.joint``, asserted from the release files alone; the same input without
``joint`` (2020 TopDown) breaks them, so the count is not vacuous."""

from __future__ import annotations

from pathlib import Path

import pytest
from run_helpers import write_config

from pipeline.job.stages import run
from pipeline.release.joint import RULES, release_joint_violations
from pipeline.release.verify import verify_release

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = {
    "synth_ri": (ROOT / "data" / "synth_ri" / "persons.parquet", ROOT / "data" / "synth_ri" / "units.parquet"),
    "perry": (ROOT / "data" / "perry_al_ppmf_persons.parquet", ROOT / "data" / "perry_al_units.parquet"),
}


def _release(tmp: Path, sample: str, joint: bool, randomness: dict) -> Path:
    persons, units = SAMPLES[sample]
    cfg = write_config(tmp, tmp, name=f"{sample}-{joint}.yaml", release_id=f"{sample}-{int(joint)}",
                       inputs={"persons": str(persons), "units": str(units)}, joint={"households": joint},
                       privacy=randomness)
    return Path(run(cfg, progress=False)["release_path"])


@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_joint_release_has_no_impossible_units(tmp_path: Path, sample: str) -> None:
    release = _release(tmp_path, sample, True, {"randomness": "keyed", "seed": None})
    assert verify_release(release) == []
    v = release_joint_violations(release)
    assert v.height == 6 and v["units"].sum() > 100
    bad = {r: int(v[r].sum()) for r in RULES}
    assert bad == dict.fromkeys(RULES, 0), v


def test_without_joint_the_2020_faults_appear(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from dptab.cli import app

    release = _release(tmp_path, "perry", False, {"randomness": "seeded", "seed": 5})
    v = release_joint_violations(release)
    assert all(int(v[r].sum()) > 0 for r in RULES), v
    out = CliRunner().invoke(app, ["verify", str(release)])
    assert out.exit_code == 0 and "independent, as 2020" in out.output
    assert f"occupied units without persons: {int(v[RULES[1]].sum())}" in out.output
    # a manifest that claimed joint households for this release fails verification
    m = json.loads((release / "manifest.json").read_text())
    m["joint"]["households"] = True
    (release / "manifest.json").write_text(json.dumps(m))
    assert any(f.check == "joint" and f.geolevel == "block" for f in verify_release(release))


def test_joint_needs_the_units_run(tmp_path: Path) -> None:
    from pipeline.model.config import ConfigError, load_config

    cfg = write_config(tmp_path, tmp_path, joint={"households": True}, privacy={"units_strategy": None})
    with pytest.raises(ConfigError, match="units_strategy"):
        load_config(cfg)


@pytest.mark.slow
def test_ri2010_joint_release_has_no_impossible_blocks(tmp_path: Path) -> None:
    """Rhode Island 2010 (25,181 real blocks, ../shared/data/real), keyed, 2020 strategies with
    joint households: 0 blocks break the rules, from the release files alone."""
    from shared_data import shared_file

    from pipeline.review.evaldata import write_ri2010

    source = shared_file("data/real/ri_2010_block.csv")
    write_ri2010(tmp_path / "ri", source)
    cfg = write_config(tmp_path, tmp_path / "ri", release_id="ri-joint", joint={"households": True},
                       privacy={"randomness": "keyed", "seed": None}, execution={"workers": 2})
    release = Path(run(cfg, progress=False)["release_path"])
    v = release_joint_violations(release)
    assert v.filter(v["geolevel"] == "block")["units"].item() == 25_181
    assert {r: int(v[r].sum()) for r in RULES} == dict.fromkeys(RULES, 0), v
